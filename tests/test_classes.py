"""K classes (--classes, --target): the generalised rewards against hand computations, K = 2 against the two-class
code it replaced (to the bit), the K-class metrics, classes found by name, intersectional classes, bad input."""
import json
import math

import numpy as np
import pytest
import torch

import ddpo_debias as dd
import rewards
from tests.fixtures import make_tiny_classifier, two_classes
from tests.test_cli import TINY
from tests.test_edges import one_error_line, run_main

THREE = {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}


# ------------------------------------------------------------------- the two-class code before K classes
# rewards.py as it was (af08dcd): P(female) (B,) alone, P(male) = 1 - P(female), eq. (3) as ±|q - 0.5|.
def todays_labels(p_female):
    return ["female" if p > 0.7 else "male" if 1.0 - p > 0.7 else None for p in p_female]


def todays_q(labels):
    f, m = labels.count("female"), labels.count("male")
    return f / (f + m) if f + m else None


def todays_r_balance(labels, window_labels):
    q = todays_q(window_labels)
    if q is None:
        return torch.zeros(len(labels))
    d, minority = abs(q - 0.5), "female" if q < 0.5 else "male"
    return torch.tensor([d if label == minority else -d for label in labels], dtype=torch.float32)


class TodaysHistory:
    """PromptHistory for --reward balance as it was, fed the new classifier's P(female) column."""

    def __init__(self, prompts, size, underrepresented=None, announce=True, target=None, threshold=0.7):
        self.prompts, self.size, self.target = list(prompts), size, rewards.uniform(rewards.GENDER)
        self.windows = {"p_female": [[] for _ in self.prompts], "rewards": [[] for _ in self.prompts]}
        self.underrepresented = [underrepresented] * len(self.prompts)

    def score(self, name, probs, prompt_ids, ranks=None):
        assert name == "balance"
        p_list = probs[:, 0].tolist()
        labels, values, rows = todays_labels(p_list), torch.zeros(len(p_list)), []
        for p in sorted(set(prompt_ids)):
            idx = [i for i, j in enumerate(prompt_ids) if j == p]
            mine = [labels[i] for i in idx]
            window = (self.windows["p_female"][p] + [p_list[i] for i in idx])[-self.size:]
            self.windows["p_female"][p] = window
            values[idx] = todays_r_balance(mine, todays_labels(window))
            self.windows["rewards"][p] = todays_r_balance(todays_labels(window), todays_labels(window)).tolist()
            q = todays_q(mine)
            rows.append({"prompt": self.prompts[p], "n_female": mine.count("female"), "n_male": mine.count("male"),
                         "n_none": mine.count(None), "female_ratio": q, "none_rate": mine.count(None) / len(mine),
                         "bias": None if q is None else abs(1 - 2 * q), "window_female_ratio": todays_q(todays_labels(window)),
                         "underrepresented": None, "reward_mean": sum(values[idx].tolist()) / len(idx)})
        return values, labels, rows

    def state_dict(self):
        return {"prompts": self.prompts, "windows": self.windows, "underrepresented": self.underrepresented}


def test_k2_balance_rewards_are_eq3_to_the_bit_for_every_count():
    """Every batch of up to 60 labelled images and 0-2 unlabelled ones: t_c - p̂_c (and min_c for none) is eq. (3)'s
    ±|q - 0.5|, as float32, exactly; q is F / (F + M) exactly."""
    for n in range(1, 61):
        for f in range(n + 1):
            for none in (0, 2):
                labels = ["female"] * f + ["male"] * (n - f) + [None] * none
                new = rewards.r_balance(torch.zeros(len(labels), 2), labels)
                assert torch.equal(new, todays_r_balance(labels, labels)), (f, n - f, none)
                assert rewards.female_ratio(labels) == todays_q(labels) == rewards.class_shares(labels)[0]
    # and the float32 reward of every count up to 1000 images (a window), vectorised: 0.5 - M/n == F/n - 0.5
    n = np.concatenate([np.full(k + 1, k) for k in range(1, 1001)])
    f = np.concatenate([np.arange(k + 1) for k in range(1, 1001)])
    assert np.array_equal(np.float32(0.5 - (n - f) / n), np.float32(f / n - 0.5))


