"""SD 3.x as the policy (issue 44): Flow-GRPO's SDE step against a float64 transcription of its formula and, as its
noise goes to 0, against diffusers' Euler step; the conditioning and the trajectory against StableDiffusion3Pipeline's
on a tiny SD 3 pipeline built from the real classes; the CLI trains, resumes, saves a transformer the pipeline loads,
and evaluates; FLUX and schedules the step does not take are refused with one line."""
import json
import math
import os

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

import ddpo_debias as dd
from tests.fixtures import SD3_SCHEDULER, make_tiny_sd3
from tests.test_edges import one_error_line, run_main

TINY = ["--epochs", "2", "--batch-size", "4", "--num-steps", "4", "--mixed-precision", "no", "--reward", "shift"]


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    return make_tiny_sd3(str(tmp_path_factory.mktemp("sd3") / "tiny-sd3"))


@pytest.fixture(scope="module")
def tiny_sd3_no_t5(tmp_path_factory):
    return make_tiny_sd3(str(tmp_path_factory.mktemp("sd3") / "tiny-sd3-no-t5"), t5=False)


def flow_grpo_step(sigmas, index, v, x, x_next, noise_level):
    """Flow-GRPO's sde_step_with_logprob (flow_grpo/diffusers_patch/sd3_sde_with_logprob.py), transcribed in float64:
    -> x_next's log-prob (mean over elements), the mean, and the std σ_t·√(-dt)."""
    v, x, x_next = v.double(), x.double(), x_next.double()
    sigma, sigma_prev = sigmas[index].double().view(-1, 1, 1, 1), sigmas[index + 1].double().view(-1, 1, 1, 1)
    sigma_max = sigmas[1].double()
    dt = sigma_prev - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
    mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    std = std_dev_t * torch.sqrt(-1 * dt)
    log_prob = -((x_next - mean) ** 2) / (2 * std**2) - torch.log(std) - torch.log(torch.sqrt(torch.tensor(2 * math.pi,
                                                                                                         dtype=torch.float64)))
    return log_prob.mean(dim=(1, 2, 3)), mean, std


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_flow_step_matches_flow_grpo_in_float64(eta):
    scheduler = FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER)
    scheduler.set_timesteps(10)
    assert scheduler.sigmas[0] == 1 and scheduler.sigmas[-1] == 0  # the first step at σ = 1, the last into σ = 0
    g = torch.Generator().manual_seed(0)
    for index in ([0], [4], [9], [0, 4, 9]):  # σ = 1 (the substitution), a middle step, the last; and mixed rows
        index = torch.tensor(index)
        x, v, z = (torch.randn(len(index), 16, 4, 4, generator=g) for _ in range(3))
        t = scheduler.timesteps[index]
        x_next, log_prob, mean, std = dd.flow_step_with_logprob(scheduler, v, t, x, eta, noise=z)
        ref_log_prob, ref_mean, ref_std = flow_grpo_step(scheduler.sigmas, index, v, x, x_next, dd.FLOW_NOISE * eta)
        assert torch.allclose(mean.double(), ref_mean, atol=1e-5) and torch.allclose(std.double(), ref_std, rtol=1e-6)
        assert torch.allclose(log_prob.double(), ref_log_prob, atol=1e-4)
        assert torch.allclose(x_next, mean + std * z)
        normal = torch.distributions.Normal(mean.double(), std.double().expand_as(mean))
        assert torch.allclose(log_prob.double(), normal.log_prob(x_next.double()).mean(dim=(1, 2, 3)), atol=1e-4)
        rescored = dd.flow_step_with_logprob(scheduler, v, t, x, eta, prev_latents=x_next)[1]
        assert torch.equal(rescored, log_prob)
    with pytest.raises(ValueError):
        dd.flow_step_with_logprob(scheduler, v, t, x, 0.0)


def test_flow_step_mean_is_diffusers_euler_step_as_the_noise_goes_to_zero():
    scheduler = FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER)
    scheduler.set_timesteps(8)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 4, 4, generator=g)
    gaps = []
    for t in scheduler.timesteps:
        v = torch.randn(2, 16, 4, 4, generator=g)
        euler = scheduler.step(v, t, x).prev_sample  # diffusers' ODE step (its own step counter)
        means = [dd.flow_step_with_logprob(scheduler, v, t, x, eta, noise=torch.zeros_like(x))[2] for eta in (1e-3, 1e-6)]
        gaps.append([(m - euler).abs().max().item() for m in means])
        assert torch.allclose(means[1], euler, atol=1e-5)
        x = euler
    assert all(small <= large for large, small in gaps)  # the gap shrinks with a


