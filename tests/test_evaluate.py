"""--evaluate: the held-out bias report, checked against hand counts; paired seeds; --unet; --compare; bad input."""
import json
import math

import pytest
import torch

import ddpo_debias as dd
import rewards
from tests.test_edges import one_error_line, run_main
from tests.fixtures import two_classes


def evaluate(tiny_sd, tmp_path, name, scorer=None, **overrides):
    """scorer: images -> P(female), in place of the classifier folder. overrides: Config fields (clip_model needed:
    the default is a hub id)."""
    config = dd.Config(model=tiny_sd, output_dir=str(tmp_path / name), evaluate=True,
                       **{"eval_images": 5, "num_steps": 2, **overrides})
    dd.prepare_run_dir(config)
    return dd.evaluate(config, classifier=scorer)


def wilson_by_hand(k, n, z=1.96):
    """The same interval in its other textbook form: (2k + z² ± z·√(z² + 4k(n-k)/n)) / (2(n + z²))."""
    root = z * math.sqrt(z * z + 4 * k * (n - k) / n)
    return [(2 * k + z * z - root) / (2 * (n + z * z)), (2 * k + z * z + root) / (2 * (n + z * z))]


def test_report_matches_hand_counts(tiny_sd, tiny_clip, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("photo of the face of a pilot\n\nphoto of the face of a nurse\n")
    fixed = lambda images: two_classes([0.9, 0.95, 0.1, 0.5, 0.8])  # female, female, male, none, female
    report = evaluate(tiny_sd, tmp_path, "run", scorer=fixed, eval_prompts=str(prompts), clip_model=tiny_clip)
    assert [r["prompt"] for r in report["prompts"]] == ["photo of the face of a pilot", "photo of the face of a nurse"]
    row = report["prompts"][0]
    assert (row["n_female"], row["n_male"], row["n_none"]) == (3, 1, 1)
    assert row["female_ratio"] == 0.75 and row["bias"] == pytest.approx(abs(1 / 4 - 3 / 4)) and row["none_rate"] == 0.2
    assert row["female_ratio_95"] == pytest.approx(wilson_by_hand(3, 4))
    bias_keys = ("mean_bias", "mean_abs_q_minus_half", "none_rate")
    assert {k: report["overall"][k] for k in bias_keys} == pytest.approx({"mean_bias": 0.5, "mean_abs_q_minus_half": 0.25,
                                                                         "none_rate": 0.2})
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved["prompts"] == report["prompts"] and (tmp_path / "run" / "eval_01.png").exists()
    assert rewards.wilson_interval(0, 0) is None and rewards.wilson_interval(0, 5)[0] == 0.0


def test_seeds_are_paired_and_unet_changes_the_report(tiny_sd, tiny_classifier, tiny_clip, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(rewards.HELD_OUT[:3]))
    kwargs = dict(classifier=tiny_classifier, eval_prompts=str(prompts), eval_images=8, clip_model=tiny_clip)
    first = evaluate(tiny_sd, tmp_path, "a", **kwargs)
    again = evaluate(tiny_sd, tmp_path, "b", **kwargs)
    assert first["prompts"] == again["prompts"]  # the same model on the same seeds: the same report
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".to_v." in name:
                p.add_(torch.randn_like(p))  # a different model
    unet.save_pretrained(tmp_path / "other-unet")
    other = evaluate(tiny_sd, tmp_path, "c", unet=str(tmp_path / "other-unet"), compare=str(tmp_path / "a" / "eval.json"),
                     **kwargs)
    assert other["prompts"] != first["prompts"] and other["unet"] == str(tmp_path / "other-unet")
    assert (tmp_path / "c" / "compare.png").exists()


def test_held_out_prompts_exclude_the_training_prompt():
    assert len(rewards.HELD_OUT) >= 20 and dd.Config().prompt not in rewards.HELD_OUT
    assert dd.read_prompts("") == list(rewards.HELD_OUT)


@pytest.mark.parametrize("case, flag", [("missing-prompts", "--eval-prompts"), ("empty-prompts", "--eval-prompts"),
                                        ("zero-images", "--eval-images"), ("not-a-unet", "--unet"),
                                        ("missing-compare", "--compare"), ("unpaired-compare", "--compare"),
                                        ("evaluation-folder-reused", "--output-dir"),
                                        ("with-resume", "--evaluate"), ("clip-missing", "--clip-model"),
                                        ("clip-not-an-image-model", "--clip-model"),
                                        ("compare-without-embeddings", "--compare"),
                                        ("compare-other-quality-model", "--compare")])
def test_bad_evaluation_input_is_one_line(tiny_sd, tiny_classifier, tiny_clip, tmp_path, capsys, case, flag):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    one = tmp_path / "one.txt"
    one.write_text(rewards.HELD_OUT[0])
    base = ["--evaluate", "--model", tiny_sd, "--classifier", tiny_classifier, "--num-steps", "2", "--eval-images",
            "2", "--eval-prompts", one, "--clip-model", tiny_clip, "--output-dir", tmp_path / "run"]
    extra = {"missing-prompts": ["--eval-prompts", tmp_path / "nope.txt"], "empty-prompts": ["--eval-prompts", empty],
             "zero-images": ["--eval-images", "0"], "not-a-unet": ["--unet", tiny_classifier],
             "missing-compare": ["--compare", tmp_path / "nope.json"], "clip-missing": ["--clip-model", tmp_path / "no"],
             "clip-not-an-image-model": ["--clip-model", f"{tiny_sd}/text_encoder"]}.get(case, [])
    if case == "with-resume":
        assert run_main(capsys, "--model", tiny_sd, "--classifier", tiny_classifier, "--epochs", "1", "--batch-size",
                        "2", "--num-steps", "3", "--output-dir", tmp_path / "trained").returncode == 0
        base, extra = ["--evaluate", "--resume", tmp_path / "trained"], []
    if case in ("unpaired-compare", "evaluation-folder-reused", "compare-without-embeddings",
                "compare-other-quality-model"):
        assert run_main(capsys, *base[:-1], tmp_path / "earlier").returncode == 0
        extra = (["--compare", tmp_path / "earlier" / "eval.json", "--seed", "7"] if case == "unpaired-compare"
                 else ["--output-dir", tmp_path / "earlier"] if case == "evaluation-folder-reused"
                 else ["--compare", tmp_path / "earlier" / "eval.json"])
    if case == "compare-without-embeddings":  # a report from before the quality numbers, or copied alone
        (tmp_path / "earlier" / "eval_embeddings.pt").unlink()
    if case == "compare-other-quality-model":
        extra += ["--clip-model", tiny_classifier]
    result = run_main(capsys, *base, *extra)
    assert one_error_line(result, flag), result.stderr[-2000:]


@pytest.mark.parametrize("flags", [["--augment"], ["--kl-base", "0.1"], ["--lr", "1e-3"], ["--trust-region", "truly"],
                                   ["--truly-alpha", "2"], ["--epochs", "5"], ["--reward", "shift"]])
def test_training_flags_are_refused_with_evaluate(tiny_sd, tiny_classifier, tmp_path, capsys, flags):
    """--evaluate samples and labels but never trains: a training flag with it would be ignored, so it is refused
    (docs/reliability.md: flags are never silently ignored)."""
    result = run_main(capsys, "--evaluate", "--model", tiny_sd, "--classifier", tiny_classifier, "--clip-model", "none",
                      "--output-dir", tmp_path / "run", *flags)
    assert one_error_line(result, f"{flags[0]}: a training flag, and --evaluate does not train"), result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("beta", ["1e39", "1e30", "101"])
def test_an_anchor_too_strong_to_mean_anything_is_refused(tiny_sd, tiny_classifier, tmp_path, capsys, beta):
    result = run_main(capsys, "--model", tiny_sd, "--classifier", tiny_classifier, "--kl-base", beta,
                      "--output-dir", tmp_path / "run")
    assert one_error_line(result, "--kl-base: must be in [0, 100]"), result.stderr
