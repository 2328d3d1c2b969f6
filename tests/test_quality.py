"""Quality next to bias in --evaluate (Shen et al., ICLR 2024): CLIP-T and CLIP-I from --clip-model, checked against
a hand computation with get_image_features / get_text_features on the tests' tiny CLIP; CLIP-I of a model with
itself is 1 and of a perturbed UNet less; an image model without a text tower gives CLIP-I only."""
import json

import pytest
import torch
import torch.nn.functional as F

import ddpo_debias as dd
from tests.test_evaluate import evaluate
from tests.fixtures import two_classes

PROMPTS = ["photo of the face of a nurse", "photo of the face of a pilot"]


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


def test_clip_t_is_the_cosine_of_get_image_features_and_get_text_features(tiny_sd, tiny_clip, prompts_file, tmp_path):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel
    seen = []
    scorer = lambda images: seen.append(images) or two_classes(torch.full((images.shape[0],), 0.9))
    report = evaluate(tiny_sd, tmp_path, "run", scorer=scorer, eval_prompts=prompts_file, clip_model=tiny_clip)
    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), AutoImageProcessor.from_pretrained(tiny_clip)
    tokens = AutoTokenizer.from_pretrained(tiny_clip)(PROMPTS, padding=True, return_tensors="pt")
    unit = lambda out: F.normalize((out if torch.is_tensor(out) else out.pooler_output).float(), dim=-1)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (processor.image_mean, processor.image_std))
    with torch.no_grad():
        texts = unit(model.get_text_features(**tokens))
        for i, images in enumerate(seen):
            pixels = F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
            by_hand = unit(model.get_image_features(pixel_values=(pixels - mean) / std)) @ texts[i]
            row = report["prompts"][i]
            assert row["clip_t_images"] == pytest.approx(by_hand.tolist(), abs=1e-6)
            assert row["clip_t"] == pytest.approx(by_hand.mean().item(), abs=1e-6) and row["clip_i"] is None
    assert report["quality_model"] == tiny_clip and report["overall"]["mean_clip_t"] == pytest.approx(
        sum(r["clip_t"] for r in report["prompts"]) / 2)
    assert (tmp_path / "run" / "eval_embeddings.pt").exists()


def test_clip_i_is_1_for_the_same_model_and_less_for_a_perturbed_one(tiny_sd, tiny_classifier, tiny_clip,
                                                                    prompts_file, tmp_path):
    from diffusers import UNet2DConditionModel
    kwargs = dict(classifier=tiny_classifier, eval_prompts=prompts_file, eval_images=4, clip_model=tiny_clip)
    evaluate(tiny_sd, tmp_path, "base", **kwargs)
    base = str(tmp_path / "base" / "eval.json")
    same = evaluate(tiny_sd, tmp_path, "same", compare=base, **kwargs)
    assert all(v == pytest.approx(1.0, abs=1e-6) for r in same["prompts"] for v in r["clip_i_images"])
    unet, noise = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet"), torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if any(key in name for key in dd.TRAINABLE):  # what training changes, changed much
                p.add_(torch.randn(p.shape, generator=noise))
    unet.save_pretrained(tmp_path / "perturbed")
    other = evaluate(tiny_sd, tmp_path, "other", compare=base, unet=str(tmp_path / "perturbed"), **kwargs)
    assert other["overall"]["mean_clip_i"] < 1 - 1e-3  # random CLIPs see noise images as alike: a small margin
    assert all(v < 1 - 1e-5 for r in other["prompts"] for v in r["clip_i_images"])
    assert (tmp_path / "other" / "compare.png").exists()


def test_an_image_model_without_text_gives_clip_i_only(tiny_sd, tiny_classifier, prompts_file, tmp_path):
    """The toy world has no CLIP: its ViT classifier's [CLS] embedding serves CLIP-I through the same flag."""
    kwargs = dict(classifier=tiny_classifier, eval_prompts=prompts_file, eval_images=3, clip_model=tiny_classifier)
    evaluate(tiny_sd, tmp_path, "base", **kwargs)
    again = evaluate(tiny_sd, tmp_path, "again", compare=str(tmp_path / "base" / "eval.json"), **kwargs)
    assert all(r["clip_t"] is None and r["clip_i"] == pytest.approx(1.0, abs=1e-6) for r in again["prompts"])
    assert again["overall"]["mean_clip_t"] is None and dd.rewards.report_table(again).count(" - ") >= 2


