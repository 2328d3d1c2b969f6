"""The pieces of ddpo_debias.py against references: diffusers' scheduler, torch.distributions, hand values."""
import pytest
import torch
from diffusers import DDIMScheduler

import ddpo_debias as dd
import rewards
from tests.fixtures import SD_SCHEDULER


@pytest.fixture
def scheduler():
    s = DDIMScheduler(**SD_SCHEDULER)
    s.set_timesteps(50)
    return s


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_step_matches_diffusers(scheduler, eta):
    g = torch.Generator().manual_seed(0)
    for t in scheduler.timesteps[[0, 10, 25, 49]]:  # first, middle and the last step (uses final_alpha_cumprod)
        latents, noise_pred, noise = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
        ref = scheduler.step(noise_pred, t, latents, eta=eta, variance_noise=noise).prev_sample
        _, _, mean, std = dd.ddim_step_with_logprob(scheduler, noise_pred, t, latents, eta)
        assert torch.allclose(mean + std * noise, ref, atol=1e-5)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])  # SD 2.1's scheduler: v, 1000 steps, either spacing
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_v_prediction_step_matches_diffusers_and_torch_distributions(spacing, eta):
    """SD 2.x: the UNet's output is v; the step gets ε̂ and x̂₀ from it, then is the same Gaussian (issue 36)."""
    scheduler = DDIMScheduler(**{**SD_SCHEDULER, "prediction_type": "v_prediction", "timestep_spacing": spacing})
    scheduler.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    for t in scheduler.timesteps[[0, 10, 25, 49]]:
        latents, v, noise = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
        ref = scheduler.step(v, t, latents, eta=eta, variance_noise=noise).prev_sample
        prev, log_prob, mean, std = dd.ddim_step_with_logprob(scheduler, v, t, latents, eta, noise=noise)
        assert torch.allclose(prev, ref, atol=1e-5)
        ref_mean = scheduler.step(v, t, latents, eta=eta, variance_noise=torch.zeros_like(v)).prev_sample
        ref_log_prob = torch.distributions.Normal(ref_mean.double(), std.double().expand_as(mean)).log_prob(
            prev.double()).mean(dim=(1, 2, 3))
        assert torch.allclose(log_prob.double(), ref_log_prob, atol=1e-5)
    epsilon = DDIMScheduler(**{**SD_SCHEDULER, "timestep_spacing": spacing})
    epsilon.set_timesteps(50)
    t = int(scheduler.timesteps[10])
    assert not torch.allclose(dd.ddim_step_with_logprob(epsilon, v, t, latents, eta)[2],
                              dd.ddim_step_with_logprob(scheduler, v, t, latents, eta)[2])  # v is not read as ε


def test_ddim_step_samples_from_generator_and_rescoring_agrees(scheduler):
    latents, noise_pred = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = scheduler.timesteps[5]
    prev_a, lp_a, _, _ = dd.ddim_step_with_logprob(scheduler, noise_pred, t, latents, generator=torch.Generator().manual_seed(1))
    prev_b, lp_b, _, _ = dd.ddim_step_with_logprob(scheduler, noise_pred, t, latents, generator=torch.Generator().manual_seed(1))
    assert torch.equal(prev_a, prev_b)
    _, lp_c, _, _ = dd.ddim_step_with_logprob(scheduler, noise_pred, t, latents, prev_latents=prev_a)
    assert torch.allclose(lp_a, lp_c) and torch.equal(lp_a, lp_b)


def test_log_prob_matches_torch_distributions_in_float64(scheduler):
    latents, noise_pred, prev = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    timesteps = scheduler.timesteps[[0, 7, 30, 49]]  # a LongTensor (B,): one step per sample
    _, log_prob, mean, std = dd.ddim_step_with_logprob(scheduler, noise_pred, timesteps, latents, prev_latents=prev)
    assert log_prob.shape == (4,)
    ref = torch.distributions.Normal(mean.double(), std.double().expand_as(mean)).log_prob(prev.double())
    assert torch.allclose(log_prob.double(), ref.mean(dim=(1, 2, 3)), atol=1e-5)
    for i, t in enumerate(timesteps):  # per-sample timesteps give the same as one timestep at a time
        _, lp_i, _, _ = dd.ddim_step_with_logprob(scheduler, noise_pred[i:i + 1], int(t), latents[i:i + 1], prev_latents=prev[i:i + 1])
        assert torch.allclose(lp_i, log_prob[i:i + 1])


