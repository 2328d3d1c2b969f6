"""Quality next to bias in --evaluate (Shen et al., ICLR 2024): CLIP-T and CLIP-I from --clip-model, checked against
a hand computation with get_image_features / get_text_features on the tests' tiny CLIP; CLIP-I of a model with
itself is 1 and of a perturbed UNet less; an image model without a text tower gives CLIP-I only."""
import pytest
import torch
import torch.nn.functional as F

import ddpo_debias as dd
from tests.test_evaluate import evaluate

PROMPTS = ["photo of the face of a nurse", "photo of the face of a pilot"]


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


def test_clip_t_is_the_cosine_of_get_image_features_and_get_text_features(tiny_sd, tiny_clip, prompts_file, tmp_path):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel
    seen = []
    scorer = lambda images: seen.append(images) or torch.full((images.shape[0],), 0.9)
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
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".to_v." in name:
                p.add_(0.5 * torch.randn_like(p))
    unet.save_pretrained(tmp_path / "perturbed")
    other = evaluate(tiny_sd, tmp_path, "other", compare=base, unet=str(tmp_path / "perturbed"), **kwargs)
    assert other["overall"]["mean_clip_i"] < 1 - 1e-3
    assert all(v < 1 - 1e-4 for r in other["prompts"] for v in r["clip_i_images"])
    assert (tmp_path / "other" / "compare.png").exists()


def test_an_image_model_without_text_gives_clip_i_only(tiny_sd, tiny_classifier, prompts_file, tmp_path):
    """The toy world has no CLIP: its ViT classifier's [CLS] embedding serves CLIP-I through the same flag."""
    kwargs = dict(classifier=tiny_classifier, eval_prompts=prompts_file, eval_images=3, clip_model=tiny_classifier)
    evaluate(tiny_sd, tmp_path, "base", **kwargs)
    again = evaluate(tiny_sd, tmp_path, "again", compare=str(tmp_path / "base" / "eval.json"), **kwargs)
    assert all(r["clip_t"] is None and r["clip_i"] == pytest.approx(1.0, abs=1e-6) for r in again["prompts"])
    assert again["overall"]["mean_clip_t"] is None and dd.rewards.report_table(again).count(" - ") >= 2