def training_run(tmp_path, name, tiny_sd, tiny_classifier, *extra):
    from tests.test_cli import TINY
    out = tmp_path / name
    args = ["--model", tiny_sd, "--classifier", tiny_classifier, *TINY, "--epochs", "3", "--lr", "1e-3",
            "--save-every", "1", "--output-dir", str(out), *extra]
    assert dd.main([str(a) for a in args]) == 0
    with open(out / "metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f]
    return out, metrics, torch.load(out / "checkpoint.pt", weights_only=False)["weights"]


def test_eval_every_changes_no_training_result(tiny_sd, tiny_classifier, tiny_clip, tmp_path):
    plain, metrics, weights = training_run(tmp_path, "plain", tiny_sd, tiny_classifier)
    checked, metrics_checked, weights_checked = training_run(tmp_path, "checked", tiny_sd, tiny_classifier,
                                                             "--eval-every", "1", "--clip-model", tiny_clip)
    timing = lambda k: "seconds" in k or k == "images_per_second"
    strip = lambda ms: [{k: v for k, v in m.items() if not timing(k) and k != "held_out"} for m in ms]
    assert strip(metrics_checked) == strip(metrics)
    assert weights.keys() == weights_checked.keys() and all(torch.equal(weights[k], weights_checked[k]) for k in weights)
    assert any(m["grad_norm"] for m in metrics)  # the weights moved: the check ran between real updates
    held_out = [m["held_out"] for m in metrics_checked]
    for h in held_out:
        assert 0 <= h["none_rate"] <= 1 and -1 <= h["mean_clip_t"] <= 1 and -1 <= h["mean_clip_i"] <= 1 + 1e-6
        assert h["seconds"] > 0
    assert "held_out" not in metrics[0] and (checked / "held_out_reference.pt").exists()
    from PIL import Image
    assert Image.open(checked / "plot.png").height == 3 * Image.open(plain / "plot.png").height // 2  # 3 panels


def test_eval_every_resumes_against_the_same_reference(tiny_sd, tiny_classifier, tiny_clip, tmp_path):
    _, straight, _ = training_run(tmp_path, "straight", tiny_sd, tiny_classifier, "--eval-every", "1",
                                  "--clip-model", tiny_clip)
    out, _, _ = training_run(tmp_path, "resumed", tiny_sd, tiny_classifier, "--eval-every", "1", "--clip-model",
                             tiny_clip, "--epochs", "2")
    reference = (out / "held_out_reference.pt").read_bytes()
    assert dd.main(["--resume", str(out), "--epochs", "3"]) == 0
    with open(out / "metrics.jsonl") as f:
        resumed = [json.loads(line) for line in f]
    no_seconds = lambda ms: [{**m, "held_out": {k: v for k, v in m["held_out"].items() if k != "seconds"}}
                             for m in ms]
    timing = lambda ms: [{k: v for k, v in m.items() if "seconds" not in k and k != "images_per_second"} for m in ms]
    assert timing(no_seconds(resumed)) == timing(no_seconds(straight))
    assert (out / "held_out_reference.pt").read_bytes() == reference


@pytest.mark.parametrize("args, flag", [(["--eval-every", "-1"], "--eval-every"),
                                        (["--eval-every", "2", "--evaluate"], "--eval-every"),
                                        (["--clip-model", "x/y"], "--clip-model")])
def test_bad_quality_flags_are_one_line(tmp_path, capsys, args, flag):
    from tests.test_edges import one_error_line, run_main
    result = run_main(capsys, *args, "--output-dir", tmp_path / "run")
    assert one_error_line(result, flag), result.stderr