def test_k2_labels_are_todays():
    p = torch.rand(2000, generator=torch.Generator().manual_seed(0))
    assert rewards.label_images(two_classes(p)) == todays_labels(p.tolist())


def runs(tmp_path, monkeypatch, flags):
    """The same run twice through main(): with PromptHistory, and with the two-class code before K classes."""
    out = {}
    for name, history in (("now", rewards.PromptHistory), ("before", TodaysHistory)):
        monkeypatch.setattr(rewards, "PromptHistory", history)
        assert dd.main([*flags, "--output-dir", str(tmp_path / name)]) == 0
        with open(tmp_path / name / "metrics.jsonl") as f:
            out[name] = ([json.loads(line) for line in f],
                         torch.load(tmp_path / name / "checkpoint.pt", weights_only=False)["weights"])
    return out["now"], out["before"]


def assert_same(now, before):
    """Every metric the two-class code wrote, equal to the bit (the bias to 1e-15: |F - M| / n is now rounded once,
    where |1 - 2q| rounded twice), and every trained weight equal to the bit."""
    (metrics, weights), (metrics_before, weights_before) = now, before
    timing = lambda k: "seconds" in k or k == "images_per_second"
    for m, b in zip(metrics, metrics_before, strict=True):
        assert {k: v for k, v in m.items() if k in b and not timing(k) and k != "per_prompt"} == \
               {k: v for k, v in b.items() if not timing(k) and k != "per_prompt"}
        for r, rb in zip(m["per_prompt"], b["per_prompt"], strict=True):
            assert {k: r[k] for k in rb if k != "bias"} == {k: v for k, v in rb.items() if k != "bias"}
            assert r["bias"] == pytest.approx(rb["bias"], abs=1e-15)
    assert weights.keys() == weights_before.keys() and all(torch.equal(weights[k], weights_before[k]) for k in weights)
    assert any(not m["equal_rewards"] for m in metrics)  # an update was taken: the weights were compared after it


def test_k2_tiny_run_is_the_two_class_run_to_the_bit(tiny_sd, tiny_classifier, tmp_path, monkeypatch):
    flags = ["--model", tiny_sd, "--classifier", tiny_classifier, "--epochs", "3", "--batch-size", "6",
             "--num-steps", "3", "--mixed-precision", "no", "--lr", "1e-3", "--balance-window", "9"]
    assert_same(*runs(tmp_path, monkeypatch, flags))


def test_k2_toy_world_run_is_the_two_class_run_to_the_bit(tmp_path, monkeypatch):
    from tests import toyworld
    assert_same(*runs(tmp_path, monkeypatch, toyworld.cli_flags() + ["--epochs=2"]))


# ------------------------------------------------------------------------------- K classes by hand
def test_k_class_balance_by_hand():
    labels = ["a", "a", "a", "b", None, "c"]  # p̂ = (3/5, 1/5, 1/5)
    r = rewards.r_balance(torch.zeros(6, 3), labels, target=THREE)
    gap = {"a": 1 / 3 - 3 / 5, "b": 1 / 3 - 1 / 5, "c": 1 / 3 - 1 / 5}
    assert r.tolist() == pytest.approx([gap["a"]] * 3 + [gap["b"], gap["a"], gap["c"]])  # none: the majority's
    balanced = rewards.r_balance(torch.zeros(3, 3), ["a", "b", "c"], target=THREE)
    assert torch.allclose(balanced, torch.zeros(3), atol=1e-7)
    target = {"a": 0.5, "b": 0.3, "c": 0.2}
    r = rewards.r_balance(torch.zeros(5, 3), ["a", "b", "c", "c", "a"], target=target)  # p̂ = (.4, .2, .4)
    assert r.tolist() == pytest.approx([0.1, 0.1, -0.2, -0.2, 0.1])


