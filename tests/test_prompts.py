"""Many prompts at once (--prompts): round-robin sampling, q per prompt over its window, advantages per prompt,
the per-prompt metrics and plot, resume, and bad prompts files. On the tiny fixtures, with a classifier whose
answers the test records, so that every q is checked against eq. (2) counted by hand."""
import json

import pytest
import torch

import ddpo_debias as dd
import rewards
from tests.fixtures import two_classes
from tests.test_edges import one_error_line, run_main

PROMPTS = ["photo of the face of a nurse", "photo of the face of a mechanical engineer", "photo of the face of a pilot"]


class RecordingClassifier:
    """P(female), P(male) from a seeded generator, recorded per call, so a test knows every image's label."""

    def __init__(self, seed=0):
        self.gen, self.calls = torch.Generator().manual_seed(seed), []

    def __call__(self, images):
        p = two_classes(torch.rand(images.shape[0], generator=self.gen))
        self.calls.append(rewards.label_images(p))
        return p


def train(tmp_path, name, prompts=PROMPTS, classifier=None, **overrides):
    """A run on a prompts file, in this process; -> its metrics and the classifier that scored it."""
    path = tmp_path / f"{name}.txt"
    path.write_text("\n".join(prompts) + "\n")
    settings = {**dict(epochs=3, batch_size=6, num_steps=3, mixed_precision="no", lr=1e-3), **overrides}
    config = dd.Config(prompts=str(path), output_dir=str(tmp_path / name), **settings)
    dd.prepare_run_dir(config)
    classifier = classifier or RecordingClassifier()
    return dd.train(config, classifier=classifier), classifier


def eq2(labels):
    f, m = labels.count("female"), labels.count("male")
    return f / (f + m) if f + m else None


@pytest.mark.parametrize("window", [2, 4])
def test_per_prompt_counts_and_q_match_a_hand_count(tiny_sd, tmp_path, window):
    """B = 6 over 3 prompts: 2 images each an epoch, image i of epoch e drawn for prompt (6e + i) mod 3. With a window
    of 2 it holds exactly the epoch's images of its prompt and q is eq. (2) on them; with 4, also the epoch before."""
    metrics, classifier = train(tmp_path, f"w{window}", model=tiny_sd, balance_window=window)
    seen = {p: [] for p in PROMPTS}  # each prompt's labels so far, by hand
    for epoch, (m, labels) in enumerate(zip(metrics, classifier.calls)):
        rows = {r["prompt"]: r for r in m["per_prompt"]}
        assert list(rows) == PROMPTS
        for key in ("n_female", "n_male", "n_none"):  # the per-prompt counts add up to the batch's
            assert sum(r[key] for r in rows.values()) == m[key]
        for p, prompt in enumerate(PROMPTS):
            mine = [labels[i] for i in range(6) if (6 * epoch + i) % 3 == p]
            seen[prompt] += mine
            assert rows[prompt]["n_female"] + rows[prompt]["n_male"] + rows[prompt]["n_none"] == 2
            assert rows[prompt]["female_ratio"] == eq2(mine)
            assert rows[prompt]["window_female_ratio"] == eq2(seen[prompt][-window:])
        assert m["female_ratio"] == eq2(labels)  # the batch's q is still logged, as with one prompt


def test_per_prompt_q_is_not_the_batch_q():
    """All nurses female, all engineers male: the batch is balanced (q = 0.5, R_balance = 0 for every image), but
    each prompt is not, and per prompt every image of the over-drawn gender is penalised."""
    history = rewards.PromptHistory(PROMPTS[:2], 4)
    p_female = two_classes([0.9, 0.1, 0.9, 0.1, 0.9, 0.1])  # prompts 0, 1, 0, 1, 0, 1: the nurses female
    batch = rewards.r_balance(p_female, rewards.label_images(p_female))
    assert torch.equal(batch, torch.zeros(6))
    values, _, rows = history.score("balance", p_female, [0, 1] * 3)
    assert torch.equal(values, torch.full((6,), -0.5))  # q = 1 and q = 0: d = 0.5, every image in the majority
    assert [r["window_female_ratio"] for r in rows] == [1.0, 0.0]