def test_eta_must_be_positive(scheduler):
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="eta"):
        dd.ddim_step_with_logprob(scheduler, x, scheduler.timesteps[0], x, eta=0.0)


@pytest.mark.parametrize("num_steps, share", [(5, 0.95), (20, 0.75), (50, 0.53)])
def test_the_last_two_steps_hold_most_of_the_gradient_noise(num_steps, share):
    """Why --skip-final-steps is 2. A step's log-prob gradient is, per unit of change in ε̂, z·∂μ/∂ε̂/σ_t: noise of
    std g_t = |∂μ/∂ε̂|/σ_t. On SD's schedule the steps into t = 1 and t = 0 have σ_t of 0.04 and 0.02 and hold
    95%, 75% and 53% of Σ g_t² at T = 5, 20 and 50 (if every step's ε̂ moves alike), though the image is finished."""
    scheduler = DDIMScheduler(**SD_SCHEDULER)
    scheduler.set_timesteps(num_steps)
    gains = []
    for t in scheduler.timesteps:
        noise_pred = torch.zeros(1, 1, 1, 1, requires_grad=True)
        _, _, mean, std = dd.ddim_step_with_logprob(scheduler, noise_pred, t, torch.zeros(1, 1, 1, 1))
        (dmean,) = torch.autograd.grad(mean.sum(), noise_pred)  # ∂μ/∂ε̂, by autograd through our own step
        gains.append((dmean.abs() / std).item())
    squares = torch.tensor(gains) ** 2
    assert squares[-2:].sum() / squares.sum() == pytest.approx(share, abs=0.01)
    assert max(gains) == gains[-2] and std.item() < 0.03  # the step into t = 1 is the noisiest; σ of the last


def test_gaussian_kl_matches_torch_distributions():
    mean_old, mean_new, std = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.full((3, 1, 1, 1), 0.3)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mean_old.double(), 0.3),
                                            torch.distributions.Normal(mean_new.double(), 0.3)).mean(dim=(1, 2, 3))
    assert torch.allclose(dd.gaussian_kl(mean_old, mean_new, std).double(), ref, atol=1e-6)


def _grad(loss_fn, log_prob, *args):
    lp = torch.tensor(log_prob, requires_grad=True)
    loss, stats = loss_fn(lp, *args)
    loss.backward()
    return loss.item(), lp.grad, stats


def test_ppo_clip_values_and_gradients():
    eps = 0.1
    old, adv = torch.zeros(4), torch.tensor([1.0, 1.0, -1.0, -1.0])
    log_prob = [0.2, 0.05, -0.2, 0.05]  # r = e^0.2 (beyond 1+ε, A>0), inside, e^-0.2 (below 1-ε, A<0), inside
    loss, grad, stats = _grad(dd.ppo_clip_loss, log_prob, old, adv, eps)
    r = torch.exp(torch.tensor(log_prob))
    expected = torch.stack([-1.1 * torch.ones(()), -r[1], 0.9 * torch.ones(()), r[3]]).mean()
    assert loss == pytest.approx(expected.item(), abs=1e-6)
    # beyond the clip in the improving direction: zero gradient; inside: d(-A·r)/dlogp = -A·r / 4
    assert grad[0] == 0 and grad[2] == 0
    assert grad[1] == pytest.approx(-r[1].item() / 4) and grad[3] == pytest.approx(r[3].item() / 4)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    assert stats["approx_kl"].item() == pytest.approx(0.5 * sum(x * x for x in log_prob) / 4)