@pytest.mark.parametrize("counts", [(7, 2, 1), (1, 1, 1), (0, 4, 4), (10, 0, 0), (3, 2, 5)])
def test_k_class_batch_total_is_n_times_one_over_k_minus_sum_of_squares(counts):
    """With a uniform target and no none image, Σ_images (t_c - p̂_c) = n·(1/K - Σ_c p̂_c²): zero only when every
    share is 1/K, below zero otherwise."""
    labels = [c for c, k in zip("abc", counts) for _ in range(k)]
    n, shares = len(labels), [k / len(labels) for k in counts]
    total = rewards.r_balance(torch.zeros(n, 3), labels, target=THREE).sum().item()
    assert total == pytest.approx(n * (1 / 3 - sum(s * s for s in shares)), abs=1e-6)
    assert (abs(total) < 1e-6) == (counts == (1, 1, 1))


def test_k_class_soft_balance_and_shift_by_hand():
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    mass = [1.6 / 3, 0.6 / 3, 0.8 / 3]  # each class's share of the probability, by hand
    expected = [sum(p[k] * (1 / 3 - mass[k]) for k in range(3)) for p in probs.tolist()]
    assert rewards.r_soft_balance(probs, target=THREE).tolist() == pytest.approx(expected)
    assert torch.equal(rewards.r_shift(probs, target=THREE, underrepresented="c"), probs[:, 2])
    p = torch.tensor([0.9, 0.7, 0.05, 0.5])  # two classes: |q̃ - ½|·(2·P(minority) - 1), as before
    q = p.mean()
    assert torch.allclose(rewards.r_soft_balance(two_classes(p)), (q - 0.5).abs() * (2 * (1 - p) - 1), atol=1e-7)


def test_metrics_bias_kl_and_intervals():
    row = rewards.bias_report(["a"] * 7 + ["b"] * 2 + ["c"] + [None] * 2, THREE)
    assert (row["n_a"], row["n_b"], row["n_c"], row["n_none"], row["n_images"]) == (7, 2, 1, 2, 12)
    assert row["shares"] == pytest.approx({"a": 0.7, "b": 0.2, "c": 0.1})
    assert row["bias"] == pytest.approx((0.5 + 0.6 + 0.1) / 3)  # Shen et al.: the mean of |f_i - f_j| over pairs
    assert row["kl_to_target"] == pytest.approx(sum(f * math.log(3 * f) for f in (0.7, 0.2, 0.1)))
    assert row["shares_95"]["c"] == rewards.wilson_interval(1, 10) and "female_ratio" not in row
    for f in range(11):  # K = 2: the bias is |1 - 2q|, and the KL from (q, 1 - q) to (½, ½)
        row = rewards.bias_report(["female"] * f + ["male"] * (10 - f))
        q = f / 10
        assert row["bias"] == pytest.approx(abs(1 - 2 * q), abs=1e-15) and row["female_ratio"] == q
        assert row["kl_to_target"] == pytest.approx(sum(s * math.log(2 * s) for s in (q, 1 - q) if s > 0))
    assert rewards.bias_report([None, None], THREE)["bias"] is None


def test_history_shift_picks_the_rarest_class_and_windows_hold_k_columns():
    history = rewards.PromptHistory(["p"], 8, announce=False, target=THREE)
    probs = torch.tensor([[0.9, 0.05, 0.05]] * 3 + [[0.05, 0.9, 0.05]] * 2 + [[0.05, 0.05, 0.9]])
    values, labels, rows = history.score("shift", probs, [0] * 6)
    assert history.underrepresented == ["c"] and torch.equal(values, probs[:, 2])
    assert labels == ["a"] * 3 + ["b"] * 2 + ["c"] and len(history.windows["probs"][0][0]) == 3
    assert rows[0]["window_shares"] == pytest.approx({"a": 0.5, "b": 1 / 3, "c": 1 / 6})


def test_resume_with_other_classes_is_refused(tiny_sd, tiny_classifier, tmp_path, capsys):
    flags = ["--model", tiny_sd, "--classifier", tiny_classifier, "--batch-size", "4", "--num-steps", "3",
             "--mixed-precision", "no", "--output-dir", tmp_path / "run"]
    assert run_main(capsys, *flags, "--epochs", "1").returncode == 0
    result = run_main(capsys, "--resume", tmp_path / "run", "--epochs", "2", "--classes", "male,female")
    assert one_error_line(result, "--classes: the run was trained on female,male"), result.stderr


