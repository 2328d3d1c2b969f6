"""SDXL as the policy (issue 36), on a tiny SDXL pipeline built from the real classes (tests.fixtures.make_tiny_sdxl):
it is recognised from its folder with no flag, conditioned as diffusers' StableDiffusionXLPipeline conditions it,
its sampler's steps equal that pipeline's from the same seed, and the CLI trains, resumes and saves a UNet that the
pipeline loads and samples with."""
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

import ddpo_debias as dd
from tests.fixtures import make_tiny_sdxl
from tests.test_sd2 import pipeline_steps, train_and_resume


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return make_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


def pipeline(model, unet=None):
    """diffusers' SDXL pipeline with DDIM in place of its Euler scheduler, built from the same scheduler file."""
    return StableDiffusionXLPipeline.from_pretrained(model, scheduler=DDIMScheduler.from_pretrained(
        model, subfolder="scheduler"), **({"unet": unet} if unet else {}))


def test_an_sdxl_folder_is_recognised_and_only_its_attention_trains(tiny_sdxl, tiny_sd):
    unet, vae, text_encoder, tokenizer, scheduler = dd.load_models(dd.Config(model=str(tiny_sdxl),
                                                                             mixed_precision="no"), "cpu")
    assert isinstance(text_encoder, dd.TextEncodersXL) and len(tokenizer) == 2
    assert text_encoder.image_size == 16 and text_encoder.zeros_for_empty  # 8 latents x 2 (two VAE blocks)
    assert type(scheduler).__name__ == "DDIMScheduler"  # from SDXL's Euler file
    trained = dd.trainable_parameters(unet)
    assert trained and all(any(key in f".{name}" for key in dd.TRAINABLE) for name in trained)
    assert not any(name.startswith("add_embedding") for name in trained)  # the added conditions' layers: frozen
    sd15 = dd.load_models(dd.Config(model=str(tiny_sd), mixed_precision="no"), "cpu")
    assert not isinstance(sd15[2], dd.TextEncodersXL)  # SD 1.5: one text encoder, as before
    assert dd.family_of(text_encoder, scheduler) == "SDXL (ε-prediction)"  # the start-up line names the family
    assert dd.family_of(sd15[2], sd15[4]) == "SD 1.x or 2.x-base (ε-prediction)"


def test_under_fp16_the_sdxl_vae_stays_fp32(tiny_sdxl):
    """SDXL's VAE overflows in fp16 (its config says force_upcast): kept fp32, and decode runs it without autocast."""
    _, vae, text_encoder, _, _ = dd.load_models(dd.Config(model=str(tiny_sdxl), mixed_precision="fp16"), "cpu")
    assert vae.dtype == torch.float32 and text_encoder.second.dtype == torch.float16
    images = dd.decode(vae, torch.randn(2, 4, 8, 8), dd.Config(mixed_precision="fp16", train_batch_size=2), "cpu")
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32


def test_the_conditioning_is_the_pipelines(tiny_sdxl):
    """encode_prompts_xl against StableDiffusionXLPipeline.encode_prompt and _get_add_time_ids: the prompt's row,
    and the unconditional row as zeros (force_zeros_for_empty_prompt)."""
    pipe = pipeline(tiny_sdxl)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt("a face", device="cpu")
    _, _, text_encoder, tokenizer, _ = dd.load_models(dd.Config(model=str(tiny_sdxl), mixed_precision="no"), "cpu")
    ours = dd.encode_prompts_xl(text_encoder, tokenizer, ["a face"], "cpu")
    assert torch.allclose(ours["encoder_hidden_states"][1], embeds[0], atol=1e-5)
    assert torch.allclose(ours["text_embeds"][1], pooled[0], atol=1e-5)
    assert torch.equal(ours["encoder_hidden_states"][0], negative[0]) and not negative.any()
    assert torch.equal(ours["text_embeds"][0], negative_pooled[0])
    time_ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), torch.float32, text_encoder_projection_dim=32)
    assert torch.equal(ours["time_ids"], time_ids.expand(2, 6))


def test_the_samplers_steps_are_the_pipelines(tiny_sdxl):
    """Same seed, same prompt, guidance 5, η = 1: x_T and each step's noise come from one generator in the same
    order in both, so x_{T-1} agrees to float rounding, and so on to x_0."""
    pipe = pipeline(tiny_sdxl)
    seen = pipeline_steps(pipe)
    config = dd.Config(batch_size=1, num_steps=3, guidance_scale=5.0, eta=1.0, mixed_precision="no", device="cpu",
                       train_batch_size=1)
    _, _, text_encoder, tokenizer, scheduler = dd.load_models(dd.Config(model=str(tiny_sdxl), mixed_precision="no"),
                                                              "cpu")
    embeds = dd.encode_for(text_encoder, tokenizer, ["a face"], "cpu")
    ours = dd.sample(pipe.unet.eval(), pipe.vae, scheduler, embeds, torch.zeros(1, dtype=torch.long), config, "cpu",
                     torch.Generator().manual_seed(3))
    assert torch.allclose(ours["latents"][:, 1], seen[0], atol=1e-5)
    assert torch.allclose(ours["latents"][:, -1], seen[-1], atol=1e-4)


def test_the_cli_trains_resumes_and_saves_a_unet_the_sdxl_pipeline_samples_with(tiny_sdxl, tiny_classifier,
                                                                                 tmp_path, capsys):
    unet = train_and_resume(capsys, tiny_sdxl, tiny_classifier, tmp_path / "run")
    base = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    changed = [name for name, p in unet.named_parameters() if not torch.equal(p, base.get_parameter(name))]
    assert changed and all(any(key in f".{name}" for key in dd.TRAINABLE) for name in changed)
    image = pipeline(tiny_sdxl, unet)("a face", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 16, 16, 3) and bool(torch.isfinite(torch.tensor(image)).all())


def test_a_fixed_vae_stays_in_fp16(tiny_sdxl, tmp_path):
    """A VAE whose config does not ask for the upcast (SDXL's fp16-fixed VAEs, placed as the pipeline's vae/) keeps
    the mixed-precision type."""
    import json
    import shutil
    model = tmp_path / "fixed"
    shutil.copytree(tiny_sdxl, model)
    path = model / "vae" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "force_upcast": False}))
    assert dd.load_models(dd.Config(model=str(model), mixed_precision="fp16"), "cpu")[1].dtype == torch.float16