def test_only_attention_projections_train_and_the_ddpm_models_train_what_they_did(tiny_sd3, tiny_sd):
    config = dd.Config(model=tiny_sd3, mixed_precision="bf16")
    transformer = dd.load_models(config, "cpu")[0]
    names = dd.trainable_parameters(transformer)
    kinds = {key for name in names for key in dd.TRAINABLE if key in f".{name}"}
    assert kinds == set(dd.TRAINABLE)  # the image stream's projections and the joint attention's text stream's
    for name, p in transformer.named_parameters():
        assert p.dtype == (torch.float32 if name in names else torch.bfloat16), name
    unet = dd.load_models(dd.Config(model=tiny_sd, mixed_precision="no"), "cpu")[0]
    old_keys = (".to_q.", ".to_k.", ".to_v.", ".to_out.0.")  # before SD 3: the UNet has no add_*_proj
    assert set(dd.trainable_parameters(unet)) == {n for n, _ in unet.named_parameters()
                                                  if any(k in f".{n}" for k in old_keys)}


@pytest.mark.parametrize("with_t5", [True, False])
def test_conditioning_equals_the_pipelines(tiny_sd3, tiny_sd3_no_t5, with_t5):
    path = tiny_sd3 if with_t5 else tiny_sd3_no_t5
    config = dd.Config(model=path, mixed_precision="no")
    _, _, encoders, tokenizers, _ = dd.load_models(config, "cpu")
    embeds = dd.encode_for(encoders, tokenizers, ["photo of a face", "a nurse"], "cpu")
    pipe = StableDiffusion3Pipeline.from_pretrained(path, **({} if with_t5 else {"text_encoder_3": None,
                                                                                 "tokenizer_3": None}))
    same = lambda a, b: torch.allclose(a, b, atol=1e-5)  # one prompt at a time there, 1+P rows here: fp32 rounding
    for row, prompt in ((1, "photo of a face"), (2, "a nurse")):
        with torch.no_grad():
            cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(prompt, None, None, device="cpu",
                                                                     negative_prompt="")
        assert same(embeds["encoder_hidden_states"][row], cond[0]) and same(embeds["text_embeds"][row], pooled[0])
        assert same(embeds["encoder_hidden_states"][0], uncond[0]) and same(embeds["text_embeds"][0], uncond_pooled[0])
    other = pipe.encode_prompt("a nurse", None, None, device="cpu", negative_prompt="")[0]
    assert not same(embeds["encoder_hidden_states"][1], other[0])  # the prompts differ: the check can fail
    assert embeds["encoder_hidden_states"].shape == (3, 77 + dd.T5_TOKENS, 32)
    if not with_t5:
        assert (embeds["encoder_hidden_states"][:, 77:] == 0).all()


def test_the_sampler_at_small_noise_follows_the_pipelines_trajectory(tiny_sd3):
    config = dd.Config(model=tiny_sd3, mixed_precision="no", batch_size=2, num_steps=6, eta=1e-7, guidance_scale=4.0)
    transformer, vae, encoders, tokenizers, scheduler = dd.load_models(config, "cpu")
    embeds = dd.encode_for(encoders, tokenizers, [config.prompt], "cpu")
    samples = dd.sample(transformer, vae, scheduler, embeds, torch.zeros(2, dtype=torch.long), config, "cpu",
                        torch.Generator().manual_seed(3))
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    latents = pipe(config.prompt, num_images_per_prompt=2, num_inference_steps=6, guidance_scale=4.0, negative_prompt="",
                   generator=torch.Generator().manual_seed(3), output_type="latent").images
    assert torch.allclose(samples["latents"][:, -1], latents, atol=1e-4), (samples["latents"][:, -1] - latents).abs().max()
    images = pipe.image_processor.postprocess(pipe.vae.decode(latents / pipe.vae.config.scaling_factor
                                                              + pipe.vae.config.shift_factor).sample, output_type="pt")
    assert torch.allclose(samples["images"], images, atol=1e-4)  # decode's shift, as the pipeline's
    assert samples["log_probs"].shape == (2, 6) and torch.isfinite(samples["log_probs"]).all()


