"""Where the numbers lied (issue 33): equal rewards' advantages, non-finite steps in a row, a step with σ_t = 0, and
the held-out check's reference after --resume. Each test is a scenario of the review that found the defect."""
import json

import pytest
import torch

import ddpo_debias as dd
import rewards
from tests.test_cli import TINY, run_cli


def scored(classes, per_prompt, target=None):
    """Two or more prompts' images, each given as a list of class indices, scored with R_balance through
    PromptHistory (window = each prompt's images) -> (rewards (B,), prompt_ids (B,), the history)."""
    target = target or rewards.uniform(classes)
    n = len(per_prompt[0])
    history = rewards.PromptHistory([f"prompt {p}" for p in range(len(per_prompt))], n, target=target)
    probs, ids = [], []
    for p, images in enumerate(per_prompt):
        for c in images:  # a confident image of class c: 0.9 on it, the rest spread over the others
            probs.append([0.9 if k == c else 0.1 / (len(classes) - 1) for k in range(len(classes))])
            ids.append(p)
    values, _, _ = history.score("balance", torch.tensor(probs), ids)
    return values, torch.tensor(ids), history


def by_hand(values):
    """DDPO's standardisation in float64: (R - mean) / (std + 1e-8), or 0 for rewards that are all equal."""
    x = [float(v) for v in values]
    mean = sum(x) / len(x)
    std = (sum((v - mean) ** 2 for v in x) / (len(x) - 1)) ** 0.5
    return [0.0 if len(set(x)) == 1 else (v - mean) / (std + 1e-8) for v in x]


def test_a_prompt_whose_images_are_all_one_class_gets_advantage_exactly_zero():
    """The review's case: K = 3, prompt 0's 12 images all of one class, prompt 1 mixed. Its rewards are all
    1/3 - 1 = -2/3, which float32 cannot hold: the old code gave every image A = -0.886 from rounding alone."""
    classes = ["short", "long", "tall"]
    values, ids, history = scored(classes, [[0] * 12, [0] * 6 + [1] * 4 + [2] * 2])
    assert len(set(values[:12].tolist())) == 1 and values[0] != 0  # equal, and not a power of two
    advantages = dd.compute_advantages(values, ids, history, adv_clip=5.0)
    assert advantages[:12].tolist() == [0.0] * 12
    assert advantages[12:].tolist() == pytest.approx(by_hand(values[12:]), abs=1e-5)  # prompt 1 as before


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6, 7])
def test_equal_rewards_give_zero_advantages_for_any_k_and_class(k):
    """For K = 5 or 6 the old sign was positive: the update reinforced the most biased prompt's samples."""
    classes = [f"class{c}" for c in range(k)]
    for c in range(k):
        mixed = [i % k for i in range(12)][::-1]
        values, ids, history = scored(classes, [[c] * 12, mixed[:11] + [0]])
        assert dd.compute_advantages(values, ids, history, adv_clip=5.0)[:12].abs().max() == 0, (k, c)
        assert dd.compute_advantages(values, ids, history, 5.0, scale=0.1)[:12].abs().max() == 0, (k, c)


def test_a_non_uniform_target_with_one_class_gives_zero_advantages():
    """K = 2 with --target 0.3,0.7, every image male: rewards 0.7 - 1 = -0.3 each; the old code gave -0.725."""
    values, ids, history = scored(["female", "male"], [[1] * 16], target={"female": 0.3, "male": 0.7})
    assert dd.compute_advantages(values, ids, history, adv_clip=5.0).tolist() == [0.0] * 16


def test_different_rewards_are_standardised_as_before():
    """Not a change for rewards that differ: the float32 formula, to the bit."""
    values, ids, history = scored(["female", "male"], [[0, 1, 1, 1, 1, 1, 0, 1]])
    mean, std = values.mean(), values.std()
    assert torch.equal(dd.compute_advantages(values, ids, history, 5.0), ((values - mean) / (std + 1e-8)).clamp(-5, 5))


def test_skipped_steps_are_counted_in_a_row_across_epochs():
    """One overflowed step and one good one every epoch never stop a run; three bad ones in a row do, across an
    epoch's boundary too. An epoch of equal rewards (no update) neither adds nor resets."""
    streak = 0
    for _ in range(10):
        streak = dd.skipped_in_a_row(streak, [None, 1.0], 1)
        assert streak == 0
    streak = dd.skipped_in_a_row(streak, [1.0, None], 1)
    streak = dd.skipped_in_a_row(streak, None, 0)  # equal rewards: no update
    assert streak == 1
    streak = dd.skipped_in_a_row(streak, [None, None], 2)
    assert streak == 3 >= dd.MAX_NONFINITE
    assert dd.skipped_in_a_row(0, None, 2) == 2  # non-finite rewards: the epoch's steps skipped without an update