def test_u_is_announced_once_and_only_where_asked(capsys):
    """U is printed when it is chosen, once per prompt; a history told not to announce (torchrun's other ranks)
    chooses the same U silently."""
    p_female = two_classes([0.9, 0.1, 0.1, 0.1])  # prompt 0: one female, one male; prompt 1: two male
    for announce in (True, False):
        history = rewards.PromptHistory(["a", "b"], 4, announce=announce)
        for _ in range(2):
            history.score("shift", p_female, [0, 1, 0, 1])
        assert history.underrepresented == ["female", "female"]
        printed = capsys.readouterr()
        assert (printed.out + printed.err).count("under-represented class U") == (2 if announce else 0)


def test_advantages_are_standardised_within_each_prompt():
    """Once a prompt's window of rewards is full its own mean and std are used; until then the batch's."""
    history = rewards.PromptHistory(["a", "b"], 3)
    values = torch.tensor([1.0, 2.0, 3.0, 10.0, 30.0, 20.0])
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    history.add("rewards", 0, [1.0, 2.0, 3.0]), history.add("rewards", 1, [10.0, 30.0, 20.0])
    a = dd.compute_advantages(values, ids, history, adv_clip=5.0)
    for p in (0, 1):
        assert a[ids == p].mean().abs() < 1e-6 and a[ids == p].std().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(a[:3], a[3:][[0, 2, 1]])  # the same ranks within each prompt, whatever the scale
    history = rewards.PromptHistory(["a", "b"], 3)
    history.add("rewards", 0, [1.0, 2.0, 3.0]), history.add("rewards", 1, [10.0, 30.0])  # b: not full yet
    a = dd.compute_advantages(values, ids, history, adv_clip=5.0)
    assert a[3:].tolist() == pytest.approx(((values[3:] - values.mean()) / values.std()).tolist(), abs=1e-5)


def test_more_prompts_than_images_go_round_robin(tiny_sd, tmp_path):
    """P = 3 > B = 2: epoch 0 draws prompts 0, 1; epoch 1 prompts 2, 0; epoch 2 prompts 1, 2."""
    metrics, _ = train(tmp_path, "robin", model=tiny_sd, batch_size=2, updates_per_epoch=1)
    drawn = [[r["prompt"] for r in m["per_prompt"]] for m in metrics]
    assert drawn == [PROMPTS[:2], [PROMPTS[0], PROMPTS[2]], PROMPTS[1:]]