def test_cli_trains_resumes_saves_a_transformer_the_pipeline_samples_with_and_evaluates(tiny_sd3, tiny_classifier,
                                                                                       tmp_path, capsys):
    out = tmp_path / "run"
    result = run_main(capsys, "--model", tiny_sd3, "--classifier", tiny_classifier, *TINY, "--output-dir", out,
                      "--save-every", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["family"].startswith("SD 3.x") and config["clip_range"] == pytest.approx(1.28e-2 / 32)
    first = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    resumed = run_main(capsys, "--resume", out, "--epochs", "3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1, 2] and all(m["loss"] is not None for m in metrics)
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() != first  # epoch 3 trained
    transformer = SD3Transformer2DModel.from_pretrained(out / "unet")
    base = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer")
    moved = {n for n, p in transformer.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])}
    assert moved and all(any(k in f".{n}" for k in dd.TRAINABLE) for n in moved)  # only attention projections
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, transformer=transformer)
    images = pipe("photo of a face", num_inference_steps=3, output_type="pt").images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    evaluated = run_main(capsys, "--evaluate", "--model", tiny_sd3, "--unet", out / "unet", "--classifier",
                         tiny_classifier, "--mixed-precision", "no", "--num-steps", "3", "--eval-images", "2",
                         "--clip-model", "none", "--output-dir", tmp_path / "eval")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["prompts"]


def test_flux_and_untaken_schedules_are_refused_in_one_line(tiny_sd3, tiny_classifier, tmp_path, capsys):
    import shutil
    flux = tmp_path / "flux"
    shutil.copytree(tiny_sd3, flux)
    index = json.loads((flux / "model_index.json").read_text())
    (flux / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    result = run_main(capsys, "--model", flux, "--classifier", tiny_classifier, *TINY, "--output-dir", tmp_path / "a")
    assert one_error_line(result, "--model") and "FluxPipeline" in result.stderr and not (tmp_path / "a").exists()
    dynamic = tmp_path / "dynamic"
    shutil.copytree(tiny_sd3, dynamic)
    (dynamic / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", **SD3_SCHEDULER, "use_dynamic_shifting": True}))
    result = run_main(capsys, "--model", dynamic, "--classifier", tiny_classifier, *TINY, "--output-dir", tmp_path / "b")
    assert one_error_line(result, "--model") and "use_dynamic_shifting" in result.stderr
    result = run_main(capsys, "--model", tiny_sd3, "--unet", os.path.join(tiny_sd3, "vae"), "--classifier",
                      tiny_classifier, *TINY, "--output-dir", tmp_path / "c")
    assert one_error_line(result, "--unet") and "SD3Transformer2DModel" in result.stderr


def test_update_memory_counts_the_transformer_as_a_real_micro_batch_allocates(tiny_sd3):
    """--train-batch-size auto's count (fake weights) against the same count on the real tiny transformer."""
    config = dd.Config(model=tiny_sd3, mixed_precision="no", batch_size=2, num_steps=4, device="cpu")
    transformer, vae, encoders, tokenizers, scheduler = dd.load_models(config, "cpu")
    embeds = dd.encode_for(encoders, tokenizers, [config.prompt], "cpu")
    samples = dd.sample(transformer, vae, scheduler, embeds, torch.zeros(2, dtype=torch.long), config, "cpu",
                        torch.Generator().manual_seed(0))
    counted = dd.update_memory(transformer, scheduler, embeds, config, (1, 2))
    for b in (1, 2):
        tracker = dd.LiveBytes()
        with tracker:
            log_prob = dd.policy_step(transformer, scheduler, embeds, samples, torch.arange(b),
                                      torch.zeros(b, dtype=torch.long), config)[0]
            dd.ppo_clip_loss(log_prob, log_prob.detach(), torch.ones(b), 1e-4)[0].backward()
            del log_prob
        transformer.zero_grad(set_to_none=True)
        assert counted[b] == pytest.approx(tracker.peak, rel=0.1), b


def test_the_counted_sd35_transformers_have_the_published_sizes():
    """tests.random_sd15's SD 3.5 configs (docs/memory/sd35-*-count.txt) against the published 2.5B and 8.1B: the
    weights and the position-embedding buffer that their safetensors hold."""
    from tests import random_sd15
    for size, billions in (("medium", 2.5), ("large", 8.1)):
        with torch.device("meta"):
            transformer = random_sd15.sd35_models(size)[0]
        stored = sum(t.numel() for t in transformer.state_dict().values()) / 1e9
        assert stored == pytest.approx(billions, abs=0.05), size