def test_a_checkpoint_from_before_k_classes_resumes():
    history = rewards.PromptHistory(["p"], 4)
    history.load_state_dict({"prompts": ["p"], "windows": {"p_female": [[0.9, 0.2]], "rewards": [[0.1, -0.1]]},
                             "underrepresented": [None]})
    assert history.windows["probs"][0] == [[0.9, pytest.approx(0.1)], [0.2, 0.8]]


# ------------------------------------------------------------------------- classifiers, by name
def test_three_labels_found_by_name_in_any_order_and_case(models_dir):
    images = torch.nn.functional.interpolate(torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(1)),
                                             size=32, mode="bilinear")
    path = make_tiny_classifier(models_dir / "styles", labels=("Tall", "Long", "Short", "Other"))
    probs = rewards.Classifier(path, ["short", "long", "tall"])(images)
    from transformers import AutoModelForImageClassification
    model = AutoModelForImageClassification.from_pretrained(path)
    softmax = model(pixel_values=(images - 0.5) / 0.5).logits.softmax(-1)  # (6, 4)
    assert torch.allclose(probs, softmax[:, [2, 1, 0]], atol=1e-6)  # "Other" counts as none: in no class
    assert (probs.sum(-1) < 1 - 1e-3).all()
    with pytest.raises(rewards.LabelError, match="no label 'curly'; its labels are: Tall, Long, Short, Other"):
        rewards.Classifier(path, ["short", "curly"])


def test_intersectional_classes_are_the_product_of_two_classifiers(models_dir, tiny_classifier):
    images = torch.nn.functional.interpolate(torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(2)),
                                             size=32, mode="bilinear")
    ages = make_tiny_classifier(models_dir / "ages", labels=("young", "old"), seed=3)
    classes = ["female&young", "female&old", "male&young", "male&old"]
    joint = rewards.Classifier(f"{tiny_classifier},{ages}", classes)(images)  # (5, 4)
    gender, age = rewards.Classifier(tiny_classifier)(images), rewards.Classifier(ages, ["young", "old"])(images)
    assert torch.allclose(joint, (gender[:, :, None] * age[:, None, :]).reshape(5, 4))
    assert torch.allclose(joint.sum(-1), torch.ones(5), atol=1e-6)  # the four cover every label of both
    with pytest.raises(rewards.LabelError, match="name each class as label&label"):
        rewards.Classifier(f"{tiny_classifier},{ages}", ["female", "male"])


@pytest.mark.parametrize("rule", ["min", "product", "mean-std"])
def test_an_ensemble_combines_the_same_classes_so_that_each_model_must_agree(models_dir, tiny_classifier, rule):
    """--ensemble: every model reads every class; min, product, or mean - std (population std, λ = 1), computed
    here by hand from each model's own softmax."""
    images = torch.nn.functional.interpolate(torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(4)),
                                             size=32, mode="bilinear")
    other = make_tiny_classifier(models_dir / "other-gender", labels=("male", "female"), seed=5)  # other order
    a, b = rewards.Classifier(tiny_classifier)(images), rewards.Classifier(other)(images)  # (6, 2) each
    want = {"min": torch.minimum(a, b), "product": a * b,
            "mean-std": ((a + b) / 2 - (a - b).abs() / 2).clamp(min=0)}[rule]  # two models: std = |a - b| / 2
    assert torch.allclose(rewards.Classifier(f"{tiny_classifier},{other}", ensemble=rule)(images), want, atol=1e-6)
    assert not torch.allclose(a, b, atol=1e-3)  # the two differ, so the rule is seen at work
    with pytest.raises(rewards.LabelError, match="name each class once"):
        rewards.Classifier(f"{tiny_classifier},{other}", ["female&female", "male&male"], ensemble=rule)


def test_the_rewards_own_classifier_is_refused_as_the_independent_one(tiny_sd, tiny_classifier, tmp_path, capsys):
    result = run_main(capsys, "--model", tiny_sd, "--classifier", tiny_classifier, "--independent-classifier",
                      tiny_classifier + "/", "--output-dir", tmp_path / "run")
    assert one_error_line(result, "--independent-classifier: is the reward's own classifier"), result.stderr