def test_shift_chooses_u_per_prompt(tiny_sd, tmp_path):
    """U auto: each prompt's from its own first images. Female-leaning nurses get U = male, the others U = female."""
    lean = lambda images: two_classes([0.95, 0.05, 0.05] * (images.shape[0] // 3))  # prompt i of every 3 images
    metrics, _ = train(tmp_path, "shift", model=tiny_sd, reward="shift", classifier=lean, epochs=2)
    assert [r["underrepresented"] for r in metrics[-1]["per_prompt"]] == ["male", "female", "female"]
    assert metrics[-1]["underrepresented"] is None  # no single U for the run


def test_resume_restores_every_prompts_window(tiny_sd, tmp_path):
    """3 epochs straight, and 2 epochs then --resume to 3, give the same metrics: the windows are checkpointed."""
    full, _ = train(tmp_path, "full", model=tiny_sd, balance_window=4)
    half, classifier = train(tmp_path, "half", model=tiny_sd, balance_window=4, epochs=2)
    config = dd.resolve_config({"resume": str(tmp_path / "half"), "epochs": 3})
    resumed = dd.train(config, classifier=classifier)  # the same classifier, at its third call
    timing = ("sample_seconds", "reward_seconds", "train_seconds", "images_per_second")
    strip = lambda ms: [{k: v for k, v in m.items() if k not in timing} for m in ms]
    assert strip(resumed) == strip(full)
    (tmp_path / "half.txt").write_text("\n".join(PROMPTS[:2]))
    with pytest.raises(dd.UsageError, match="--prompts"):
        dd.train(dd.resolve_config({"resume": str(tmp_path / "half"), "epochs": 4}), classifier=classifier)


def test_plot_has_a_line_per_prompt(tiny_sd, tmp_path):
    """Three prompts at q = 1, 0 and 0.5 (so no line hides another): a line in each of PALETTE's first colours."""
    from PIL import ImageColor, Image
    colours = lambda folder: {c: n for n, c in Image.open(tmp_path / folder / "plot.png").convert("RGB").getcolors(1 << 20)}
    apart = lambda images: two_classes([0.9, 0.1, 0.9, 0.9, 0.1, 0.1])  # prompts 0, 1, 2, 0, 1, 2
    train(tmp_path, "plot", model=tiny_sd, epochs=2, classifier=apart)
    train(tmp_path, "single", prompts=PROMPTS[:1], model=tiny_sd, epochs=2, classifier=apart)
    many, one = colours("plot"), colours("single")
    for name in rewards.PALETTE[:3]:
        rgb = ImageColor.getrgb(name)
        assert many.get(rgb, 0) > 50 and rgb not in one, name


@pytest.mark.parametrize("case", ["duplicate", "no-prompts", "missing", "with-prompt", "with-evaluate", "window-1"])
def test_bad_prompts_input_is_one_line(tiny_sd, tiny_classifier, tmp_path, capsys, case):
    text = {"duplicate": "a nurse\n\na pilot\na nurse\n", "no-prompts": "\n  \n"}.get(case, "a nurse\na pilot\n")
    (tmp_path / "p.txt").write_text(text)
    path = tmp_path / ("nope.txt" if case == "missing" else "p.txt")
    extra = {"with-prompt": ["--prompt", "a chef"], "with-evaluate": ["--evaluate"],
             "window-1": ["--balance-window", "1"]}.get(case, [])
    result = run_main(capsys, "--model", tiny_sd, "--classifier", tiny_classifier, "--prompts", path, *extra,
                      "--output-dir", tmp_path / "run")
    flag = "--balance-window" if case == "window-1" else "--prompts"
    assert one_error_line(result, flag), result.stderr[-2000:]
    if case == "duplicate":
        assert "line 4" in result.stderr and "line 1" in result.stderr


def test_blank_lines_are_skipped_with_a_warning(tiny_sd, tiny_classifier, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("\na nurse\n\n  \na pilot\n")
    result = run_main(capsys, "--model", tiny_sd, "--classifier", tiny_classifier, "--prompts", tmp_path / "p.txt",
                      "--epochs", "1", "--batch-size", "2", "--num-steps", "3", "--mixed-precision", "no",
                      "--output-dir", tmp_path / "run")
    assert result.returncode == 0 and "skipped 3 blank line(s)" in result.stderr
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        assert [r["prompt"] for r in json.loads(f.readline())["per_prompt"]] == ["a nurse", "a pilot"]


FEMALE, MALE = 0.9, 0.1  # P(female) of a confidently female and a confidently male image


def epoch_of(n_female, n=10):
    return two_classes([FEMALE] * n_female + [MALE] * (n - n_female))


def test_a_window_of_three_epochs_is_rescored_under_todays_q():
    """One prompt, window N = 30 over epochs of 10 images with 1, 3, 8 and 9 "female" ones: the window spans three
    epochs once full, and its q moves from 0.4 (female the minority) to 0.67 (male the minority). Today's minority
    images must get positive advantages and its majority negative ones, and the statistics must be the window's
    labels scored by eq. (3) under today's q, counted by hand. (The code before issue 25 kept each reward as scored
    under its own epoch's q: in the third epoch the male images got +0.10 on average.)"""
    import statistics
    history, window = rewards.PromptHistory(["p"], 30), []
    for epoch, n_female in enumerate((1, 3, 8, 9)):
        p_female = epoch_of(n_female)
        values, labels, _ = history.score("balance", p_female, [0] * 10)
        window = (window + labels)[-30:]
        if epoch < 2:
            continue  # not full: compute_advantages uses the batch's statistics
        q = window.count("female") / 30  # eq. (2) over the window, by hand
        minority, d = ("female" if q < 0.5 else "male"), abs(q - 0.5)
        by_hand = [d if label == minority else -d for label in window]  # eq. (3) under today's q
        assert history.windows["rewards"][0] == pytest.approx(by_hand, abs=1e-7)
        mean, std = statistics.fmean(by_hand), statistics.stdev(by_hand)
        advantages = dd.compute_advantages(values, torch.zeros(10, dtype=torch.long), history, adv_clip=5.0)
        expected = [(r - mean) / (std + 1e-8) for r in values.tolist()]
        assert advantages.tolist() == pytest.approx(expected, rel=1e-5)
        today = torch.tensor([label == minority for label in labels])
        assert (advantages[today] > 0).all() and (advantages[~today] < 0).all(), (epoch, q, advantages)
    assert minority == "male"  # q crossed 0.5 inside the test


def test_soft_balance_window_is_rescored_under_todays_q():
    history = rewards.PromptHistory(["p"], 20)
    for n_female in (2, 9):
        p_female = epoch_of(n_female)
        history.score("soft_balance", p_female, [0] * 10)
    window = torch.cat([epoch_of(2), epoch_of(9)])  # (20, 2)
    assert history.windows["rewards"][0] == rewards.r_soft_balance(window, window=window).tolist()


@pytest.mark.parametrize("reward", ["shift", "rank"])
def test_shift_and_rank_keep_their_rewards_as_given(reward):
    """R_shift's U is fixed once chosen and rank's scores are relative to their ranking group: their window keeps
    the rewards as they were given, epoch after epoch."""
    history, given = rewards.PromptHistory(["p"], 30, "female"), []
    for epoch, n_female in enumerate((1, 3, 8)):
        p_female = epoch_of(n_female)
        ranks = torch.linspace(-1, 1, 10) * (epoch + 1) if reward == "rank" else None
        values, _, _ = history.score(reward, p_female, [0] * 10, ranks=ranks)
        given += values.tolist()
    assert reward not in rewards.RESCORED and history.windows["rewards"][0] == given


def runs_with_and_without_rescoring(tmp_path, monkeypatch, flags):
    """The same run twice through main(): as it is, and with no reward re-scored (the code before issue 25)."""
    out = {}
    for name, rescored in (("now", rewards.RESCORED), ("before", ())):
        monkeypatch.setattr(rewards, "RESCORED", rescored)
        assert dd.main([*flags, "--output-dir", str(tmp_path / name)]) == 0
        with open(tmp_path / name / "metrics.jsonl") as f:
            metrics = [{k: v for k, v in json.loads(line).items() if "seconds" not in k and k != "images_per_second"}
                       for line in f]
        out[name] = metrics, torch.load(tmp_path / name / "checkpoint.pt", weights_only=False)["weights"]
    return out["now"], out["before"]


@pytest.mark.parametrize("reward", ["balance", "soft_balance"])
def test_one_prompt_with_the_batch_as_window_is_unchanged_to_the_bit(tiny_sd, tiny_classifier, tmp_path,
                                                                     monkeypatch, reward):
    """N = B with one prompt: the window is the batch, scored under its own q either way."""
    flags = ["--model", tiny_sd, "--classifier", tiny_classifier, "--reward", reward, "--epochs", "3", "--batch-size",
             "4", "--num-steps", "3", "--mixed-precision", "no", "--lr", "1e-3"]
    (now, weights_now), (before, weights_before) = runs_with_and_without_rescoring(tmp_path, monkeypatch, flags)
    assert now == before and weights_now.keys() == weights_before.keys()
    assert all(torch.equal(weights_now[k], weights_before[k]) for k in weights_now)
    assert any(not m["equal_rewards"] for m in now)  # an update was taken: the weights were compared after it


def test_toy_world_with_the_batch_as_window_is_unchanged_to_the_bit(tmp_path, monkeypatch):
    from tests import toyworld
    flags = toyworld.cli_flags() + ["--reward=balance", "--epochs=2"]
    (now, weights_now), (before, weights_before) = runs_with_and_without_rescoring(tmp_path, monkeypatch, flags)
    assert now == before and all(torch.equal(weights_now[k], weights_before[k]) for k in weights_now)