def test_truly_ppo_rollback_exactly_where_kl_over_threshold_and_improving():
    delta, alpha = 0.01, 2.0
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0])
    kl = torch.tensor([0.02, 0.005, 0.02, 0.02], requires_grad=True)
    log_prob = [0.1, 0.1, -0.1, -0.1]
    # sample 0: KL ≥ δ and r·A > A (r > 1, A > 0) -> rollback; 1: KL < δ; 2: r < 1 with A > 0 -> r·A < A;
    # 3: A < 0 and r < 1 -> r·A = -r > -1 = A -> rollback
    lp = torch.tensor(log_prob, requires_grad=True)
    loss, stats = dd.truly_ppo_loss(lp, old, adv, kl, delta, alpha)
    loss.backward()
    r = torch.exp(torch.tensor(log_prob))
    rolled = torch.tensor([True, False, False, True])
    objective = r * adv - torch.where(rolled, alpha * kl.detach(), torch.zeros(4))
    assert loss.item() == pytest.approx(-objective.mean().item(), abs=1e-6)
    assert torch.allclose(kl.grad, torch.where(rolled, alpha / 4, 0.0))  # the rollback term is present only there
    assert torch.allclose(lp.grad, -adv * r / 4)  # the surrogate's gradient everywhere, no clipping
    assert stats["rollback_frac"].item() == pytest.approx(0.5)


def test_losses_share_signature_and_are_zero_advantage_invariant():
    lp, old, adv = torch.randn(5), torch.randn(5), torch.zeros(5)
    for loss, _ in (dd.ppo_clip_loss(lp, old, adv, 1e-4), dd.truly_ppo_loss(lp, old, adv, torch.ones(5), 1e-4, 100.0)):
        assert loss.item() == 0.0


def test_advantages_standardised_and_clipped():
    one = rewards.PromptHistory(["p"], 4)
    a = dd.compute_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.zeros(4, dtype=torch.long), one, adv_clip=5.0)
    assert a.mean().abs() < 1e-6 and a.std().item() == pytest.approx(1.0, abs=1e-5)
    outlier = dd.compute_advantages(torch.tensor([0.0] * 99 + [1.0]), torch.zeros(100, dtype=torch.long), one, 5.0)
    assert outlier.max().item() == 5.0


def test_sample_shapes_and_onpolicy_ratio_is_one(tiny_sd):
    config = dd.Config(model=tiny_sd, batch_size=3, num_steps=4, mixed_precision="no")
    unet, vae, text_encoder, tokenizer, scheduler = dd.load_models(config, "cpu")
    embeds = dd.encode_prompts(text_encoder, tokenizer, [config.prompt], "cpu")
    assert embeds.shape == (2, 77, 32)
    ids = torch.zeros(3, dtype=torch.long)
    s = dd.sample(unet, vae, scheduler, embeds, ids, config, "cpu", torch.Generator().manual_seed(0))
    assert s["latents"].shape == (3, 5, 4, 8, 8) and s["log_probs"].shape == (3, 4)
    assert s["means"].shape == (3, 4, 4, 8, 8) and s["images"].shape == (3, 3, 16, 16)
    assert 0 <= s["images"].min() and s["images"].max() <= 1
    # re-scoring a stored step with the same weights gives the stored log-prob: r = 1 before any update
    k = torch.tensor([2, 0, 3])
    idx = torch.arange(3)
    with torch.no_grad():
        eps = dd.guided_noise_pred(unet, s["latents"][idx, k], s["timesteps"][k], embeds, ids, config.guidance_scale)
    _, lp, mean, std = dd.ddim_step_with_logprob(scheduler, eps, s["timesteps"][k], s["latents"][idx, k],
                                                 prev_latents=s["latents"][idx, k + 1])
    assert torch.allclose(lp, s["log_probs"][idx, k], atol=1e-5)
    assert dd.gaussian_kl(s["means"][idx, k], mean, std).max() < 1e-8


def test_only_attention_projections_are_trainable(tiny_sd):
    config = dd.Config(model=tiny_sd, mixed_precision="bf16")
    unet = dd.load_models(config, "cpu")[0]
    names = dd.trainable_parameters(unet)
    assert names and all(any(k in n for k in ("to_q", "to_k", "to_v", "to_out.0")) for n in names)
    n_attn = sum(1 for n, _ in unet.named_parameters() if ".to_q." in f".{n}" or "to_out.0" in n)
    assert len(names) >= n_attn
    for n, p in unet.named_parameters():
        assert p.dtype == (torch.float32 if n in names else torch.bfloat16), n