def test_a_run_with_one_bad_step_in_every_epoch_goes_on(tiny_sd, tiny_classifier, tmp_path, monkeypatch):
    """Every epoch's first update has a NaN gradient, its second is good: the old count stopped it after epoch 2."""
    config = dd.Config(model=tiny_sd, classifier=tiny_classifier, output_dir=str(tmp_path / "run"), batch_size=4,
                       num_steps=3, mixed_precision="no", lr=1e-3, epochs=4, reward="shift", underrepresented="female")
    dd.prepare_run_dir(config)
    calls = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def poisoned_clip(params, max_norm):
        params = list(params)
        if len(calls) % 2 == 0:
            params[0].grad.fill_(float("nan"))
        calls.append(1)
        return real_clip(params, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", poisoned_clip)
    metrics = dd.train(config)
    assert [m["skipped_steps"] for m in metrics] == [1] * 4 and len(calls) == 8


@pytest.fixture(scope="module")
def linspace_sd(tmp_path_factory, tiny_sd):
    """The tiny SD with timestep_spacing="linspace", whose last step lands on t = 0."""
    import shutil
    path = tmp_path_factory.mktemp("linspace") / "sd"
    shutil.copytree(tiny_sd, path)
    config_path = path / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "timestep_spacing": "linspace"}))
    return str(path)


def test_linspace_last_step_has_no_log_probability(linspace_sd):
    """The reason for the refusal below: at t = 0 the step's σ_t is 0 and the log-density is NaN."""
    from diffusers import DDIMScheduler
    scheduler = DDIMScheduler.from_pretrained(linspace_sd, subfolder="scheduler")
    scheduler.set_timesteps(3)
    assert scheduler.timesteps[-1] == 0
    x = torch.randn(1, 4, 8, 8)
    _, log_prob, _, std = dd.ddim_step_with_logprob(scheduler, x, scheduler.timesteps[-1], x, 1.0, noise=x)
    assert std.item() == 0 and log_prob.isnan().all()


def test_linspace_with_every_step_trained_is_refused_and_trains_without_its_last(linspace_sd, tiny_classifier,
                                                                                  tmp_path):
    out = tmp_path / "run"
    refused = run_cli("--model", linspace_sd, "--classifier", tiny_classifier, *TINY, "--skip-final-steps", "0",
                      "--output-dir", out)
    errors = [line for line in refused.stderr.splitlines() if "error" in line]
    assert refused.returncode == 2 and len(errors) == 1 and "--skip-final-steps" in errors[0], refused.stderr
    assert "linspace" in errors[0] and "--skip-final-steps 1 or more" in errors[0]
    assert not out.exists() and "Traceback" not in refused.stderr
    trained = run_cli("--model", linspace_sd, "--classifier", tiny_classifier, *TINY, "--skip-final-steps", "1",
                      "--reward", "shift", "--lr", "1e-3", "--output-dir", out)
    assert trained.returncode == 0, trained.stderr
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(m["skipped_steps"] == 0 and m["loss"] is not None for m in metrics)


def held_out_run(tmp_path, name, tiny_sd, tiny_classifier, *extra):
    args = ["--model", tiny_sd, "--classifier", tiny_classifier, *TINY, "--epochs", "3", "--lr", "1e-3",
            "--save-every", "1", "--output-dir", str(tmp_path / name), *extra]
    assert dd.main([str(a) for a in args]) == 0
    return tmp_path / name


def test_eval_every_first_given_at_resume_compares_with_the_base_model(tiny_sd, tiny_classifier, tiny_clip,
                                                                        tmp_path):
    """The review's case: --eval-every given only at --resume. The reference must be the base model's images (as in
    a run that checked from the start), not the resumed weights': then epoch 2's CLIP-I is the same in both."""
    straight = held_out_run(tmp_path, "straight", tiny_sd, tiny_classifier, "--eval-every", "1",
                            "--clip-model", tiny_clip)
    late = held_out_run(tmp_path, "late", tiny_sd, tiny_classifier, "--epochs", "2")
    assert dd.main(["--resume", str(late), "--epochs", "3", "--eval-every", "1", "--clip-model", tiny_clip]) == 0
    reference = lambda run: torch.load(run / "held_out_reference.pt")["embeddings"]
    assert torch.equal(reference(late), reference(straight))
    last = lambda run: json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["held_out"]
    assert {k: v for k, v in last(late).items() if k != "seconds"} == {
        k: v for k, v in last(straight).items() if k != "seconds"}
    assert last(late)["mean_clip_i"] < 1 - 1e-6  # the weights moved: a reference of the resumed model would be nearer
    # the trained weights are back after the base model's images were drawn: the run went on as a straight one
    weights = lambda run: torch.load(run / "checkpoint.pt", weights_only=False)["weights"]
    assert all(torch.equal(weights(late)[k], v) for k, v in weights(straight).items())


def test_resume_with_other_held_out_prompts_is_refused(tiny_sd, tiny_classifier, tiny_clip, tmp_path, capsys):
    from tests.test_edges import one_error_line, run_main
    run = held_out_run(tmp_path, "run", tiny_sd, tiny_classifier, "--epochs", "1", "--eval-every", "1",
                       "--clip-model", tiny_clip)
    other = tmp_path / "other.txt"
    other.write_text("photo of the face of a pilot\nphoto of the face of a baker\n")
    capsys.readouterr()
    result = run_main(capsys, "--resume", run, "--epochs", "2", "--eval-prompts", other)
    assert one_error_line(result, "--eval-prompts") and "same --eval-prompts" in result.stderr, result.stderr
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1  # nothing was run or overwritten