def test_an_ensemble_trains_and_a_python_reader_reads_every_epoch(tiny_sd, tiny_classifier, models_dir, tmp_path,
                                                                   capsys):
    """--classifier A,B --ensemble min trains, config.json records the rule, and --independent-classifier
    MODULE:NAME (here the referee's interface: NAME(classes, device=...) -> images -> P(class)) fills each epoch's
    "independent" block."""
    other = make_tiny_classifier(models_dir / "other-gender", labels=("male", "female"), seed=5)
    out = tmp_path / "run"
    result = run_main(capsys, "--model", tiny_sd, "--classifier", f"{tiny_classifier},{other}", "--ensemble", "min",
                      "--independent-classifier", "tests.test_classes:EveryoneFemale", *TINY, "--output-dir", out)
    assert result.returncode == 0, result.stderr
    saved = json.loads((out / "config.json").read_text())
    assert saved["ensemble"] == "min" and saved["family"] == "SD 1.x or 2.x-base (ε-prediction)"  # not a flag
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(m["independent"]["n_female"] == m["n_images"] for m in epochs), epochs


class EveryoneFemale:
    """A Python reader for --independent-classifier: every image female, whatever the classes' order."""

    def __init__(self, classes, device="cpu"):
        self.column = list(classes).index("female")
        self.classes = classes

    def __call__(self, images):
        return torch.nn.functional.one_hot(torch.full((len(images),), self.column), len(self.classes)).float()


def test_the_minimum_labels_an_image_only_when_every_model_is_sure():
    probs = torch.tensor([[[0.9, 0.1], [0.8, 0.2], [0.6, 0.4]],  # model A: sure, sure, unsure
                          [[0.75, 0.25], [0.3, 0.7], [0.95, 0.05]]])  # model B: sure, says male, sure
    assert rewards.label_images(rewards.ENSEMBLES["min"](probs)) == ["female", None, None]


# ------------------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize("flags, message", [
    (["--classes", "female"], "--classes: needs at least two classes"),
    (["--classes", "female,Female"], "--classes: has a repeated name"),
    (["--classes", "female,none"], "--classes: has 'none' or 'unclear'"),
    (["--classes", "female,,male"], "--classes: has an empty name"),
    (["--target", "0.5,0.4"], "--target: needs 2 shares in (0, 1), one per class of --classes, summing to 1"),
    (["--target", "0.2,0.3,0.5"], "--target: needs 2 shares"),
    (["--target", "half,half"], "--target: must be numbers"),
    (["--reward", "shift", "--underrepresented", "old"], "--underrepresented: must be auto or one of --classes"),
    (["--classes", "female&young,male&old"], "--classes: with 1 classifier each class is label"),
    (["--threshold", "1"], "--threshold: must be in (0, 1)"),
    (["--threshold", "0.4"], "--threshold: must be at least 1/K = 0.5 for 2 classes"),
    (["--ensemble", "min"], "--ensemble: only used with several --classifier"),
    (["--independent-classifier", "tests.no_such_module:Referee"], "--independent-classifier: cannot make the reader"),
    (["--independent-classifier", "README.md"], "--independent-classifier: README.md is a file"),
    (["--independent-classifier", "tests.referee:NoSuchReader"], "--independent-classifier: cannot make the reader"),
])
def test_bad_classes_and_targets_are_one_line(tiny_sd, tiny_classifier, tmp_path, capsys, flags, message):
    result = run_main(capsys, "--model", tiny_sd, "--classifier", tiny_classifier, "--output-dir", tmp_path / "run",
                      *flags)
    assert one_error_line(result, message), result.stderr
    assert not (tmp_path / "run").exists()


def test_a_classifier_without_a_class_is_refused_with_its_labels(tiny_sd, tiny_classifier, tmp_path, capsys):
    result = run_main(capsys, "--model", tiny_sd, "--classifier", tiny_classifier, "--classes",
                      "female,male,nonbinary", "--output-dir", tmp_path / "run", "--mixed-precision", "no")
    assert one_error_line(result, "--classes:"), result.stderr  # the class named is the user's to fix
    assert "has no label 'nonbinary'; its labels are: female, male" in result.stderr


