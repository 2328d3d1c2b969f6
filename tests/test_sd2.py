"""SD 2.x as the policy (issue 36): a tiny SD 2-style pipeline whose scheduler predicts v. The sampler's first step
equals diffusers' own pipeline's from the same seed; the CLI trains it, resumes, and saves a UNet that the
pipeline loads and samples with. The step itself is checked against diffusers in tests/test_ddpo.py."""
import json
import shutil

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

import ddpo_debias as dd
from tests.test_edges import run_main
from tests.test_cli import TINY, read_metrics


@pytest.fixture(scope="module")
def tiny_sd2(tiny_sd, tmp_path_factory):
    """The tiny SD with SD 2.1's kind of scheduler: prediction_type v_prediction."""
    model = tmp_path_factory.mktemp("sd2") / "tiny-sd2"
    shutil.copytree(tiny_sd, model)
    path = model / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": "v_prediction"}))
    return model


def pipeline(model, unet=None):
    return StableDiffusionPipeline.from_pretrained(model, scheduler=DDIMScheduler.from_pretrained(
        model, subfolder="scheduler"), safety_checker=None, requires_safety_checker=False,
        **({"unet": unet} if unet else {}))


def pipeline_steps(pipe, prompt="a face", steps=3, seed=3):
    """The latents after each of a diffusers pipeline's DDIM steps (guidance 5, η = 1, one seeded generator)."""
    seen = []

    def keep(pipe, i, t, kwargs):
        seen.append(kwargs["latents"].clone())
        return kwargs
    pipe(prompt, num_inference_steps=steps, guidance_scale=5.0, eta=1.0, generator=torch.Generator().manual_seed(seed),
         output_type="latent", callback_on_step_end=keep)
    return seen


def test_the_samplers_first_step_is_the_pipelines(tiny_sd2):
    """Same seed, same prompt, guidance 5, η = 1: x_T and then the step's noise come from one generator in the same
    order in both, so x_{T-1} agrees to float rounding."""
    pipe = pipeline(tiny_sd2)
    seen = pipeline_steps(pipe)
    config = dd.Config(batch_size=1, num_steps=3, guidance_scale=5.0, eta=1.0, mixed_precision="no", device="cpu",
                       train_batch_size=1)
    embeds = dd.encode_prompts(pipe.text_encoder, pipe.tokenizer, ["a face"], "cpu")
    scheduler = dd.schedule_on_device(DDIMScheduler.from_pretrained(tiny_sd2, subfolder="scheduler"), "cpu")
    ours = dd.sample(pipe.unet.eval(), pipe.vae, scheduler, embeds, torch.zeros(1, dtype=torch.long), config, "cpu",
                     torch.Generator().manual_seed(3))
    assert scheduler.config.prediction_type == "v_prediction"
    assert torch.allclose(ours["latents"][:, 1], seen[0], atol=1e-5)
    assert torch.allclose(ours["latents"][:, -1], seen[-1], atol=1e-4)  # and so on to x_0


def train_and_resume(capsys, model, classifier, out):
    """The CLI: 2 epochs of --reward shift on `model` saved every epoch, then --resume to 3 -> the UNet it saved."""
    args = ["--model", model, "--classifier", classifier, *TINY, "--reward", "shift", "--save-every", "1"]
    result = run_main(capsys, *args, "--output-dir", out)
    assert result.returncode == 0, result.stderr[-2000:]
    result = run_main(capsys, "--resume", out, "--epochs", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = read_metrics(out)
    assert [m["epoch"] for m in metrics] == [0, 1, 2] and all(m["loss"] is not None for m in metrics)
    return UNet2DConditionModel.from_pretrained(out / "unet")


def test_the_cli_trains_resumes_and_saves_a_unet_the_pipeline_samples_with(tiny_sd2, tiny_classifier, tmp_path,
                                                                           capsys):
    unet = train_and_resume(capsys, tiny_sd2, tiny_classifier, tmp_path / "run")
    image = pipeline(tiny_sd2, unet)("a face", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 16, 16, 3) and bool(torch.isfinite(torch.tensor(image)).all())


def test_the_start_up_line_names_sd2_with_v_prediction(tiny_sd2):
    _, _, text_encoder, _, scheduler = dd.load_models(dd.Config(model=str(tiny_sd2), mixed_precision="no"), "cpu")
    assert dd.family_of(text_encoder, scheduler) == "SD 2.x (v-prediction)"