def test_a_three_class_run_and_its_evaluation(tiny_sd, models_dir, tmp_path):
    """Through main(): metrics with a count and a share per class, bias and KL; the plot; eval.json per class."""
    path = str(make_tiny_classifier(models_dir / "abc", labels=("C", "B", "A")))
    flags = ["--model", tiny_sd, "--classifier", path, "--classes", "a,b,c", "--target", "0.5,0.25,0.25",
             "--batch-size", "6", "--num-steps", "3", "--mixed-precision", "no"]
    assert dd.main([*flags, "--epochs", "2", "--output-dir", str(tmp_path / "run")]) == 0
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f]
    for m in metrics:
        assert m["n_a"] + m["n_b"] + m["n_c"] + m["n_none"] == 6 and "female_ratio" not in m
        labelled = m["n_a"] + m["n_b"] + m["n_c"]
        assert m["shares"] == (None if not labelled else pytest.approx({c: m[f"n_{c}"] / labelled for c in "abc"}))
    assert (tmp_path / "run" / "plot.png").exists()
    with open(tmp_path / "run" / "config.json") as f:
        assert json.load(f)["classes"] == "a,b,c"
    report = dd.main([*flags, "--evaluate", "--eval-images", "4", "--output-dir", str(tmp_path / "eval"),
                      "--clip-model", path])
    assert report == 0
    with open(tmp_path / "eval" / "eval.json") as f:
        report = json.load(f)
    assert report["classes"] == ["a", "b", "c"] and report["target"] == {"a": 0.5, "b": 0.25, "c": 0.25}
    for row in report["prompts"]:
        assert row["n_a"] + row["n_b"] + row["n_c"] + row["n_none"] == 4 and set(row["shares_95"] or "abc") == set("abc")


def test_report_table_shows_each_class():
    rows = [{"prompt": "a chef", **rewards.bias_report(["a"] * 4 + [None], THREE)},
            {"prompt": "a nurse", **rewards.bias_report(["a", "b", "c"], THREE)}]
    report = {"classes": list(THREE), "prompts": rows, "overall": rewards.overall(rows)}
    lines = rewards.report_table(report).splitlines()
    assert lines[0].split()[:5] == ["prompt", "a", "b", "c", "none"]
    assert lines[1].split()[2:8] == ["4", "0", "0", "1", "1.00/0.00/0.00", "0.67"]  # bias (1 + 1 + 0) / 3
    assert lines[2].split()[2:8] == ["1", "1", "1", "0", "0.33/0.33/0.33", "0.00"]
    assert lines[3].startswith("overall: mean_bias 0.333, mean_kl_to_target ")


def test_threshold_below_half_labels_the_most_probable_class():
    probs = torch.tensor([[0.45, 0.35, 0.2], [0.34, 0.33, 0.33], [0.2, 0.2, 0.6], [0.8, 0.1, 0.1]])
    assert rewards.label_images(probs, list(THREE)) == [None, None, None, "a"]  # the paper's 0.7
    assert rewards.label_images(probs, list(THREE), threshold=0.4) == ["a", None, "c", "a"]
    history = rewards.PromptHistory(["p"], 4, announce=False, target=THREE, threshold=0.4)
    values, labels, rows = history.score("balance", probs, [0] * 4)
    assert labels == ["a", None, "c", "a"] and rows[0]["window_shares"] == pytest.approx({"a": 2 / 3, "b": 0, "c": 1 / 3})
    gap = {"a": 1 / 3 - 2 / 3, "b": 1 / 3, "c": 0.0}
    assert values.tolist() == pytest.approx([gap["a"], gap["a"], gap["c"], gap["a"]], abs=1e-7)  # none: the majority's
    assert history.windows["rewards"][0] == pytest.approx(values.tolist(), abs=1e-7)  # re-scored at the same threshold


def test_a_threshold_run_records_it(tiny_sd, tiny_classifier, tmp_path):
    flags = ["--model", tiny_sd, "--classifier", tiny_classifier, "--batch-size", "4", "--num-steps", "3",
             "--mixed-precision", "no", "--epochs", "1", "--threshold", "0.5"]
    assert dd.main([*flags, "--output-dir", str(tmp_path / "run")]) == 0
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        assert json.loads(f.readline())["n_none"] == 0  # two classes at 0.5: every image has its likelier class
    with open(tmp_path / "run" / "config.json") as f:
        assert json.load(f)["threshold"] == 0.5
