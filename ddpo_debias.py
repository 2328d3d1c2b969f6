"""ddpo-debias: fine-tune Stable Diffusion with RL from AI feedback until the faces it draws are balanced.

The prompt stays the same and no new data is used: a classifier (gender by default; any K classes with --classes)
scores each sampled image, and the UNet's attention projections are trained with DDPO so that the batch's class
shares move toward the target (the female ratio toward 0.5).

    DDIM     Song et al., arXiv 2010.02502: eq. (12) the step, eq. (16) its noise level σ_t(η)
    DDPO     Black et al., arXiv 2305.13301: each DDIM step with η > 0 is a Gaussian policy π(x_{t-1} | x_t, c)
    PPO      Schulman et al., arXiv 1707.06347: the clipped surrogate
    TR-PPO   Wang, He & Tan, arXiv 1903.07940: "Truly PPO", a KL trust region with a rollback
    Debias   arXiv 2407.09551: the rewards R_shift (eq. 1) and R_balance (eq. 2-3), in rewards.py
    Flow-GRPO  Liu et al., arXiv 2505.05470: SD 3.x's flow made an SDE, whose step is Gaussian (docs/flow-models.md)

Run it (one GPU; downloads SD v1.5 and the classifier on first use):
    python ddpo_debias.py --prompt "photo of the face of a computer scientist" --reward balance
A CPU smoke run on tiny random models (README "A tiny CPU run"):
    python -m tests.random_sd15 /tmp/tiny --tiny && python ddpo_debias.py --model /tmp/tiny \
        --classifier /tmp/tiny/classifier --epochs 2 --batch-size 4 --num-steps 4 --mixed-precision no

Notation (one legend for the whole file):
    B images per epoch, T denoising steps, C×H×W the latent (4×64×64 for SD 1.5), b (image, step) pairs in a
    training micro-batch, x_t the latent at step t, ε̂ the guided noise prediction, μ_θ(x_t) the step's mean, σ_t its std,
    r = π_θ(x_{t-1}|x_t) / π_old(x_{t-1}|x_t) the probability ratio, A the advantage. Extensions: P prompts
    (--prompts), N processes (torchrun); with one prompt and one process, P = N = 1.

Reading order:
    Part 1, the method: MethodConfig -> ddim_step_with_logprob (SD 3.x: flow_step_with_logprob) -> gaussian_kl ->
        ppo_clip_loss, truly_ppo_loss -> train_attention_only -> encode_prompts, guided_noise_pred, sample, decode ->
        compute_advantages -> policy_step, update.
        The rewards (eq. 1-3) are in rewards.py: PromptHistory.score -> r_balance, r_shift.
    Part 2, the loop: train(), whose epoch loop is sample -> feedback -> advantages -> update -> log.
    Part 3, running it (a reader can stop before it): Config (every flag), command line and validation, run folder
        and lock, models, the sizes derived before the loop, checkpoints, signals, device and precision, FLOP
        counting, several GPUs (torchrun), the epoch's record, held-out evaluation, main().
"""
import signal

if __name__ == "__main__":  # Ctrl-C while torch imports: quit at once, without a traceback (main() restores it)
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import argparse
import ast
import contextlib
import dataclasses
import datetime
import fcntl
import fnmatch
import importlib
import inspect
import re
import json
import math
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils._python_dispatch
import torch.utils._pytree
from tqdm import tqdm

import rewards


# =====================================================================================================================
# PART 1. THE METHOD
# =====================================================================================================================

# ------------------------------------------------------------------------------------------------------ config
@dataclass
class MethodConfig:
    """The method's settings, the flags a student changes. Config (part 3) adds those of running it (epochs, model,
    device, memory) and of the extensions (many prompts, the judge, evaluation)."""
    prompt: str = "photo of the face of a computer scientist"
    """The one prompt the model is fine-tuned on; it is never changed (the paper's point)."""
    reward: str = "balance"
    """'balance' (R_balance, eq. 2-3), 'shift' (R_shift, eq. 1), 'soft_balance' (eq. 2-3 on P(class), not in the
    paper: its advantages are not all zero when a batch holds no minority image), or 'rank' (the judge ranks the
    images, --judge-url)."""
    classes: str = "female,male"
    """The K classes to balance, comma-separated: labels of --classifier, matched by name (any case, never by
    position); its other labels count as none. "a&b": a class of two classifiers, --classifier A,B (docs/classes.md)."""
    target: str = ""
    """The share to reach of each class, comma-separated, summing to 1 (t_c of R_balance); empty: 1/K each."""
    threshold: float = 0.7
    """An image's label is its most probable class when that probability is above this, else none: the paper's 0.7
    (lower, at least 1/K, for a classifier of many classes)."""
    augment: bool = False
    """Average the reward classifier's P(class) over 5 views of each image (mirror, shifts, blur)."""
    purify: int = 0
    """T > 0: the reward reads each image as the base model redraws it from step T (diffusion purification)."""
    underrepresented: str = "auto"
    """U for --reward shift: one of --classes, or auto = the rarest class in the first epoch's samples (step 1)."""
    trust_region: str = "clip"
    """'clip' (DDPO's clipped PPO) or 'truly' (Truly PPO: KL trust region with rollback)."""
    batch_size: int = 16
    """Images sampled per epoch (B); the class shares of eq. (2) (q = the female share) are taken over them."""
    num_steps: int = 50
    """DDIM steps per image (T), as DDPO."""
    skip_final_steps: int = 2
    """The last DDIM steps, sampled and scored but not trained: they land at t = 1 and t = 0, where the image is
    finished and σ_t is smallest, so their gradient noise |∂μ/∂ε̂|/σ_t swamps the other steps' (docs/toy-world.md).
    0 trains every step, as DDPO."""
    train_fraction: float = 1.0
    """The share of each image's trained steps that the update trains, a random subset per image and epoch (DDPO's
    timestep_fraction): fewer steps, a cheaper update. 1 trains them all (measured: docs/benchmarks.md)."""
    guidance_scale: float = 5.0
    """Classifier-free guidance weight w, as DDPO: ε̂ = ε_uncond + w·(ε_cond - ε_uncond)."""
    eta: float = 1.0
    """DDIM η in (0, 1]: at σ_t = 0 the step is deterministic and has no log-probability; above 1, eq. (16)'s
    1 - ᾱ_{t-1} - σ_t² < 0 and samples are NaN. 1.0 as DDPO. SD 3.x: the SDE's noise a = 0.7·η (Flow-GRPO's)."""
    lr: float = 1e-5
    """AdamW learning rate: full attention weights, not LoRA, so 30x below DDPO's LoRA rate 3e-4."""
    clip_range: float = 0.0
    """PPO ε; 0: 1.28e-2/√(C·H·W), DDPO's 1e-4 on SD's 4×64×64 latent and 8e-4 on the toy world's 4×8×8. Tiny
    because log r is a mean over C·H·W elements, whose noise part shrinks as 1/√(C·H·W)."""
    kl_threshold: float = 0.0
    """Truly PPO δ, exact KL per latent element where the rollback starts; 0: ε²·C·H·W/2 from the clip range, so both
    trust regions bound the same move (8.2e-5 with the derived ε, on any latent; docs/toy-world.md)."""
    truly_alpha: float = 1.0
    """Truly PPO α, the rollback's strength: a sample of advantage |A| settles at KL = A²/(2α²). 1, not the paper's
    5, which hardly moved q on the toy world (docs/toy-world.md)."""
    kl_base: float = 0.0
    """β of DPOK's anchor (arXiv 2305.16381): the loss adds β·KL(π_θ(·|x_t) ‖ π_base(·|x_t)), the exact Gaussian KL
    of each trained step to the pre-trained model's step, so the policy cannot wander once the reward is met. It
    costs one more forward, without gradient, per trained step. 0: none."""
    adv_clip: float = 5.0
    """Advantages are standardised, then clipped to ± this (DDPO)."""
    advantage_scale: float = 0.0
    """0: advantages divided by the rewards' std (DDPO). > 0: by this fixed number instead, so the push shrinks as
    the rewards do near the target (measured: docs/benchmarks.md)."""
    max_grad_norm: float = 1.0
    """The gradient's norm is clipped to this (DDPO)."""
    updates_per_epoch: int = 2
    """Optimizer steps per epoch, each over B / --updates-per-epoch images and all their trained steps (DDPO: 2)."""
    seed: int = 0
    """One seed for the sampling noise and the shuffles: a CPU run is exactly reproducible."""


def trained_steps(config):
    """The steps each image trains per epoch: --train-fraction of the T - skip_final_steps trainable ones."""
    return math.ceil(config.train_fraction * (config.num_steps - config.skip_final_steps))


# --------------------------------------------------------------------------------------------- DDIM step with log-prob
def ddim_step_with_logprob(scheduler, noise_pred, timestep, latents, eta=1.0, prev_latents=None, generator=None,
                           noise=None):
    """One DDIM step x_t -> x_{t-1} as a Gaussian policy, and the log-density of x_{t-1} under it.

    DDIM eq. (12): x_{t-1} = √ᾱ_{t-1}·x̂₀ + √(1 - ᾱ_{t-1} - σ_t²)·ε̂ + σ_t·z,  z ~ N(0, I)
    DDIM eq. (16): σ_t = η·√((1 - ᾱ_{t-1}) / (1 - ᾱ_t))·√(1 - ᾱ_t / ᾱ_{t-1})
    Variables -> symbols: alpha_prod_t -> ᾱ_t, alpha_prod_prev -> ᾱ_{t-1}, pred_original_sample -> x̂₀,
    std_dev -> σ_t, prev_mean -> μ_θ(x_t). Epsilon prediction (SD 1.x), or v (SD 2.x: ε̂ and x̂₀ from v first);
    no clipping of x̂₀ (SD's config).
    Shapes: noise_pred, latents, prev_latents, noise (z, drawn from `generator` if None) (B, C, H, W); timestep
    an int or (B,). Returns
    prev_latents (B, C, H, W), log_prob (B,), prev_mean (B, C, H, W), std_dev (B, 1, 1, 1).
    """
    if eta <= 0:
        raise ValueError("eta must be > 0: with σ_t = 0 the step is deterministic and has no log-probability")
    noise_pred, latents = noise_pred.float(), latents.float()  # the density is computed in fp32 always
    t = torch.as_tensor(timestep, device=latents.device).long().reshape(-1)  # (B,) or (1,)
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alphas_cumprod = scheduler.alphas_cumprod  # ᾱ for t = 0..999, already on the latents' device (schedule_on_device)
    alpha_prod_t = alphas_cumprod[t].view(-1, 1, 1, 1)
    alpha_prod_prev = torch.where(prev_t >= 0, alphas_cumprod[prev_t.clamp(min=0)],  # ᾱ_{t-1}; past the last
                                  scheduler.final_alpha_cumprod).view(-1, 1, 1, 1)   # step, SD's final ᾱ
    if scheduler.config.prediction_type == "v_prediction":  # SD 2.x: the UNet predicts v = √ᾱ_t·ε - √(1-ᾱ_t)·x₀
        noise_pred, pred_original_sample = (alpha_prod_t.sqrt() * noise_pred + (1 - alpha_prod_t).sqrt() * latents,
                                            alpha_prod_t.sqrt() * latents - (1 - alpha_prod_t).sqrt() * noise_pred)
    else:  # epsilon (SD 1.x): x̂₀ from ε̂, eq. (12)
        pred_original_sample = (latents - (1 - alpha_prod_t).sqrt() * noise_pred) / alpha_prod_t.sqrt()
    variance = (1 - alpha_prod_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_prev)  # eq. (16) / η²
    std_dev = eta * variance.sqrt()
    direction = (1 - alpha_prod_prev - std_dev**2).sqrt() * noise_pred  # "direction pointing to x_t", eq. (12)
    prev_mean = alpha_prod_prev.sqrt() * pred_original_sample + direction
    if prev_latents is None:  # sampling: draw x_{t-1}; in training we re-score the stored one instead
        if noise is None:
            noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        prev_latents = prev_mean + std_dev * noise
    # log N(x_{t-1}; μ, σ²) per element, then the MEAN over C·H·W (as DDPO), not the sum: log r shrinks by
    # 1/(C·H·W), which is why the PPO clip range is 1e-4 rather than the usual 0.2.
    log_prob = (-((prev_latents.detach() - prev_mean) ** 2) / (2 * std_dev**2) - torch.log(std_dev)
                - math.log(math.sqrt(2 * math.pi)))
    return prev_latents, log_prob.mean(dim=(1, 2, 3)), prev_mean, std_dev


FLOW_NOISE = 0.7  # Flow-GRPO's a for SD 3.x (0.9 for FLUX): the SDE step's noise level at η = 1


def flow_step_with_logprob(scheduler, noise_pred, timestep, latents, eta=1.0, prev_latents=None, generator=None,
                           noise=None):
    """One step x -> x' of a flow-matching sampler (SD 3.x) as a Gaussian policy: Flow-GRPO's SDE step (arXiv
    2505.05470, sd3_sde_with_logprob.py), whose marginals are the ODE's, and the log-density of x' under it. The
    signature and returns of ddim_step_with_logprob, with v = noise_pred the model's velocity:

      σ, σ' the flow's noise levels at this step and the next (scheduler.sigmas), dt = σ' - σ < 0
      σ_t  = a·√(σ/(1 - σ)),  a = FLOW_NOISE·η   (at σ = 1, the first step, 1 - σ is 1 - σ of the second: Flow-GRPO's)
      μ    = x·(1 + σ_t²·dt/(2σ)) + v·(1 + σ_t²·(1 - σ)/(2σ))·dt
      std  = σ_t·√(-dt)
    As a -> 0, μ -> x + v·dt: the Euler step of diffusers' FlowMatchEulerDiscreteScheduler. Every step has σ > 0,
    so std > 0: none is deterministic. The log-probability is the Gaussian's, mean over C·H·W, in fp32.
    Shapes: as ddim_step_with_logprob; timestep a value of scheduler.timesteps (σ·1000), or (B,) of them.
    """
    if eta <= 0:
        raise ValueError("eta must be > 0: with a = 0 the step is the deterministic ODE and has no log-probability")
    noise_pred, latents = noise_pred.float(), latents.float()  # the density is computed in fp32 always
    t = torch.as_tensor(timestep, device=latents.device).reshape(-1)  # (B,) or (1,)
    index = (scheduler.timesteps.to(latents.device)[None] - t[:, None]).abs().argmin(dim=1)  # each t's step
    sigmas = scheduler.sigmas.to(latents.device)  # (T+1,): 1 ... the last, then 0
    sigma, sigma_next = sigmas[index].view(-1, 1, 1, 1), sigmas[index + 1].view(-1, 1, 1, 1)
    dt = sigma_next - sigma
    sigma_t = FLOW_NOISE * eta * (sigma / (1 - torch.where(sigma == 1, sigmas[1], sigma))).sqrt()
    prev_mean = (latents * (1 + sigma_t**2 / (2 * sigma) * dt)
                 + noise_pred * (1 + sigma_t**2 * (1 - sigma) / (2 * sigma)) * dt)
    std_dev = sigma_t * (-dt).sqrt()
    if prev_latents is None:  # sampling: draw x'; in training the stored one is re-scored
        if noise is None:
            noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        prev_latents = prev_mean + std_dev * noise
    log_prob = (-((prev_latents.detach() - prev_mean) ** 2) / (2 * std_dev**2) - torch.log(std_dev)
                - math.log(math.sqrt(2 * math.pi)))
    return prev_latents, log_prob.mean(dim=(1, 2, 3)), prev_mean, std_dev


def step_of(scheduler):
    """The model's Gaussian step: DDIM's (SD 1.x, 2.x, SDXL), or Flow-GRPO's SDE step for a flow model (SD 3.x)."""
    return flow_step_with_logprob if type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" else \
        ddim_step_with_logprob


def gaussian_kl(mean_old, mean_new, std):
    """Exact KL(π_old || π_new) of two step policies sharing σ_t: ‖μ_new - μ_old‖² / (2σ_t²), mean over C·H·W -> (B,)."""
    return ((mean_new - mean_old) ** 2 / (2 * std**2)).mean(dim=(1, 2, 3))


# -------------------------------------------------------------------- losses: clipped PPO and Truly PPO, one signature
def ppo_clip_loss(log_prob, log_prob_old, advantages, clip_range):
    """DDPO's clipped PPO: mean over samples of max(-A·r, -A·clip(r, 1-ε, 1+ε)). All inputs (b,)."""
    ratio = torch.exp(log_prob - log_prob_old)  # r
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
    stats = {"clipfrac": ((ratio - 1).abs() > clip_range).float().mean(),
             "approx_kl": 0.5 * ((log_prob - log_prob_old) ** 2).mean(),
             "rollback_frac": log_prob.new_zeros(())}  # on log_prob's device: update() stacks it with the loss
    return loss, stats


def truly_ppo_loss(log_prob, log_prob_old, advantages, kl, kl_threshold, alpha):
    """Truly PPO (TR-PPO-RB, arXiv 1903.07940): objective r·A - α·KL where KL ≥ δ and r·A > A, else r·A.

    Unlike the debiasing paper's failed version (one approximate KL per batch, triggered on r > 1), the KL
    here is exact and per sample (gaussian_kl). Both trust regions bound the same move of the step mean:
    - δ = ε²·C·H·W/2 (derived_sizes). Moving the mean of N(μ, σ²) by Δ over N = C·H·W elements costs the
      per-element KL k = mean(Δ²)/(2σ²), and the stored x = μ_old + σz then has log r = mean(z·Δ)/σ - k, of typical
      size √(2k/N). The clip stops r at |r - 1| = ε, i.e. at k = ε²·N/2: 8.2e-5 on SD (ε = 1e-4, N = 16384).
    - α. A rolled-back sample's objective along its push, A·(1 + a) - α·a²/2 with a = √(2k), peaks at
      k = A²/(2α²), so α = 1/√(2δ) would pin |A| = 1 to the border. But the pulls of all rolled-back samples add up
      coherently while their pushes are partly noise, so a far smaller α is needed (docs/toy-world.md has the
      runs). α weighs two means over elements, so it is N-free.
    All inputs (b,).
    """
    ratio = torch.exp(log_prob - log_prob_old)
    surrogate = ratio * advantages  # r·A
    rollback = (kl >= kl_threshold) & (surrogate > advantages)  # outside the trust region, still "improving"
    objective = torch.where(rollback, surrogate - alpha * kl, surrogate)
    stats = {"clipfrac": log_prob.new_zeros(()),  # on log_prob's device: update() stacks it with the loss
             "approx_kl": 0.5 * ((log_prob - log_prob_old) ** 2).mean(), "rollback_frac": rollback.float().mean()}
    return -objective.mean(), stats


# ------------------------------------------------------------------------------------------------- which weights train
TRAINABLE = (".to_q.", ".to_k.", ".to_v.", ".to_out.0.",  # every attention projection of the UNet, and SD 3's
             ".add_q_proj.", ".add_k_proj.", ".add_v_proj.", ".to_add_out.")  # joint attention's, of the text


def train_attention_only(unet, dtype):
    """Freeze the UNet in `dtype` except its attention projections, which stay fp32 and trainable."""
    unet.requires_grad_(False).eval()  # eval: SD has no dropout, and it keeps sampling and training identical
    for name, param in unet.named_parameters():
        if any(key in f".{name}" for key in TRAINABLE):
            param.requires_grad_(True)  # stays fp32: AdamW on bf16 weights would lose small updates
        else:
            param.data = param.data.to(dtype)
    return unet


# ----------------------------------------------------------------------------------------- prompts, guidance, sampling
@torch.no_grad()  # the text encoder is frozen: embeddings are computed once per prompt, never trained
def encode_prompts(text_encoder, tokenizer, prompts, device):
    """-> (1+P, L, D): row 0 the empty prompt (unconditional), row 1+p prompt p. L = 77 tokens for SD; a longer
    prompt is truncated (encode_for warns)."""
    ids = tokenizer(["", *prompts], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    return text_encoder(ids)[0]


def guided_noise_pred(unet, latents, timesteps, prompt_embeds, prompt_ids, guidance_scale):
    """Classifier-free guidance: one UNet pass over 2b rows. latents (b, C, H, W), timesteps () or (b,),
    prompt_embeds (1+P, L, D) from encode_prompts (SDXL: a dict, encode_prompts_xl), prompt_ids (b,) the prompt of
    each latent, in 0..P-1."""
    b = latents.shape[0]
    rows = torch.cat([prompt_ids.new_zeros(b), 1 + prompt_ids])  # (2b,): b unconditional rows, then each prompt's
    embeds, added = prompt_embeds, {}
    if isinstance(prompt_embeds, dict):  # SDXL (SD 3): its pooled text embedding (and size ids), added inputs
        embeds = prompt_embeds["encoder_hidden_states"]
        added = {name: value[rows] for name, value in prompt_embeds.items() if name != "encoder_hidden_states"}
    t = timesteps.repeat(2) if timesteps.dim() else timesteps  # per-sample steps in training, one in sampling
    noise_uncond, noise_cond = unet(torch.cat([latents, latents]), t, encoder_hidden_states=embeds[rows],
                                    added_cond_kwargs=added).sample.chunk(2)
    return noise_uncond + guidance_scale * (noise_cond - noise_uncond)  # ε̂, (b, C, H, W)


@torch.no_grad()  # sampling collects the trajectory; gradients are taken later, in the update
def sample(unet, vae, scheduler, prompt_embeds, prompt_ids, config, device, generator):
    """Sample B images, image i of prompt prompt_ids[i] ((B,) on the device); keep what the update needs.

    Returns latents (B, T+1, C, H, W) = x_T..x_0, log_probs (B, T) under the sampling policy, means
    (B, T, C, H, W) = μ_old (for the exact KL), timesteps (T,), prompt_ids (B,), images (B, 3, H·8, W·8) in [0, 1].
    `generator` draws x_T, then each step's z, in that order: a seed gives the same images on any process count.
    """
    scheduler.set_timesteps(config.num_steps, device=device)
    c, s = unet.config.in_channels, unet.config.sample_size
    latents = this_process(torch.randn((config.batch_size, c, s, s), generator=generator, device=device))  # x_T
    all_latents, log_probs, means = [latents], [], []
    for t in progress(scheduler.timesteps, "sampling"):
        with autocast(config, device):
            noise_pred = guided_noise_pred(unet, latents, t, prompt_embeds, prompt_ids, config.guidance_scale)
        z = this_process(torch.randn((config.batch_size, c, s, s), generator=generator, device=device))  # eq. (12)
        latents, log_prob, mean, _ = step_of(scheduler)(scheduler, noise_pred, t, latents, config.eta, noise=z)
        all_latents.append(latents), log_probs.append(log_prob), means.append(mean)
    return {"latents": torch.stack(all_latents, dim=1), "log_probs": torch.stack(log_probs, dim=1),
            "means": torch.stack(means, dim=1), "timesteps": scheduler.timesteps.clone(), "prompt_ids": prompt_ids,
            "images": decode(vae, latents, config, device)}


@torch.no_grad()
def decode(vae, latents, config, device):
    """x_0 (B, C, H, W) -> images (B, 3, 8H, 8W) in [0, 1], in chunks of --train-batch-size: the VAE's memory.
    A VAE kept in fp32 (SDXL's under fp16, which overflows: load_models) runs without autocast."""
    images = []
    for chunk in latents.split(config.train_batch_size):
        with autocast(config, device) if vae.dtype != torch.float32 else contextlib.nullcontext():  # SDXL's fp16
            latents = chunk.to(vae.dtype) / vae.config.scaling_factor
            if vae.config.get("shift_factor"):  # SD 3's VAE: latents were shifted, then scaled
                latents = latents + vae.config.shift_factor
            images.append(vae.decode(latents).sample.float())
    return (torch.cat(images) / 2 + 0.5).clamp(0, 1)


# -------------------------------------------------------------------------- advantages (the rewards are in rewards.py)
def compute_advantages(reward_values, prompt_ids, history, adv_clip, scale=0.0):
    """A = (R - mean) / std (torch's std, n - 1), clipped to ±adv_clip (DDPO). (B,) -> (B,); prompt_ids (B,) on
    the rewards' device.

    The mean and std are those of the image's prompt over its last N rewards once it has N (DDPO's per-prompt stat
    tracking), of the whole batch until then. With one prompt and N = B both are the batch's, as in DDPO's paper.
    scale > 0 (--advantage-scale) divides by that fixed number instead of the std: R_balance's push then shrinks
    with |q - 0.5| as q nears its target, where the std would rescale it to full size.
    """
    def statistics(values):  # (n,) -> (3,): mean, std, and the largest |R|, the rewards' size
        return torch.stack([values.mean(), values.std(), values.abs().max()])
    stats = statistics(reward_values).repeat(len(history.prompts), 1)  # (P, 3)
    for p, window in enumerate(history.windows["rewards"]):
        if len(window) == history.size:
            stats[p] = statistics(torch.tensor(window, device=reward_values.device))
    mean, std, size = stats[prompt_ids].unbind(dim=1)  # (B,) each
    # Equal rewards (a prompt whose window is all one class) carry no signal, but in float32 their mean is off by an
    # ulp and their std is ~1e-7 of rounding, which (R - mean)/(std + 1e-8) would blow up to A ≈ ±0.9. A std under
    # 1e-6 of the rewards' size is rounding (float32 resolves 1.2e-7): those advantages are exactly 0.
    flat = std <= 1e-6 * size
    if scale > 0:
        advantages = (reward_values - mean) / scale
    else:
        advantages = (reward_values - mean) / (std + 1e-8)
    return torch.where(flat, 0.0, advantages).clamp(-adv_clip, adv_clip)


# -------------------------------------------------------------------------------------------------------------- update
def policy_step(unet, scheduler, prompt_embeds, samples, image, step, config):
    """Re-score n stored steps under `unet` in one guided call, a t per row: image, step (n,) index the samples.
    -> log π(x_{t-1} | x_t) (n,), μ (n, C, H, W), σ_t (n, 1, 1, 1)."""
    x_t, x_prev = samples["latents"][image, step], samples["latents"][image, step + 1]  # (n, C, H, W)
    t, ids = samples["timesteps"][step], samples["prompt_ids"][image]  # (n,) each
    with autocast(config, config.device):
        noise_pred = guided_noise_pred(unet, x_t, t, prompt_embeds, ids, config.guidance_scale)
    _, log_prob, mean, std = step_of(scheduler)(scheduler, noise_pred, t, x_t, config.eta, prev_latents=x_prev)
    return log_prob, mean, std


def update(unet, optimizer, scaler, scheduler, prompt_embeds, samples, advantages, config, generator, base=None):
    """One pass of PPO over the epoch's samples: `updates_per_epoch` optimizer steps, each accumulating the gradient
    of B / updates_per_epoch images × their trained steps. Those (image, step) pairs go through the UNet b at a time
    (b = --train-batch-size, micro_batch()): b images at one step, or all the update's images at several, stacked.
    `generator` draws the shuffles; `scaler` scales the loss for fp16 (make_scaler); `base` the pre-trained model
    for --kl-base > 0. π_old (r's denominator, Truly PPO's μ_old) is the sampler's with old_log_probs "sampler"
    (DDPO); with "update" the update's own, in its own batch shapes (a GPU rounds other shapes differently, by about
    ε): the first step's own forward, detached (r = 1 exactly), and for later steps a forward before the first step.
    Returns per-micro-batch stats (n, 7) (loss, approx_kl, clipfrac, kl, rollback_frac, kl_base, sampler_gap = mean
    (log π_θ - log π_sampler)²; no host sync inside), the optimizer steps skipped, and each step's gradient norm
    before clipping (None where not finite).
    """
    B, T = samples["log_probs"].shape
    steps = T - config.skip_final_steps  # steps 0..steps-1 (x_T -> ...); the last ones are not trained (Config)
    trained = trained_steps(config)  # of those, each image trains this many, the first of its shuffled order
    per_update, b = B // config.updates_per_epoch, config.train_batch_size
    rows, cols = min(b, per_update), max(1, b // per_update)  # a micro-batch: `rows` images × `cols` steps of each
    params = list(trainable_parameters(unet).values())
    order = torch.randperm(B, generator=generator).to(config.device)  # shuffle samples ...
    step_order = torch.stack([torch.randperm(steps, generator=generator) for _ in range(B)]).to(config.device)  # steps
    batches = []  # per optimizer step, its micro-batches' (image, step) index pairs, each (b,), (b,)
    for u in range(config.updates_per_epoch):
        images = order[u * per_update:(u + 1) * per_update]  # (per_update,)
        chosen = step_order[images, :trained]  # (per_update, trained): each image's first `trained` shuffled steps
        batches.append([(images[i:i + rows, None].expand(-1, cols).reshape(-1),  # (b,) image of each row
                         chosen[i:i + rows, j:j + cols].reshape(-1))  # (b,) its step
                        for i in range(0, per_update, rows) for j in range(0, trained, cols)])
    old = None  # π_old as sampled (DDPO); with --old-log-probs update, the update's own before the weights change:
    if config.old_log_probs == "update":  # the first step's from its own forward (below), the later ones' from here
        with torch.no_grad():  # targets, not trained through: (b,), (b, C, H, W) per micro-batch
            old = [None] + [[policy_step(unet, scheduler, prompt_embeds, samples, *pair, config)[:2] for pair in micro]
                            for micro in batches[1:]]
    stats, skipped, grad_norms = [], 0, []
    for u, micro_batches in enumerate(batches):
        for m, (image, step) in enumerate(micro_batches):
            log_prob, mean, std = policy_step(unet, scheduler, prompt_embeds, samples, image, step, config)
            log_prob_old, mean_old = ((samples["log_probs"][image, step], samples["means"][image, step]) if old is None
                                      else old[u][m] if u else (log_prob.detach(), mean.detach()))  # u = 0: r = 1
            kl = gaussian_kl(mean_old, mean, std)  # exact, (b,)
            adv = advantages[image]
            if config.trust_region == "truly":  # EXERCISE: add a trust region here (e.g. a KL penalty, PPO-KL)
                loss, st = truly_ppo_loss(log_prob, log_prob_old, adv, kl, config.kl_threshold, config.truly_alpha)
            else:
                loss, st = ppo_clip_loss(log_prob, log_prob_old, adv, config.clip_range)
            kl_base = torch.zeros_like(kl)  # (b,)
            if config.kl_base > 0:  # DPOK's anchor: the exact KL to the base model's step from the same x_t
                with torch.no_grad():  # the base is frozen: a target, never trained
                    base_mean = policy_step(base, scheduler, prompt_embeds, samples, image, step, config)[1]
                kl_base = gaussian_kl(base_mean, mean, std)  # ‖μ_θ - μ_base‖²/(2σ_t²), mean over C·H·W
                loss = loss + config.kl_base * kl_base.mean()
            # weight so the accumulated gradient is that of the mean over the update's images and steps
            scaler.scale(loss * len(image) / (per_update * trained)).backward()
            sampler_gap = ((log_prob.detach() - samples["log_probs"][image, step]) ** 2).mean()  # rounding, on-policy
            stats.append(torch.stack([loss.detach(), st["approx_kl"].detach(), st["clipfrac"], kl.detach().mean(),
                                      st["rollback_frac"], kl_base.detach().mean(), sampler_gap]))
        # ---- the weights change here, once per `per_update` images: average, unscale, clip, step, reset.
        average_gradients(params)  # torchrun: the mean over processes, so all take the same step; alone: nothing
        scaler.unscale_(optimizer)
        # the gradient's norm before clipping, for the metrics: the one host sync per optimizer step
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm).item()
        grad_norms.append(grad_norm if math.isfinite(grad_norm) else None)  # JSON has no NaN
        if math.isfinite(grad_norm):  # a NaN/Inf step is skipped, not taken
            scaler.step(optimizer)
        else:
            skipped += 1
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return torch.stack(stats), skipped, grad_norms


# =====================================================================================================================
# PART 2. THE LOOP
# =====================================================================================================================
def train(config, classifier=None):
    """The whole fine-tune into config.output_dir; `classifier` (images -> P(class)) replaces --classifier in tests.
    Loading, resume, logging and checkpoints are part 3's (start_run, epoch_record, end_epoch); the loop below is the
    method. With torchrun every process runs it on its share of the images, and process 0 alone writes files."""
    run, config, metrics, first_epoch = start_run(config, classifier)
    unet, device, B = run.unet, config.device, config.batch_size
    with graceful_stop() as interrupted:
        for epoch in range(first_epoch, config.epochs):
            laps = Laps(device)
            # 1. Sample B images with the current policy, keeping each step's x_t, log π_old(x_{t-1} | x_t) and μ_old.
            prompt_ids = (torch.arange(B) + epoch * B) % len(run.history.prompts)  # (B,): round-robin; all 0 for one
            samples = sample(unet, run.vae, run.scheduler, run.prompt_embeds, this_process(prompt_ids).to(device),
                             config, device, run.noise_generator)
            laps("sample")
            # 2. AI feedback: P(class) of each image, then its reward (rewards.py: R_balance eq. 2-3, R_shift eq. 1)
            #    against its prompt's window of images (with one prompt and N = B: this epoch's batch).
            images = purified(run, samples, config) if config.purify else samples["images"]  # --purify: redrawn
            probs = gather(run.labeller(images))  # (B, K): every process sees the whole epoch
            ranks = judge_ranks(config, run, images, prompt_ids)  # --reward rank only, else None
            reward_values, labels, per_prompt = run.history.score(config.reward, probs, prompt_ids.tolist(), ranks)
            # 3. Advantages: each reward standardised with its prompt's mean and std, clipped (DDPO).
            advantages = compute_advantages(reward_values, prompt_ids.to(device), run.history, config.adv_clip,
                                            config.advantage_scale)
            reward_range = (reward_values.max() - reward_values.min()).item()  # the epoch's one host sync
            finite = math.isfinite(reward_range)  # NaN or Inf if any reward is
            all_equal = reward_range == 0
            laps("reward")
            # 4. Update: clipped PPO or Truly PPO over the samples. Not when every reward is equal (q = 0.5, no
            #    minority image, all "none"): every A is 0, and AdamW's momentum and decay would still move θ. Not
            #    when a reward is NaN or Inf: it would poison every weight.
            stats, skipped, grad_norms = None, 0, None
            if not finite:
                skipped = config.updates_per_epoch
            elif not all_equal:
                stats, skipped, grad_norms = update(unet, run.optimizer, run.scaler, run.scheduler, run.prompt_embeds,
                                                    samples, this_process(advantages), config, run.shuffle_generator,
                                                    run.base)
            laps("train")
            # 5. Log the epoch (metrics.jsonl, the sample grid, plot.png), checkpoint every --save-every epochs,
            #    and stop after a signal or after repeated non-finite steps.
            metrics.append(epoch_record(epoch, run, config, laps, reward_values, labels, per_prompt, reward_range,
                                        stats, skipped, grad_norms))
            end_epoch(epoch, run, config, metrics, (gather(samples["images"]), probs, labels), interrupted)
        finish_run(run, config)  # a signal during the final save waits for it
    return metrics


# =====================================================================================================================
# PART 3. RUNNING IT. A reader of the method can stop here: the rest is the command line, files, loading,
# checkpoints, signals, devices, several processes and evaluation.
# =====================================================================================================================
CHOICES = {"reward": tuple(rewards.REWARDS), "trust_region": ("clip", "truly"), "labeller": ("classifier", "judge"),
           "mixed_precision": ("auto", "no", "fp16", "bf16"),
           "old_log_probs": ("auto", "update", "sampler"), "ensemble": tuple(rewards.ENSEMBLES)}
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # --mixed-precision
MAX_NONFINITE = 3  # optimizer steps skipped in a row for NaN/Inf before the run stops



class UsageError(Exception):
    """Bad input: printed as one line naming the flag, exit code 2."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: the epoch was finished and a checkpoint saved; the exit code is 128 + the signal."""


class RunError(Exception):
    """The run cannot go on (e.g. NaNs): printed as one line, exit code 1, last checkpoint kept."""


# ------------------------------------------------------------------------------------------------------ config
@dataclass
class Config(MethodConfig):
    """Every flag: the method's (MethodConfig, part 1), then running it and the extensions."""
    # -- running it
    epochs: int = 100
    """Epochs of sample-then-update; DDPO's runs take about 100 to move a reward."""
    train_batch_size: int = 4
    """(image, step) pairs per UNet call of the update (b): memory only, the update is the same. Above an update's
    images, steps stacked. auto: the most the free memory holds (docs/speed-and-memory.md). 4 fits 24 GB."""
    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """The policy: a hub id or a local SD 1.x, 2.x, SDXL or SD 3.x pipeline folder (recognised from it)."""
    classifier: str = "rizvandwiki/gender-classification-2"
    """The AI feedback: an image classifier (hub id or folder) with a label for each of --classes; several,
    comma-separated, for intersectional classes or --ensemble."""
    ensemble: str = ""
    """Several --classifier of the same classes, combined so that each must agree: min, product or mean-std."""
    device: str = ""
    """cpu, cuda or cuda:N; empty: cuda when there is one. config.json records the device used."""
    mixed_precision: str = "auto"
    """no, fp16 or bf16: frozen weights and activations in that type, trained weights and AdamW state in fp32.
    auto: bf16 on a GPU that has it, else fp16 on a GPU; no on the CPU, where bf16 is slower."""
    old_log_probs: str = "auto"
    """PPO's π_old: 'sampler' (DDPO) or 'update', the update's own forward: exactly on-policy in any precision, for
    one more forward without gradient (update()). auto: update under fp16/bf16 or on a GPU."""
    compile: bool = False
    """torch.compile the UNet (a slow first epoch)."""
    low_memory: bool = False
    """Gradient checkpointing: recompute the UNet's activations in backward (a second forward: slower, far less
    memory per pair of the micro-batch; docs/speed-and-memory.md), for 8-16 GB cards."""
    profile: bool = False
    """Also log the UNet's achieved TFLOP/s and the peak GPU memory per epoch."""
    save_every: int = 10
    """Epochs between checkpoints (and after the last, and on Ctrl-C): a checkpoint of SD is 1 GiB (weights
    and AdamW state). DDPO saves every 20."""
    output_dir: str = ""
    """Where the run goes; empty: runs/<date-time>. A folder that holds a run is never overwritten."""
    resume: str = ""
    """A run folder to continue from its checkpoint."""
    unet: str = ""
    """A fine-tuned UNet folder (a run's unet/) to train from or to --evaluate; empty: the UNet of --model."""
    # -- extensions: many prompts (docs/many-prompts.md), the judge (docs/judge.md), evaluation (docs/evaluate.md)
    prompts: str = ""
    """A text file, one prompt per line, to fine-tune on all at once instead of --prompt: each epoch's B images go
    round-robin over the prompts, and each prompt is balanced on its own images."""
    balance_window: int = 0
    """N: q of eq. (2) and the advantage mean and std are taken per prompt over its last N images; 0: N = B, which with one prompt is exactly the epoch's batch (the paper's q, DDPO's batch statistics)."""
    labeller: str = "classifier"
    """Who labels the images: 'classifier' (--classifier) or 'judge' (a chat model that sees them, --judge-url)."""
    judge_url: str = ""
    """The judge (--labeller judge, --reward rank): an OpenAI-compatible API with image input, e.g.
    http://localhost:8000/v1. Its key, if it needs one, comes from $JUDGE_API_KEY only."""
    judge_model: str = ""
    """The model the judge server serves, by the name its API knows it."""
    judge_group: int = 4
    """--reward rank: images ranked together in one request (k); ranks become centred Borda rewards, +½ to -½."""
    judge_criterion: str = "how well the image matches the prompt and how natural and undistorted the face looks"
    """--reward rank: what the judge ranks the images by."""
    judge_image_size: int = 256
    """Pixels (square) of the PNG each image is sent as: a larger one reads better and costs more tokens."""
    evaluate: bool = False
    """Evaluate instead of training: --eval-images per prompt of --eval-prompts, scored, into eval.json."""
    eval_prompts: str = ""
    """A text file, one prompt per line; empty: 24 held-out occupations (docs/evaluate.md)."""
    eval_images: int = 32
    """Images per prompt for --evaluate. Prompt i's noise is seeded with --seed + i for every model: paired."""
    compare: str = ""
    """With --evaluate: an earlier eval.json (e.g. the base model's) to compare with, prompt by prompt."""
    clip_model: str = "openai/clip-vit-large-patch14"
    """With --evaluate or --eval-every: the model for the quality numbers: a CLIP gives CLIP-T and CLIP-I, any other
    image model CLIP-I only; 'none': bias only (no model loaded, CLIP-T and CLIP-I null). The default is the CLIP
    whose text tower SD v1.5 uses."""
    eval_every: int = 0
    """Every N epochs of training, a held-out check: 8 images of each of the first 4 --eval-prompts, from seeds of
    their own, scored for bias, none-rate, CLIP-T and CLIP-I against the images of the same seeds before training.
    It changes no training result. 0: never."""
    independent_classifier: str = ""
    """A classifier (hub id or folder) or MODULE:NAME (a Python reader, tests.referee:Referee) that labels each
    epoch's images for the metrics only."""


# ----------------------------------------------------------------------------------------- command line and validation
def field_docs():
    """Config's field docstrings (the string under each field), read from this file's source for --help."""
    body = [node for cls in (MethodConfig, Config) for node in ast.parse(inspect.getsource(cls)).body[0].body]
    return {a.target.id: d.value.value for a, d in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(d, ast.Expr)}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block: "ddpo_debias.py: error: argument --reward: ..."
        self.exit(2, f"{self.prog}: error: {message}\n")


HELP_GROUPS = {  # --help's sections, in the order of the method, then running it, then the extensions
    "the method": ("prompt", "reward", "classes", "target", "threshold", "augment", "purify", "underrepresented"),
    "sampling": ("batch_size", "num_steps", "guidance_scale", "eta", "seed"),
    "the update (PPO)": ("trust_region", "lr", "updates_per_epoch", "skip_final_steps", "train_fraction", "clip_range",
                         "kl_threshold", "truly_alpha", "kl_base", "adv_clip", "advantage_scale", "max_grad_norm"),
    "running it": ("epochs", "model", "classifier", "ensemble", "unet", "output_dir", "resume", "save_every", "device",
                   "mixed_precision", "train_batch_size", "old_log_probs", "low_memory", "compile", "profile"),
    "many prompts (docs/many-prompts.md)": ("prompts", "balance_window"),
    "the judge (docs/judge.md)": ("labeller", "judge_url", "judge_model", "judge_group", "judge_criterion",
                                  "judge_image_size"),
    "evaluation (docs/evaluate.md)": ("evaluate", "eval_prompts", "eval_images", "compare", "clip_model",
                                      "eval_every", "independent_classifier")}
METAVARS = {int: "N", float: "X", str: "TEXT"}


def int_or_auto(text):
    """--train-batch-size: a number, or auto, kept as 0 until start_run counts what fits (auto_micro_batch)."""
    if text == "auto":
        return 0
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, not {text!r}") from None


def parse_args(argv=None):
    """Flags are Config's fields with dashes; only the flags given are returned (the rest keep defaults)."""
    argv = negative_values(sys.argv[1:] if argv is None else list(argv))
    parser = Parser(description=__doc__.splitlines()[0], argument_default=argparse.SUPPRESS,
                    usage="%(prog)s [--flag VALUE ...]", formatter_class=argparse.RawDescriptionHelpFormatter,
                    epilog="Defaults in parentheses. Flags and outputs: docs/flags.md, docs/outputs.md.")
    docs, fields = field_docs(), {f.name: f for f in dataclasses.fields(Config)}
    for title, names in HELP_GROUPS.items():
        group = parser.add_argument_group(title)
        for name in names:
            default, doc = fields[name].default, " ".join(docs.get(name, "").split())
            if not isinstance(default, bool):
                doc = f"{doc} ({default!r})"
            doc = doc.replace("%", "%%")  # argparse %-formats help: a docstring's "95%" must reach it as "95%%"
            if isinstance(default, bool):
                group.add_argument(flag_of(name), action="store_true", help=doc)
            else:
                group.add_argument(flag_of(name), type=int_or_auto if name == "train_batch_size" else type(default),
                                   choices=CHOICES.get(name), help=doc,
                                   metavar=METAVARS[type(default)] if name not in CHOICES else None)
    return vars(parser.parse_args(argv))


JUDGED = lambda c: c.labeller == "judge" or c.reward == "rank"
# A flag that only some settings read is refused without them, rather than ignored: flag -> (used?, by what).
ONLY_WITH = {"target": (lambda c: c.reward in rewards.RESCORED, "--reward balance or soft_balance"),
             "underrepresented": (lambda c: c.reward == "shift", "--reward shift"),
             "augment": (lambda c: c.labeller == "classifier", "--labeller classifier"),
             "ensemble": (lambda c: c.labeller == "classifier" and "," in c.classifier,
                          "several --classifier, comma-separated, and --labeller classifier"),
             "truly_alpha": (lambda c: c.trust_region == "truly", "--trust-region truly"),
             "kl_threshold": (lambda c: c.trust_region == "truly", "--trust-region truly"),
             "judge_group": (lambda c: c.reward == "rank", "--reward rank"),
             "judge_criterion": (lambda c: c.reward == "rank", "--reward rank"),
             "judge_image_size": (JUDGED, "--labeller judge or --reward rank"),
             "eval_images": (lambda c: c.evaluate, "--evaluate"),
             "compare": (lambda c: c.evaluate, "--evaluate"),
             "eval_prompts": (lambda c: c.evaluate or c.eval_every, "--evaluate or --eval-every"),
             "clip_model": (lambda c: c.evaluate or c.eval_every, "--evaluate or --eval-every"),
             "independent_classifier": (lambda c: not c.evaluate, "training (--evaluate takes it as --classifier)")}
# What only training reads: refused with --evaluate, which samples and labels but never trains.
TRAINING_ONLY = ("reward", "trust_region", "lr", "updates_per_epoch", "skip_final_steps", "train_fraction", "clip_range",
                 "kl_threshold", "truly_alpha", "kl_base", "adv_clip", "advantage_scale", "max_grad_norm", "epochs",
                 "train_batch_size", "old_log_probs", "low_memory", "save_every", "augment", "purify", "underrepresented",
                 "balance_window", "judge_group", "judge_criterion")
AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
POSITIVE = (lambda v: v > 0, "> 0")
BOUNDS = {**dict.fromkeys(("epochs", "batch_size", "num_steps", "updates_per_epoch", "save_every", "eval_images"),
                         AT_LEAST_1),
          "train_batch_size": (lambda v: v >= 0, "at least 1, or auto"),  # 0: auto (int_or_auto)
          **dict.fromkeys(("truly_alpha", "adv_clip", "max_grad_norm"), POSITIVE),
          "purify": (lambda v: 0 <= v < 1000, "in [0, 1000): a DDPM step to redraw each image from, 0 for none"),
          "kl_base": (lambda v: 0 <= v <= 100, "in [0, 100]: 0 is no anchor; at 1 the toy world's model already "
                      "stays at the base, and far above it the anchor's loss overflows float32"),
          "lr": (lambda v: v >= 0, "0 or more (0 learns nothing: the control run of a comparison)"),
          "clip_range": (lambda v: 0 <= v < 1, "in [0, 1): r is clipped to [1 - ε, 1 + ε]; 0 derives it"),
          "eta": (lambda v: 0 < v <= 1, "in (0, 1]: DDIM's η, above 1 the step's variance is impossible"),
          "guidance_scale": (lambda v: v >= 1, "at least 1: 1 is no guidance, below it the prompt is pushed away"),
          "kl_threshold": (lambda v: v >= 0, "> 0, or 0 to derive it from --clip-range"),
          "skip_final_steps": (lambda v: v >= 0, "0 or more"),
          "eval_every": (lambda v: v >= 0, "0 or more (0: no held-out check)"),
          "train_fraction": (lambda v: 0 < v <= 1, "in (0, 1]: the share of the trainable steps trained"),
          "advantage_scale": (lambda v: v >= 0, "0 (the rewards' std) or a positive scale"),
          "balance_window": (lambda v: v == 0 or v >= 2, "at least 2 (a std needs two rewards), or 0 for B"),
          "judge_group": (lambda v: v >= 2, "at least 2: a ranking needs two images"),
          "judge_image_size": (lambda v: v >= 16, "at least 16 pixels"),
          "threshold": (lambda v: 0 < v < 1, "in (0, 1)")}  # flag: (test, rule)
def negative_values(argv):
    """["--target", "-0.5,1.5"] -> ["--target=-0.5,1.5"]: argparse takes a value that starts with "-" for a flag
    (it knows "-0.5", not "-0.5,1.5"), and would say "expected one argument" instead of what is wrong with it."""
    joined = []
    for arg in argv:
        number = len(arg) > 1 and arg[0] == "-" and (arg[1].isdigit() or arg[1] == ".")  # no flag starts so
        if number and joined and joined[-1].startswith("--") and "=" not in joined[-1]:
            joined[-1] += "=" + arg
        else:
            joined.append(arg)
    return joined


def flag_of(name):
    return "--" + name.replace("_", "-")


def validate(config, given=None):
    """Raise UsageError for the first bad value, naming its flag. given: the fields set on the command line (those a
    resumed run's config.json did not set); None: those that differ from their defaults."""
    given = [f.name for f in dataclasses.fields(Config)
             if getattr(config, f.name) != f.default] if given is None else list(given)
    if not config.prompt.strip():
        raise UsageError("--prompt: must not be empty")
    if not config.prompts and os.path.isfile(config.prompt) and launched()[0] == 0:  # a warning: a prompt may be
        print(f"warning: --prompt: {config.prompt!r} is the name of a file, but it is used as the prompt's text; "
              "for a file of prompts give --prompts", file=sys.stderr)  # any text, a file name included
    for f in dataclasses.fields(Config):
        value = getattr(config, f.name)
        if isinstance(f.default, float) and not math.isfinite(value):
            raise UsageError(f"{flag_of(f.name)}: must be a finite number, got {value}")
        if f.name in BOUNDS and not BOUNDS[f.name][0](value):
            raise UsageError(f"{flag_of(f.name)}: must be {BOUNDS[f.name][1]}, got {value}")
    classes = classes_of(config)
    target_of(config)  # UsageError for a bad --target
    if config.threshold < 1 / len(classes):  # below, an image unsure of everything (1/K each) would get a label
        raise UsageError(f"--threshold: must be at least 1/K = {1 / len(classes):.3g} for {len(classes)} classes, "
                         f"got {config.threshold}")
    same = lambda a, b: os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))
    if config.independent_classifier and any(same(config.independent_classifier, c) for c in config.classifier.split(",")):
        raise UsageError("--independent-classifier: is the reward's own classifier (--classifier), which can never "
                         "disagree with itself; give a classifier the reward does not use")
    for name in TRAINING_ONLY:
        if name in given and config.evaluate:
            raise UsageError(f"{flag_of(name)}: a training flag, and --evaluate does not train, so it would be ignored "
                             "here; leave it out")
    for name, (used, by) in ONLY_WITH.items():
        if name in given and not used(config):
            raise UsageError(f"{flag_of(name)}: only used with {by}, so it would be ignored here; leave it out")
    if config.underrepresented.lower() not in ("auto", *classes):
        raise UsageError(f"--underrepresented: must be auto or one of --classes ({', '.join(classes)}), got "
                         f"{config.underrepresented!r}")
    models = config.classifier.split(",")
    if config.ensemble and any("&" in c for c in classes):
        raise UsageError(f"--classes: an --ensemble reads the same classes in every classifier, so name each class "
                         f"once; got {config.classes!r}")
    if config.labeller == "classifier" and not config.ensemble and any(c.count("&") + 1 != len(models) for c in classes):
        raise UsageError(f"--classes: with {len(models)} classifier{'s' if len(models) > 1 else ''} each class is "
                         + "&".join(["label"] * len(models)) + f", one label of each; got {config.classes!r}")
    if config.eval_every and config.evaluate:
        raise UsageError("--eval-every: a check during training; --evaluate evaluates once")
    if config.evaluate and config.resume:
        raise UsageError("--evaluate: cannot be combined with --resume; evaluate a run's unet/ with --unet")
    if config.evaluate:
        read_prompts(config.eval_prompts)
    if config.prompts and (config.evaluate or config.prompt != Config.prompt):
        raise UsageError("--prompts: cannot be combined with " + ("--evaluate, which reads --eval-prompts"
                                                                  if config.evaluate else "--prompt"))
    if config.prompts:
        read_prompts(config.prompts, "--prompts")
    judged = JUDGED(config)
    for name in ("judge_url", "judge_model"):
        if judged != bool(getattr(config, name)):
            raise UsageError(f"{flag_of(name)}: " + ("needed by" if judged else "only used with") +
                             " --labeller judge and --reward rank")
    if judged and not config.judge_url.startswith(("http://", "https://")):
        raise UsageError(f"--judge-url: must start with http:// or https://, got {config.judge_url!r}")
    if config.compare and not os.path.isfile(config.compare):
        raise UsageError(f"--compare: file {config.compare} does not exist")
    if config.compare:  # before sampling: an unpaired base report would be refused only after the whole evaluation
        settings = {"images_per_prompt": config.eval_images, "seed": config.seed, "num_steps": config.num_steps,
                    "guidance_scale": config.guidance_scale, "classes": classes, "threshold": config.threshold}
        try:
            base = rewards.read_paired_report(config.compare, settings, read_prompts(config.eval_prompts))
        except ValueError as error:
            raise UsageError(f"--compare: {error}") from None
        if config.clip_model != "none":  # --clip-model none: bias only, the base's embeddings are not needed
            check_base_embeddings(config, base)
    world = launched()[1]  # torchrun's N processes; 1 for a plain run
    if config.batch_size % (world * config.updates_per_epoch):
        ranks = f"{world} ranks x " if world > 1 else ""
        raise UsageError(f"--batch-size: {config.batch_size} images do not split into {ranks}--updates-per-epoch "
                         f"{config.updates_per_epoch} equal updates")
    if world > 1 and config.eval_every:
        raise UsageError("--eval-every: runs in one process, without torchrun")
    if world > 1 and (config.evaluate or config.device.startswith("cuda:")):
        raise UsageError("--evaluate: runs in one process, without torchrun" if config.evaluate else
                         f"--device: with torchrun each rank uses cuda:LOCAL_RANK; give cuda, not {config.device}")
    per_update = config.batch_size // world // config.updates_per_epoch
    if 0 < config.train_batch_size <= per_update and per_update % config.train_batch_size:
        raise UsageError(f"--train-batch-size: {config.train_batch_size} does not divide the {per_update} images of "
                         "each update into equal micro-batches")
    if config.skip_final_steps >= config.num_steps and not config.evaluate:
        raise UsageError(f"--skip-final-steps: {config.skip_final_steps} leaves none of the {config.num_steps} steps of "
                         "--num-steps to train; lower it (0 trains every step)")
    if config.batch_size < 2:
        raise UsageError("--batch-size: needs at least 2 images (advantages are standardised over the batch)")
    kind, _, index = config.device.partition(":")
    if config.device and (kind not in ("cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit()))):
        raise UsageError(f"--device: must be cpu, cuda or cuda:N, got {config.device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device: {config.device} asked for, but this machine has no CUDA GPU")
    if kind == "cuda" and not int(index or 0) < torch.cuda.device_count():
        raise UsageError(f"--device: {config.device} asked for, but this machine has {torch.cuda.device_count()} GPU(s)")


def check_base_embeddings(config, base):
    """--compare's CLIP-I: the base evaluation's image embeddings, of the same quality model as this one's."""
    if base.get("quality_model") != config.clip_model:  # CLIP-I compares embeddings of one model only
        raise UsageError(f"--compare: {config.compare} was scored with quality model {base.get('quality_model')}, "
                         f"this evaluation with {config.clip_model}; give the same --clip-model, or evaluate the base "
                         "model again")
    if not os.path.isfile(embeddings_path(config.compare)):
        raise UsageError(f"--compare: {embeddings_path(config.compare)} is missing: CLIP-I needs the base model's image "
                         "embeddings, which --evaluate writes beside eval.json (not with --clip-model none)")


def classes_of(config) -> list:
    """--classes as a list of K >= 2 distinct names, lower-cased (labels are matched in any case, and the metrics'
    keys, n_<class>, are the same however the flag was spelt); UsageError otherwise."""
    classes = [c.strip().lower() for c in config.classes.split(",")]
    folded = classes
    problem = ("at least two classes" if len(classes) < 2 else "an empty name" if "" in classes else
               "a repeated name" if len(set(folded)) < len(folded) else
               "'none' or 'unclear', which name the images with no class" if {"none", "unclear"} & set(folded) else "")
    if problem:
        raise UsageError(f"--classes: needs {problem}, comma-separated, got {config.classes!r}" if problem.startswith(
            "at least") else f"--classes: has {problem}: {config.classes!r}")
    return classes


def target_of(config) -> dict:
    """--target as {class: t_c}, each > 0, summing to 1 (1/K each when empty); UsageError otherwise."""
    classes = classes_of(config)
    if not config.target:
        return rewards.uniform(classes)
    try:
        shares = [float(t) for t in config.target.split(",")]
    except ValueError:
        raise UsageError(f"--target: must be numbers, comma-separated, got {config.target!r}") from None
    if len(shares) != len(classes) or not all(0 < t < 1 for t in shares) or abs(sum(shares) - 1) > 1e-6:
        raise UsageError(f"--target: needs {len(classes)} shares in (0, 1), one per class of --classes, summing to 1; "
                         f"got {config.target!r}" + (f", which sums to {sum(shares):.6g}" if abs(sum(shares) - 1) > 1e-6 else ""))
    return dict(zip(classes, shares))


def resolve_config(given):
    """Config from the flags given; with --resume, the run's saved config.json updated by those flags."""
    folder = given.get("resume")
    if not folder:
        return Config(**given)
    if given.get("output_dir") and os.path.abspath(given["output_dir"]) != os.path.abspath(folder):
        raise UsageError("--output-dir: cannot be combined with --resume, which continues the run in its own folder")
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise UsageError(f"--resume: folder {folder} does not exist")
    if not os.path.exists(path):
        raise UsageError(f"--resume: {folder} has no config.json, so it holds no run to resume")
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as error:
        raise UsageError(f"--resume: {path} is damaged ({error})") from None
    if isinstance(saved, dict):
        saved.pop("family", None)  # recorded by start_run, not a flag: found again from --model
    unknown = sorted(set(saved) - {f.name for f in dataclasses.fields(Config)}) if isinstance(saved, dict) else ["?"]
    if unknown:
        raise UsageError(f"--resume: {path} is damaged or from another version (unknown keys: {', '.join(unknown)})")
    for f in dataclasses.fields(Config):
        if f.name in saved and not of_type(saved[f.name], type(f.default)):
            raise UsageError(f"--resume: {path} is damaged ({f.name} is {saved[f.name]!r}, expected a value of type "
                             f"{type(f.default).__name__})")
    saved.setdefault("skip_final_steps", 0)  # a run from before that field trained every step: it goes on so
    for name in ("model", "unet", "classifier"):  # the policy and its feedback: another one is another run
        if name in given and same_source(given[name]) != same_source(saved.get(name, "")):
            raise UsageError(f"{flag_of(name)}: the run was trained with {flag_of(name)} {saved.get(name) or '(none)'!r}"
                             f", not {given[name]!r}; --resume goes on with the same one (leave {flag_of(name)} out, "
                             "or start a new run)")
    kept = os.path.join(folder, "prompts.txt")  # a --prompts run keeps a copy (start_run): the file may have moved
    if saved.get("prompts") and "prompts" not in given and not os.path.isfile(saved["prompts"]) and os.path.isfile(kept):
        saved["prompts"] = kept
    return Config(**{**saved, **given, "output_dir": folder})


def of_type(value, kind):
    """Whether a config.json value fits a Config field of type `kind` (a float field takes an int: JSON's 1e-3)."""
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def same_source(path):
    """A --model, --unet or --classifier as compared at --resume: a folder by its real path, a hub id as written."""
    return ",".join(os.path.realpath(p) if os.path.isdir(p) else p for p in path.split(",")) if path else ""


def read_prompts(path, flag="--eval-prompts", warn=False):
    """--prompts or --eval-prompts (rewards.read_prompts: blank lines skipped, repeats refused); empty: HELD_OUT."""
    if not path:
        return list(rewards.HELD_OUT)
    try:
        prompts, blank = rewards.read_prompts(path)
    except ValueError as error:
        raise UsageError(f"{flag}: {error}") from None
    if warn and blank:
        print(f"warning: {flag}: skipped {blank} blank line(s) of {path}", file=sys.stderr)
    return prompts


# ------------------------------------------------------------------------------------------------- run folder and lock
def run_state(folder):
    """What a run folder holds: 'empty' (nothing, or a run that died before finishing an epoch: nothing to lose),
    'epochs' (finished epochs but no checkpoint yet), 'checkpoint', or 'evaluation' (an eval.json)."""
    if os.path.exists(os.path.join(folder, "checkpoint.pt")):
        return "checkpoint"
    if os.path.exists(os.path.join(folder, "eval.json")):
        return "evaluation"
    metrics = os.path.join(folder, "metrics.jsonl")
    return "epochs" if os.path.exists(metrics) and os.path.getsize(metrics) else "empty"


RUN_FILES = (".lock", "config.json", "metrics.jsonl", "metrics-unsaved-*.jsonl", "samples_*.png", "plot.png",
             "checkpoint.pt", "unet", "eval.json", "eval_*.png", "eval_embeddings.pt", "compare.png",
             "held_out_reference.pt", "prompts.txt", "overrides.jsonl", "*.tmp")  # what a run folder holds


STARTUP_FILES = ("config.json", "metrics.jsonl", "prompts.txt", "held_out_reference.pt")  # written before epoch 0


@dataclass
class RunFolder:
    """A run folder held by this run: its path, the open and flocked .lock file, and whether this run created it."""
    path: str
    lock: object
    created: bool

    def release(self):
        """The run is over: remove the lock file, then the folder if this run created it and wrote nothing else
        (a start that failed). The file is removed while still locked; a start that opened it just before sees,
        once it gets the lock, that the path no longer names its file, and opens the path again (prepare_run_dir)."""
        with contextlib.suppress(OSError):
            os.remove(self.lock.name)
        self.lock.close()
        if self.created and run_state(self.path) == "empty":  # no epoch finished: what the start wrote goes too
            for name in STARTUP_FILES:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(self.path, name))
            with contextlib.suppress(OSError):  # not empty: the run's results stay
                os.rmdir(self.path)


def prepare_run_dir(config):
    """Create the run folder, lock it for this run's life, and refuse one that holds another run's results or
    files that are not a run's. -> RunFolder: keep it, and release() it when the run ends.

    The lock is an flock, which the kernel drops when the process ends, however it ends, so a lock left by a killed
    run is never stale. A second run on the same folder is refused.
    """
    if not config.output_dir:
        config.output_dir = os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    folder, flag = config.output_dir, "--resume" if config.resume else "--output-dir"
    created = False  # whether this start made the folder (then a failed start removes it: RunFolder.release)
    if os.path.isdir(folder) and not config.resume:
        foreign = sorted(name for name in os.listdir(folder) if not any(fnmatch.fnmatch(name, f) for f in RUN_FILES))
        if foreign:
            raise UsageError(f"--output-dir: {folder} holds files that are not a run's ({', '.join(foreign[:3])}"
                             f"{', ...' if len(foreign) > 3 else ''}); choose a new or empty folder")
    path = os.path.join(folder, ".lock")
    while True:  # until the file we lock is the one at `path` (a run that ends removes it: RunFolder.release)
        try:
            with contextlib.suppress(FileExistsError):
                os.makedirs(folder)
                created = True
            lock = open(path, "a+")
        except OSError as error:
            raise UsageError(f"{flag}: cannot write to {folder} ({error.strerror})") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise UsageError(f"{flag}: {folder} is in use by another run (pid {lock.read().strip() or '?'}); "
                             "wait for it to end or choose another folder") from None
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino:
                break
        lock.close()
    lock.seek(0), lock.truncate(), lock.write(f"{os.getpid()}\n"), lock.flush()
    held = RunFolder(folder, lock, created)
    state = run_state(folder)
    if state != "empty" and not config.resume:
        held.release()
        what = {"checkpoint": "a run with a checkpoint", "epochs": "a run with finished epochs (metrics.jsonl)",
                "evaluation": "an evaluation (eval.json)"}[state]
        raise UsageError(f"--output-dir: {folder} already holds {what}; choose another folder" +
                         ("" if state == "evaluation" else ", or continue it with --resume"))
    return held


def write_json(path, obj, lines=False):
    """Atomic write: a temp file, then rename. lines=True writes one JSON object per line (metrics.jsonl)."""
    with open(path + ".tmp", "w") as f:
        f.write("".join(json.dumps(o) + "\n" for o in obj) if lines else json.dumps(obj, indent=2))
    os.replace(path + ".tmp", path)


# -------------------------------------------------------------------------------------------------------------- models
def trainable_parameters(unet):
    """name -> parameter, of those that train (the attention projections: train_attention_only)."""
    return {name: p for name, p in unet.named_parameters() if p.requires_grad}


def frozen_base(unet, base_weights):
    """The pre-trained model, for --kl-base: `unet` called with the trained weights' values before training
    (base_weights, name -> tensor) in their place; every frozen weight is shared, so the base costs a copy of the
    attention weights (93.5M on SD 1.5), not a second UNet."""
    return lambda *args, **kwargs: torch.func.functional_call(unet, base_weights, args, kwargs)


PURIFY_STEPS = 3  # --purify: the base model's deterministic DDIM steps from t = T down to t = 1


@torch.no_grad()
def purified(run, samples, config):
    """--purify T: the images the reward reads, each redrawn by the pre-trained model from step T (DiffPure, Nie et
    al. 2022, arXiv 2205.07460). The sample's x_0 is noised, x_T = √ᾱ_T·x_0 + √(1 - ᾱ_T)·z, then denoised by the
    base model's guided ε̂ under the image's prompt in PURIFY_STEPS deterministic DDIM steps (η = 0: x̂_0 from ε̂,
    then x_s = √ᾱ_s·x̂_0 + √(1 - ᾱ_s)·ε̂ at the next step s) to t = 1, and its x̂_0 decoded. What survives noise of
    std √((1 - ᾱ_T)/ᾱ_T) (a face's layout, long hair) is paid; what the policy adds on top of it (a faint halo that
    fools the classifier) is redrawn by a model that never learnt it. z comes from the sampling generator, after
    the epoch's draws: a seed gives the same rewards on any process count, and a resumed run the same as an
    unbroken one. samples: sample()'s; -> images (B, 3, H, W) in [0, 1]."""
    device, alphas = config.device, run.scheduler.alphas_cumprod  # ᾱ for t = 0..999
    x0 = samples["latents"][:, -1].float()  # (B, C, h, w)
    z = this_process(torch.randn((config.batch_size, *x0.shape[1:]), generator=run.noise_generator, device=device))
    steps = torch.linspace(config.purify, 1, PURIFY_STEPS).round().long().tolist()  # e.g. 300, 150, 1
    x = alphas[steps[0]].sqrt() * x0 + (1 - alphas[steps[0]]).sqrt() * z
    for i, t in enumerate(steps):
        a = alphas[t]
        with autocast(config, device):
            eps = guided_noise_pred(run.base, x, torch.tensor(t, device=device), run.prompt_embeds,
                                    samples["prompt_ids"], config.guidance_scale).float()
        if run.scheduler.config.prediction_type == "v_prediction":  # SD 2.x: ε̂ and x̂_0 from v, as the DDIM step
            eps, x0_hat = a.sqrt() * eps + (1 - a).sqrt() * x, a.sqrt() * x - (1 - a).sqrt() * eps
        else:
            x0_hat = (x - (1 - a).sqrt() * eps) / a.sqrt()
        if i + 1 < len(steps):
            x = alphas[steps[i + 1]].sqrt() * x0_hat + (1 - alphas[steps[i + 1]]).sqrt() * eps
    return decode(run.vae, x0_hat, config, device)


def schedule_on_device(scheduler, device):
    """Move the noise schedule (ᾱ_t and the final ᾱ) to the device once. Left on the CPU, every DDIM step would
    copy it to the GPU (two blocking copies per step, 300 per epoch), and no step could be captured in a graph."""
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.to(device)
    return scheduler


def load_models(config, device):
    """The SD components from `config.model`, frozen weights in the mixed-precision type, attention in fp32. An SDXL
    pipeline (its model_index.json names a second text encoder) gives TextEncodersXL and a pair of tokenizers."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    path = config.model
    local = os.path.join(path, "scheduler", "scheduler_config.json")
    if os.path.exists(local):  # a local folder: its family first (a flow model has no unet/ to complain about)
        with open(local) as f:
            if check_family(json.load(f).get("_class_name", ""), path) == "flow":
                return load_flow_models(config, device)
    check_source("--model", path, "a Stable Diffusion pipeline", os.path.join("unet", "config.json"))
    if config.unet:
        check_source("--unet", config.unet, "a UNet", "diffusion_pytorch_model.safetensors")
        check_class("--unet", config.unet, "UNet2DConditionModel")
    dtype = DTYPES[config.mixed_precision]
    with loading("--model", path):
        raw = DDIMScheduler.load_config(path, subfolder="scheduler")  # the hub's file, before it is made a DDIM
        if check_family(raw.get("_class_name", ""), path) == "flow":
            return load_flow_models(config, device)
        scheduler = DDIMScheduler.from_config(raw)
        check_scheduler(scheduler.config, path, config.num_steps)  # before the large downloads
        if not config.evaluate:
            check_trained_steps(scheduler, config)
        index = pipeline_index(path)
        xl = (index.get("text_encoder_2") or [None])[0] is not None  # SDXL: a second text encoder
        unet = load_unet(config)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, low_cpu_mem_usage=False)
        if xl and dtype == torch.float16 and vae.config.force_upcast:
            vae = vae.float()  # SDXL's VAE overflows in fp16 (its pipeline upcasts it too); a fixed VAE says so
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        if xl:
            text_encoder = TextEncodersXL(
                text_encoder, CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", dtype=dtype),
                image_size=unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1),
                zeros_for_empty=index.get("force_zeros_for_empty_prompt", True))
            tokenizer = (tokenizer, CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"))
    schedule_on_device(scheduler, device)
    return prepared(unet, vae, text_encoder, tokenizer, scheduler, config, device)


def prepared(unet, vae, text_encoder, tokenizer, scheduler, config, device):
    """The loaded models on the device: everything frozen but the attention projections (train_attention_only)."""
    dtype = DTYPES[config.mixed_precision]
    vae.to(device).requires_grad_(False).eval()  # frozen: the reward is computed on its images, no gradient
    text_encoder.to(device).requires_grad_(False).eval()
    train_attention_only(unet, dtype).to(device)
    if config.low_memory:
        unet.enable_gradient_checkpointing()  # recompute activations in backward: memory for time
    return unet, vae, text_encoder, tokenizer, scheduler


def pipeline_index(path):
    """A pipeline's model_index.json (which components it has): a folder's own ({} without one), else the hub's."""
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "model_index.json")):
            return {}
        with open(os.path.join(path, "model_index.json")) as f:
            return json.load(f)
    from diffusers import DiffusionPipeline
    return DiffusionPipeline.load_config(path)


class TextEncodersXL(torch.nn.Module):
    """SDXL's two frozen text encoders, and what its conditioning needs besides them (encode_prompts_xl)."""

    def __init__(self, first, second, image_size, zeros_for_empty):
        super().__init__()
        self.first, self.second = first, second  # CLIP ViT-L; OpenCLIP bigG with its projection (the pooled one)
        self.image_size = image_size  # pixels: the size ids' original and target size (1024 for SDXL base)
        self.zeros_for_empty = zeros_for_empty  # the unconditional row is zeros (force_zeros_for_empty_prompt)


def encode_for(text_encoder, tokenizer, prompts, device):
    """The policy's conditioning for `prompts`, row 0 unconditional: encode_prompts, or SDXL's encode_prompts_xl.
    A prompt longer than the tokenizer's 77 tokens is truncated by both: a warning says so."""
    first = tokenizer[0] if isinstance(tokenizer, tuple) else tokenizer  # SDXL's two have the same length
    for prompt in prompts:
        if len(first(prompt).input_ids) > first.model_max_length:
            print(f"warning: prompt {prompt[:40]!r}... is longer than {first.model_max_length} tokens and is "
                  "truncated", file=sys.stderr)
    if isinstance(text_encoder, TextEncodersXL):
        return encode_prompts_xl(text_encoder, tokenizer, prompts, device)
    if isinstance(text_encoder, TextEncodersSD3):
        return encode_prompts_sd3(text_encoder, tokenizer, prompts, device)
    return encode_prompts(text_encoder, tokenizer, prompts, device)


@torch.no_grad()  # frozen, as encode_prompts
def encode_prompts_xl(encoders, tokenizers, prompts, device):
    """SDXL's conditioning, built as its pipeline builds it -> {"encoder_hidden_states": (1+P, L, D1+D2) both
    encoders' penultimate hidden states side by side, "text_embeds": (1+P, D2) the second's pooled projection,
    "time_ids": (1+P, 6) (original h, w; crop top, left; target h, w)}, row 0 unconditional (the empty prompt, or
    zeros where the model asks for them), row 1+p prompt p. guided_noise_pred takes the dict as it is."""
    hidden = []
    for encoder, tokenizer in zip((encoders.first, encoders.second), tokenizers):
        ids = tokenizer(["", *prompts], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])  # (1+P, L, D_i): SDXL conditions on the penultimate layer
    embeds, pooled = torch.cat(hidden, dim=-1), out.text_embeds  # pooled: the second encoder's, (1+P, D2)
    if encoders.zeros_for_empty:
        embeds[0], pooled[0] = 0, 0
    size = encoders.image_size
    time_ids = torch.tensor([size, size, 0, 0, size, size], dtype=embeds.dtype, device=device)
    return {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": time_ids.expand(len(embeds), 6)}


def family_of(text_encoder, scheduler):
    """The policy's family as load_models recognised it, for the start-up line."""
    if isinstance(text_encoder, TextEncodersSD3):
        return "SD 3.x (flow matching, Flow-GRPO's SDE step)"
    prediction = "v" if scheduler.config.prediction_type == "v_prediction" else "ε"
    if isinstance(text_encoder, TextEncodersXL):
        return f"SDXL ({prediction}-prediction)"
    return f"SD {'2.x' if prediction == 'v' else '1.x or 2.x-base'} ({prediction}-prediction)"


def load_unet(config, flow=False):
    """The fp32 UNet to train or evaluate (SD 3's transformer if `flow`): --unet's folder if given, else the
    pipeline's."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel
    kind, subfolder = (SD3Transformer2DModel, "transformer") if flow else (UNet2DConditionModel, "unet")
    if not config.unet:
        return kind.from_pretrained(config.model, subfolder=subfolder, low_cpu_mem_usage=False)
    with loading("--unet", config.unet):
        return kind.from_pretrained(config.unet, low_cpu_mem_usage=False)


def check_source(flag, path, kind, marker):
    """A local folder must exist and hold `marker`; anything else is taken for a hub id."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, marker)):
        raise UsageError(f"{flag}: {path} is not {kind} folder (no {marker})")
    if os.path.isfile(path):
        raise UsageError(f"{flag}: {path} is a file; give {kind} folder (one holding {marker}) or a hub id")
    if not os.path.isdir(path) and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise UsageError(f"{flag}: folder {path} does not exist")


def check_class(flag, path, expected):
    """A diffusers folder's config.json must name the class that will load it: a VAE's folder also holds
    diffusion_pytorch_model.safetensors, and loading it as a UNet prints pages of warnings before failing."""
    if not os.path.isdir(path):
        return
    try:
        with open(os.path.join(path, "config.json")) as f:
            found = json.load(f).get("_class_name")
    except (OSError, ValueError, AttributeError) as error:
        raise UsageError(f"{flag}: {path}/config.json cannot be read ({first_line(error)})") from None
    if found != expected:
        raise UsageError(f"{flag}: {path} holds a {found or 'model of unknown class'}, not a {expected}")


@contextlib.contextmanager
def loading(flag, path):
    """Turn a failed from_pretrained into one line naming the flag: a damaged folder, or a hub id not reached."""
    try:
        yield
    except UsageError:
        raise
    except Exception as error:  # OSError, safetensors' SafetensorError, a JSON error: all mean "cannot load"
        reason = first_line(error)
        hint = ("the folder is damaged or incomplete" if os.path.isdir(path) else
                "HF_HUB_OFFLINE is set and it is not in the local hub cache; pass a local folder, or download it once "
                "where the hub can be reached" if offline() else
                "a hub id needs network access once, or pass a local folder (HF_HUB_OFFLINE=1 for offline use)")
        raise UsageError(f"{flag}: cannot load {path!r} ({reason}); {hint}") from None


def first_line(error):
    """An exception as one short line for a one-line error: its first line, or its type when it has no text."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def check_scheduler(scheduler_config, path, num_steps):
    """Refuse a scheduler that ddim_step_with_logprob does not implement: it would train on a wrong log-prob."""
    if num_steps > scheduler_config.num_train_timesteps:
        raise UsageError(f"--num-steps: {num_steps} is more than the scheduler's {scheduler_config.num_train_timesteps} "
                         "training steps")
    kind = scheduler_config.prediction_type
    problems = [f"prediction_type={kind!r}"] if kind not in ("epsilon", "v_prediction") else []
    problems += [name for name in ("clip_sample", "thresholding") if scheduler_config.get(name)]
    if problems:
        raise UsageError(f"--model: the scheduler of {path} has {', '.join(problems)}; the DDIM log-probability here "
                         "needs epsilon (SD 1.x, SDXL) or v prediction (SD 2.x) without clip_sample or thresholding")


def check_family(scheduler_class, path):
    """'flow' for an SD 3.x pipeline (a flow-matching scheduler), '' for the DDPM family (SD 1.x, 2.x, SDXL); any
    other flow-matching model (FLUX, ...) is refused before anything loads: its step is not implemented here."""
    if "FlowMatch" not in scheduler_class:
        return ""
    pipeline = pipeline_index(path).get("_class_name", "")
    if pipeline != "StableDiffusion3Pipeline":
        raise UsageError(f"--model: {path} is a flow-matching model ({pipeline or scheduler_class}) other than SD 3.x; "
                         "the flow models trained here are SD 3.x pipelines (StableDiffusion3Pipeline), through "
                         "Flow-GRPO's SDE step")
    return "flow"


FLOW_REFUSED = ("use_dynamic_shifting", "stochastic_sampling", "invert_sigmas", "use_karras_sigmas",
                "use_exponential_sigmas", "use_beta_sigmas", "shift_terminal")  # schedules flow_step does not take


def load_flow_models(config, device):
    """SD 3.x's components, as load_models gives SD's: its transformer in the UNet's place (answering the UNet's call,
    as_policy), TextEncodersSD3 (two CLIPs and T5, or none where the pipeline has none) and their three tokenizers,
    and its FlowMatchEulerDiscreteScheduler, whose step flow_step_with_logprob makes a Gaussian policy."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel
    path = config.model
    check_source("--model", path, "an SD 3 pipeline", os.path.join("transformer", "config.json"))
    if config.unet:
        check_source("--unet", config.unet, "an SD 3 transformer", "diffusion_pytorch_model.safetensors")
        check_class("--unet", config.unet, "SD3Transformer2DModel")
    dtype = DTYPES[config.mixed_precision]
    with loading("--model", path):
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
        refused = [name for name in FLOW_REFUSED if scheduler.config.get(name)]
        if refused:
            raise UsageError(f"--model: the scheduler of {path} has {', '.join(refused)}; the flow step here takes SD "
                             "3's shifted schedule only")
        if config.num_steps > scheduler.config.num_train_timesteps:
            raise UsageError(f"--num-steps: {config.num_steps} is more than the scheduler's "
                             f"{scheduler.config.num_train_timesteps} training steps")
        if config.purify:
            raise UsageError("--purify: redraws with DDIM's ᾱ schedule (SD 1.x, 2.x, XL), not SD 3's flow")
        has_t5 = (pipeline_index(path).get("text_encoder_3") or [None])[0] is not None
        unet = as_policy(load_unet(config, flow=True))
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, low_cpu_mem_usage=False)
        clips = [CLIPTextModelWithProjection.from_pretrained(path, subfolder=f"text_encoder{n}", dtype=dtype)
                 for n in ("", "_2")]
        t5 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3", dtype=dtype) if has_t5 else None
        tokenizers = tuple(CLIPTokenizer.from_pretrained(path, subfolder=f"tokenizer{n}") for n in ("", "_2")) + (
            AutoTokenizer.from_pretrained(path, subfolder="tokenizer_3") if has_t5 else None,)
    text_encoder = TextEncodersSD3(*clips, t5, unet.config.joint_attention_dim)
    return prepared(unet, vae, text_encoder, tokenizers, scheduler, config, device)


def as_policy(model):
    """SD 3's transformer answering the UNet's call, model(x, t, encoder_hidden_states=..., added_cond_kwargs=
    {"text_embeds": pooled}), so that guided_noise_pred drives either: a forward pre-hook renames the arguments to
    the transformer's (hidden_states, timestep per row, pooled_projections). The model stays an
    SD3Transformer2DModel (its weights' names, save_pretrained). A UNet is returned as it is."""
    if type(model).__name__ != "SD3Transformer2DModel":
        return model

    def unet_call(module, args, kwargs):
        x, t = args
        t = t.expand(len(x)) if t.dim() == 0 else t  # one t in sampling, one per row in training
        return (), {"hidden_states": x, "timestep": t, "encoder_hidden_states": kwargs["encoder_hidden_states"],
                    "pooled_projections": kwargs["added_cond_kwargs"]["text_embeds"]}
    model.register_forward_pre_hook(unet_call, with_kwargs=True)
    return model


class TextEncodersSD3(torch.nn.Module):
    """SD 3's frozen text encoders: CLIP ViT-L and OpenCLIP bigG with their projections, and T5-XXL (or None, where
    the pipeline has none: zeros in its place, as its pipeline does), and the transformer's text width."""

    def __init__(self, clip_l, clip_g, t5, joint_attention_dim):
        super().__init__()
        self.clip_l, self.clip_g, self.t5, self.joint_attention_dim = clip_l, clip_g, t5, joint_attention_dim


T5_TOKENS = 256  # StableDiffusion3Pipeline's max_sequence_length default


@torch.no_grad()  # frozen, as encode_prompts
def encode_prompts_sd3(encoders, tokenizers, prompts, device):
    """SD 3's conditioning, built as StableDiffusion3Pipeline.encode_prompt builds it -> {"encoder_hidden_states":
    (1+P, 77 + 256, D): both CLIPs' penultimate hidden states side by side, padded (or cut) to T5's width D, then
    T5's 256 tokens (zeros without T5), "text_embeds": (1+P, D_L + D_G) the CLIPs' pooled projections}, row 0 the
    empty prompt (the pipeline's default negative prompt), row 1+p prompt p."""
    hidden, pooled = [], []
    for encoder, tokenizer in zip((encoders.clip_l, encoders.clip_g), tokenizers):
        ids = tokenizer(["", *prompts], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2]), pooled.append(out.text_embeds)  # (1+P, 77, D_i), (1+P, D_i)
    dtype = encoders.clip_l.dtype
    if encoders.t5 is None:
        t5 = torch.zeros(1 + len(prompts), T5_TOKENS, encoders.joint_attention_dim, device=device, dtype=dtype)
    else:
        ids = tokenizers[2](["", *prompts], padding="max_length", max_length=T5_TOKENS, truncation=True,
                            add_special_tokens=True, return_tensors="pt").input_ids.to(device)
        t5 = encoders.t5(ids)[0]
    clip = torch.cat(hidden, dim=-1).to(dtype)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # to T5's width, as the pipeline
    return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2), "text_embeds": torch.cat(pooled, dim=-1)}


def check_trained_steps(scheduler, config):
    """Refuse a trained step whose σ_t is 0: it is deterministic and has no log-probability, so its loss would be NaN.
    timestep_spacing="linspace" ends at t = 0, where ᾱ_{t-1} (the final ᾱ) equals ᾱ_t; SD's "leading" never does."""
    scheduler.set_timesteps(config.num_steps)
    trained = scheduler.timesteps[:config.num_steps - config.skip_final_steps]  # (T - skip,)
    x = torch.zeros(len(trained), 1, 1, 1)  # σ_t does not depend on x; noise=x draws nothing from the seeded RNG
    std = ddim_step_with_logprob(scheduler, x, trained, x, config.eta, noise=x)[3].flatten()
    zero = (std == 0).nonzero().flatten().tolist()
    if zero:
        i = zero[0]
        raise UsageError(f"--skip-final-steps: step {i + 1} of {config.num_steps} (t = {int(trained[i])}) has σ_t = 0 "
                         f"under the scheduler's timestep_spacing={scheduler.config.timestep_spacing!r}, so it has no "
                         f"log-probability to train; give --skip-final-steps {config.num_steps - i} or more")


def load_classifier(config, device, flag="--classifier", path=None):
    path = path or config.classifier
    return load_transformers_model(flag, path, "an image-classification model",
                                   lambda: rewards.Classifier(path, classes_of(config), device=device,
                                                              ensemble=config.ensemble if flag == "--classifier"
                                                              else ""),
                                   rewards.LabelError,  # a class it has no label of: a typo in --classes if given
                                   "--classes" if config.classes != Config.classes else flag)


def python_reader(spec):
    """--independent-classifier MODULE:NAME (a Python reader), not a hub id or a folder."""
    return bool(re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", spec)) and not os.path.exists(spec)


def load_independent(config, device):
    """--independent-classifier: a classifier as --classifier's, or MODULE:NAME called with the run's classes."""
    spec = config.independent_classifier
    if not python_reader(spec):
        return load_classifier(config, device, "--independent-classifier", spec)
    module, name = spec.split(":")
    try:
        return getattr(importlib.import_module(module), name)(classes_of(config), device=device)
    except Exception as error:  # not importable, no such name, or the reader refused the classes
        raise UsageError(f"--independent-classifier: cannot make the reader {spec} ({first_line(error)})") from None


def load_quality_model(config, device):
    """The model of CLIP-T and CLIP-I; None for --clip-model none (bias only)."""
    if config.clip_model == "none":
        return None
    return load_transformers_model("--clip-model", config.clip_model, "a CLIP or image model",
                                   lambda: rewards.QualityModel(config.clip_model, device=device),
                                   rewards.QualityModelError)


def load_transformers_model(flag, path, kind, make, refused, refused_flag=None):
    """make() from a hub id or a folder (two, comma-separated, for --classifier); a missing or damaged one is one
    line naming `flag`, a refused one (`refused`: the class's own error, e.g. no label of a class) one naming
    `refused_flag` (default `flag`)."""
    for part in path.split(","):
        check_source(flag, part, kind, "config.json")
    with loading(flag, path):
        try:
            return make()
        except refused as error:
            raise UsageError(f"{refused_flag or flag}: {error}") from None


def load_judge(config):
    """The judge for --labeller judge or --reward rank, checked at once (reachable, key taken), else None."""
    if config.labeller != "judge" and config.reward != "rank":
        return None
    judge = rewards.Judge(config.judge_url, config.judge_model, config.judge_criterion, config.judge_group,
                          config.judge_image_size, config.seed, classes=classes_of(config))
    judge.check()  # JudgeError, one line naming --judge-url (main)
    return judge


def is_hub_id(path):
    """A --model or --classifier that names no local folder and does not look like a path (check_source)."""
    return not os.path.isdir(path) and not path.startswith((".", "/", "~")) and path.count("/") <= 1


def check_hub(config, timeout=5):
    """Without a network, the hub client retries each file for about half a minute and prints every retry. So when
    a hub id is used and HF_HUB_OFFLINE is not set, ask the hub once: if it cannot be reached, go offline (models
    already in the local cache load from it, as with HF_HUB_OFFLINE=1) and refuse an id that is not cached."""
    sources = [("--model", config.model, "model_index.json")]
    if config.labeller == "classifier":
        sources += [("--classifier", path, "config.json") for path in config.classifier.split(",")]
    if config.independent_classifier and not python_reader(config.independent_classifier):
        sources += [("--independent-classifier", p, "config.json") for p in config.independent_classifier.split(",")]
    if (config.evaluate or config.eval_every) and config.clip_model != "none":
        sources.append(("--clip-model", config.clip_model, "config.json"))
    sources = [source for source in sources if is_hub_id(source[1])]
    if not sources or offline():  # offline: each model loads from the cache or fails naming its flag (loading)
        return
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
        return
    except urllib.error.HTTPError:  # it answered: reachable
        return
    except (OSError, ValueError) as error:  # no route, no name, refused, timed out
        reason = first_line(getattr(error, "reason", error))
    os.environ["HF_HUB_OFFLINE"] = "1"  # read when huggingface_hub is first imported, which is after this
    from huggingface_hub import try_to_load_from_cache
    for flag, repo, marker in sources:
        if not isinstance(try_to_load_from_cache(repo, marker), str):
            raise UsageError(f"{flag}: {repo} is not in the local hub cache and {endpoint} cannot be reached "
                             f"({reason}); pass a local folder, or download it once where the hub can be reached")


def offline():
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


# ------------------------------------------------------------------------------------------- sizes derived before the loop
CLIP_TIMES_SQRT_N = 1e-4 * 128  # ε·√N, N = C·H·W: DDPO's ε = 1e-4 on SD's 16384 elements, times √16384


def derived_sizes(config, unet, world=1):
    """The sizes that follow from the config and the model, computed once and printed before the loop.

    ε = CLIP_TIMES_SQRT_N/√N, N = C·H·W: a move of the step mean that costs k nats of KL per element gives the stored
    samples log r of typical size √(2k/N) (truly_ppo_loss), so the same ε·√N bounds the same per-element move on
    any latent (on the toy world's 4x8x8, SD's 1e-4 clipped far too much: docs/toy-world.md). The learning rate
    has no such rule: it depends on the network, not only on N."""
    c, s = unet.config.in_channels, unet.config.sample_size
    clip_range = config.clip_range or CLIP_TIMES_SQRT_N / math.sqrt(c * s * s)
    return {"latent": (c, s, s), "micro_batch": micro_batch(config, world), "clip_range": clip_range,
            "kl_threshold": config.kl_threshold or clip_range**2 * c * s * s / 2}  # δ = ε²·C·H·W/2


def micro_batch(config, world=1):
    """b: (image, step) pairs per UNet call of the update. Up to a process's B / N / updates_per_epoch images of an
    update (N = world), b images at one step each, and b divides them (validate); above, all of them at k steps each,
    k the largest divisor of the trained steps with k·images <= --train-batch-size. So every micro-batch has the same
    shape: one compiled graph, no recompiles."""
    if config.train_batch_size <= config.batch_size // world // config.updates_per_epoch:
        return config.train_batch_size
    return max(b for b in stackable(config, world) if b <= config.train_batch_size)


def stackable(config, world=1):
    """The micro-batches b that split an update's pairs into equal (image, step) blocks: the divisors of its images,
    and its images times each divisor of the trained steps."""
    per_update, trained = config.batch_size // world // config.updates_per_epoch, trained_steps(config)
    return sorted({b for b in range(1, per_update + 1) if per_update % b == 0}
                  | {per_update * k for k in range(1, trained + 1) if trained % k == 0})


# ------------------------------------------------------------------------------------- --train-batch-size auto: counted
class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of the storages created inside this mode that are still alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.sizes = 0, 0, {}

    def _free(self, key):
        self.live -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata  # one StorageImpl, however many views of it exist
                if key not in self.sizes:
                    self.sizes[key] = storage.nbytes()
                    self.live += self.sizes[key]
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key)
        return out


@contextlib.contextmanager
def fp32_norms():
    """Run group_norm and layer_norm in fp32, as CUDA autocast does (the CPU's keeps them in bf16)."""
    group_norm, layer_norm = F.group_norm, F.layer_norm
    up = lambda t: None if t is None else t.float()
    F.group_norm = lambda x, g, w=None, b=None, eps=1e-5: group_norm(x.float(), g, up(w), up(b), eps)
    F.layer_norm = lambda x, shape, w=None, b=None, eps=1e-5: layer_norm(x.float(), shape, up(w), up(b), eps)
    try:
        yield
    finally:
        F.group_norm, F.layer_norm = group_norm, layer_norm


def update_memory(unet, scheduler, prompt_embeds, config, micro_batches=(1, 2)):
    """The peak bytes of one update micro-batch (forward and backward of b pairs with guidance, the log-prob, the loss,
    the trained weights' gradients) for each b, counted without running it: on a copy of the UNet built from its
    config with fake weights (FakeTensorMode: shapes and dtypes, no data), in the run's precision, with CUDA
    autocast's fp32 norms and the run's gradient checkpointing. tests/count_memory.py prints the whole model."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    peaks, cpu = {}, dataclasses.replace(config, device="cpu")
    steps = type(scheduler).from_config(scheduler.config)  # on the CPU, with real values: its set-up reads them
    steps.set_timesteps(config.num_steps)
    with FakeTensorMode(allow_non_fake_inputs=True), fp32_norms():
        fake = train_attention_only(as_policy(type(unet).from_config(unet.config)), DTYPES[config.mixed_precision])
        if unet.is_gradient_checkpointing:  # --low-memory
            fake.enable_gradient_checkpointing()
        embeds = torch.utils._pytree.tree_map(lambda t: torch.zeros(t.shape, dtype=t.dtype), prompt_embeds)
        c, s = unet.config.in_channels, unet.config.sample_size
        for b in micro_batches:
            samples = {"latents": torch.randn(b, 2, c, s, s), "timesteps": steps.timesteps[:1],
                       "prompt_ids": torch.zeros(b, dtype=torch.long)}
            tracker = LiveBytes()
            with tracker:
                log_prob = policy_step(fake, steps, embeds, samples, torch.arange(b), torch.zeros(b, dtype=torch.long),
                                       cpu)[0]
                ppo_clip_loss(log_prob, log_prob.detach(), torch.ones(b), 1e-4)[0].backward()
                del log_prob
            fake.zero_grad(set_to_none=True)
            peaks[b] = tracker.peak
    return peaks


def free_memory(device):
    """Bytes free on `device`: the GPU's (torch.cuda.mem_get_info), or the CPU's available memory."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def auto_micro_batch(config, unet, scheduler, prompt_embeds, world=1, free=None):
    """--train-batch-size auto: the largest b micro_batch() allows whose counted peak fits 90% of the free memory, less
    what the loop has yet to allocate (AdamW's two moments at the first step, the epoch's trajectories). The peak is
    linear in b (update_memory at 1 and 2 pairs: fixed + b·per pair). free: bytes, free_memory(device) if None."""
    one, two = update_memory(unet, scheduler, prompt_embeds, config).values()
    per_pair, fixed = two - one, 2 * one - two
    c, s = unet.config.in_channels, unet.config.sample_size
    later = (8 * sum(p.numel() for p in trainable_parameters(unet).values())  # AdamW: two fp32 moments
             + config.batch_size * (2 * config.num_steps + 1) * c * s * s * 4)  # latents and means, fp32
    budget = 0.9 * (free_memory(config.device) if free is None else free) - later
    return max([b for b in stackable(config, world) if fixed + b * per_pair <= budget], default=1)


# ---------------------------------------------------------------------------------------- a run's state
@dataclass
class Run:
    """What a training run holds from epoch to epoch, in one place: the loop uses it, the checkpoint saves it."""
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object
    labeller: object  # images (B, 3, H, W) -> P(class) (B, K): the classifier, or the judge with --labeller judge
    judge: object  # rewards.Judge with --labeller judge or --reward rank, else None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    prompt_embeds: torch.Tensor  # (1+P, L, D), encode_prompts
    noise_generator: torch.Generator  # the sampling noise's, on the device
    shuffle_generator: torch.Generator  # the update's shuffles', on the CPU
    history: rewards.PromptHistory
    lead: bool = True  # the process that writes and prints: rank 0 under torchrun
    flops: tuple | None = None  # --profile: count_flops
    bar: object = None  # the epochs' progress bar
    streak: int = 0  # optimizer steps skipped in a row for non-finite values (MAX_NONFINITE)
    held_out: object = None  # --eval-every: HeldOutCheck
    base: object = None  # --kl-base: the pre-trained model (frozen_base)
    independent: object = None  # --independent-classifier: images -> P(class), for the metrics only


def start_run(config, classifier=None):
    """Everything before the first epoch: device and precision, the judge, the models, the optimizer, the prompts
    and their windows, the resume, config.json and the startup line.
    -> (Run, the config as run, the metrics so far, the first epoch to run)."""
    auto = config.mixed_precision == "auto"
    config = resolve_device(config)
    device, (rank, world), out = config.device, launched(), config.output_dir
    lead = rank == 0  # the process that writes and prints
    torch.manual_seed(config.seed)
    judge = load_judge(config)  # first: an unreachable judge is reported before minutes of loading
    unet, vae, text_encoder, tokenizer, scheduler = load_models(config, device)
    labeller = classifier or (judge if config.labeller == "judge" else load_classifier(config, device))
    labeller = rewards.augmented(labeller) if config.augment else labeller
    prompts = read_prompts(config.prompts, "--prompts", warn=lead) if config.prompts else [config.prompt]
    params = trainable_parameters(unet)
    run = Run(unet=unet, vae=vae, scheduler=scheduler, labeller=labeller, judge=judge,
              optimizer=torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=1e-4),  # DDPO's weight decay
              scaler=make_scaler(config, device),
              prompt_embeds=encode_for(text_encoder, tokenizer, prompts, device),  # (1+P, L, D) or SDXL's dict, once
              noise_generator=torch.Generator(device).manual_seed(config.seed),
              shuffle_generator=torch.Generator().manual_seed(config.seed + 1),
              history=rewards.PromptHistory(prompts, config.balance_window or config.batch_size,
                                            None if config.underrepresented == "auto" else config.underrepresented.lower(),
                                            announce=lead, target=target_of(config), threshold=config.threshold),
              lead=lead)
    if config.independent_classifier:
        run.independent = load_independent(config, device)
    if config.kl_base > 0 or config.purify:  # the trained weights before any update or resume: the base model's
        run.base = frozen_base(unet, {name: p.detach().clone() for name, p in params.items()})
    metrics, first = [], 0
    if config.resume and run_state(out) == "checkpoint":  # every rank reads it: the RNG states are the same on all
        state = load_checkpoint(os.path.join(out, "checkpoint.pt"), run)
        metrics, first = state["metrics"], state["epoch"] + 1
        if config.epochs < first or (config.epochs == first and os.path.isdir(os.path.join(out, "unet"))):
            raise UsageError(f"--epochs: {out} already finished {first} epochs; ask for more than {first}")
        if lead:
            print(f"resuming {out} after epoch {state['epoch']}")
    elif config.resume and lead:  # the run died before its first checkpoint: start it again, keeping what it logged
        kept = os.path.join(out, f"metrics-unsaved-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
        if run_state(out) == "epochs":
            os.replace(os.path.join(out, "metrics.jsonl"), kept)
        print(f"{out} has no checkpoint: starting again from epoch 0"
              + (f" (its metrics so far are in {kept})" if os.path.exists(kept) else ""))
    if config.train_batch_size == 0:  # --train-batch-size auto: the most pairs that fit, counted once
        config = dataclasses.replace(config, train_batch_size=auto_micro_batch(config, unet, scheduler,
                                                                               run.prompt_embeds, world))
    sizes = derived_sizes(config, unet, world)
    config = dataclasses.replace(config, clip_range=sizes["clip_range"],  # ε, δ and b as used, saved in config.json
                                 kl_threshold=sizes["kl_threshold"], train_batch_size=sizes["micro_batch"])
    if lead:
        record_overrides(config, out, first)
        if config.prompts and os.path.abspath(config.prompts) != os.path.abspath(os.path.join(out, "prompts.txt")):
            shutil.copyfile(config.prompts, os.path.join(out, "prompts.txt"))  # --resume finds them if the file moves
        write_json(os.path.join(out, "config.json"), {**dataclasses.asdict(config),  # and the family recognised
                                                      "family": family_of(text_encoder, scheduler)})
        write_json(os.path.join(out, "metrics.jsonl"), metrics, lines=True)  # drops lines past the checkpoint
        print(f"{family_of(text_encoder, scheduler)}; device {device}{f' x {world} ranks' if world > 1 else ''}"
              f"{cpu_threads(device)}, "
              f"{config.mixed_precision}{' (auto)' if auto else ''}; B={config.batch_size} images x T={config.num_steps} steps"
              + (f" (the last {config.skip_final_steps} not trained)" if config.skip_final_steps else "")
              + (f", {trained_steps(config)} trained per image" if config.train_fraction < 1 else "")
              + (f" over P={len(prompts)} prompts (q over the last {run.history.size} images of each)"
                 if len(prompts) > 1 else "") + ", "
              f"latent {'x'.join(map(str, sizes['latent']))}; {config.updates_per_epoch} updates/epoch of "
              f"{config.batch_size // config.updates_per_epoch} images in micro-batches of {sizes['micro_batch']} (image, step) pairs"
              f"{' per rank' if world > 1 else ''}; {sum(p.numel() for p in params.values()) / 1e6:.2f}M trainable "
              "attention weights" + (f"; Truly PPO δ={config.kl_threshold:.3g}, α={config.truly_alpha:g}"
                                     if config.trust_region == "truly" else f"; clip ε={config.clip_range:.3g}"))
    if config.eval_every:  # its reference images are the model's before any update, also after --resume
        run.held_out = HeldOutCheck(config, run, text_encoder, tokenizer, os.path.join(out, "held_out_reference.pt"),
                                    resumed=first > 0)
    # FLOPs are counted before compiling: count_flops's one-image shape would otherwise be one more graph.
    run.flops = count_flops(unet, run.prompt_embeds, config, device) if config.profile else None
    if config.compile:  # static shapes: two graphs, sampling (2B rows) and training (2b rows, forward and backward);
        unet.compile(dynamic=False)  # in place, so parameter names stay the same
    run.bar = tqdm(desc="epochs", initial=first, total=config.epochs, disable=not lead)
    return run, config, metrics, first


def record_overrides(config, out, first):
    """--resume with other settings: config.json is rewritten as run from now on, so the settings it replaces are
    kept in overrides.jsonl, one line per resume: {"from_epoch": the first epoch run with them, "changed":
    {field: [before, after]}}."""
    path = os.path.join(out, "config.json")
    if not config.resume or not os.path.exists(path):
        return
    with open(path) as f:
        before = json.load(f)
    changed = {k: [before.get(k), v] for k, v in dataclasses.asdict(config).items()
               if k not in ("resume", "output_dir") and before.get(k) != v}
    if changed:
        with open(os.path.join(out, "overrides.jsonl"), "a") as f:
            f.write(json.dumps({"from_epoch": first, "changed": changed}) + "\n")


def finish_run(run, config):
    """After the last epoch: the fine-tuned UNet, saved by the process that writes."""
    run.bar.close()
    if run.lead:
        save_unet(run.unet, config, os.path.join(config.output_dir, "unet"))
        print(f"done: {config.output_dir}/unet, metrics in {config.output_dir}/metrics.jsonl")


# ------------------------------------------------------------------------------------- an epoch's record
class Laps:
    """Seconds of each phase of an epoch: each call syncs the device, so a phase's GPU work counts in that phase."""

    def __init__(self, device):
        self.device, self.seconds, self.start = device, {}, time.perf_counter()
        self.last = self.start

    def __call__(self, phase):
        sync(self.device)
        now = time.perf_counter()
        self.seconds[phase], self.last = now - self.last, now


def finite_or_none(x):
    return x if x is None or math.isfinite(x) else None  # JSON has no NaN


def judge_ranks(config, run, images, prompt_ids):
    """--reward rank: the judge's centred Borda scores (B,) of the epoch's images, each process ranking its own
    images (with their prompts); None for every other reward."""
    if config.reward != "rank":
        return None
    mine = [run.history.prompts[p] for p in this_process(prompt_ids).tolist()]
    return gather(run.judge.rank(images, mine))


def epoch_record(epoch, run, config, laps, reward_values, labels, per_prompt, reward_range, stats, skipped,
                 grad_norms):
    """The epoch's line of metrics.jsonl (docs/outputs.md). stats: update()'s (micro-batches, 7), or None without
    an update; averaged over the update's micro-batches and over the processes."""
    device, B, T = config.device, config.batch_size, config.num_steps
    (loss, approx_kl, clipfrac, kl, rollback_frac, kl_base, _), first_update = [None] * 7, [None] * 7
    if stats is not None:
        on_policy = stats[:len(stats) // config.updates_per_epoch]  # the first update's: r = 1 but for precision
        means = torch.stack([stats.mean(dim=0), on_policy.mean(dim=0)])  # (2, 7)
        means = gather(means[None]).mean(dim=0)  # the processes' mean
        (loss, approx_kl, clipfrac, kl, rollback_frac, kl_base, _), first_update = [[finite_or_none(x) for x in row]
                                                                                    for row in means.tolist()]
    shared = set(run.history.underrepresented)  # R_shift's U, when every prompt has the same
    seconds = laps.seconds
    record = {"epoch": epoch, "reward_mean": finite_or_none(reward_values.mean().item()),
              "reward_std": finite_or_none(reward_values.std().item()),
              **rewards.bias_report(labels, run.history.target),  # counts, shares (q), bias, KL to the target
              "underrepresented": shared.pop() if config.reward == "shift" and len(shared) == 1 else None,
              "loss": loss, "approx_kl": approx_kl, "clipfrac": clipfrac, "kl": kl,
              "rollback_frac": rollback_frac, "grad_norm": grad_norms, "skipped_steps": skipped,
              "onpolicy_log_ratio_rms": None if first_update[1] is None else math.sqrt(2 * first_update[1]),
              "onpolicy_clipfrac": first_update[2],  # the rms of log r from approx_kl = ½·mean (log r)²
              # the rounding between the sampler's log-probs and the first update's: what --old-log-probs update removes
              "sampler_log_ratio_rms": None if first_update[6] is None else math.sqrt(first_update[6]),
              "equal_rewards": reward_range == 0,
              "sample_seconds": seconds["sample"], "reward_seconds": seconds["reward"],
              "train_seconds": seconds["train"], "images_per_second": B / (laps.last - laps.start),
              "per_prompt": per_prompt}
    if config.kl_base > 0:  # the mean KL to the base model over the epoch's trained steps (DPOK's anchor)
        record["kl_base"] = kl_base
    if run.judge:  # the judge's requests, retries, unparsed answers and tokens this epoch, summed over the ranks
        counts = run.judge.take_stats()
        total = gather(torch.tensor([list(counts.values())], dtype=torch.float64, device=device)).sum(dim=0)
        record["judge"] = dict(zip(counts, map(int, total.tolist())))
    if run.held_out and (epoch + 1) % config.eval_every == 0:  # --eval-every: after this epoch's update
        record["held_out"] = run.held_out(run, config, epoch)
    if run.flops:  # --profile: achieved UNet TFLOP/s per phase, and the peak GPU memory of the epoch
        record["sample_tflops"] = run.flops[0] * B * T / seconds["sample"] / 1e12
        record["train_tflops"] = (run.flops[1] * B * trained_steps(config) / seconds["train"] / 1e12
                                  if reward_range > 0 else None)  # no update ran (equal or non-finite rewards): no rate
        if torch.device(device).type == "cuda":
            record["peak_memory_gb"] = peak_memory_gb(device)
    return record


def end_epoch(epoch, run, config, metrics, scored, interrupted):
    """Write the epoch's metrics and pictures, save a checkpoint when due, and stop (RunError, Interrupted) after a
    signal or after MAX_NONFINITE optimizer steps skipped in a row. scored: every process's (images, P(class), labels)."""
    record, out = metrics[-1], config.output_dir
    if run.independent:  # --independent-classifier: the same images through a classifier the reward never used
        labels = rewards.label_images(run.independent(scored[0]), classes_of(config), config.threshold)
        record["independent"] = rewards.bias_report(labels, run.history.target)
    run.streak = skipped_in_a_row(run.streak, record["grad_norm"], record["skipped_steps"])
    stop = run.streak >= MAX_NONFINITE  # the weights are still finite: the bad steps were skipped, not taken
    signalled = bool(gather(torch.tensor([len(interrupted)], device=config.device)).max())  # on any rank: all
    if run.lead:  # stop after the same epoch, so that the checkpoint holds the state of every rank
        write_json(os.path.join(out, "metrics.jsonl"), metrics, lines=True)
        rewards.save_grid(*scored, f"epoch {epoch}", os.path.join(out, f"samples_{epoch:04d}.png"),
                          threshold=config.threshold)
        rewards.save_plot(metrics, os.path.join(out, "plot.png"), run.history.target)
        run.bar.set_postfix(reward=record["reward_mean"], bias=record["bias"])
        run.bar.update()
        if (epoch + 1) % config.save_every == 0 or epoch + 1 == config.epochs or signalled or stop:
            save_checkpoint(os.path.join(out, "checkpoint.pt"), run, epoch, metrics)
    if stop:
        raise RunError(f"stopped after epoch {epoch}: {run.streak} optimizer steps in a row had non-finite rewards, "
                       "losses or gradients; try a lower --lr or --mixed-precision bf16 (checkpoint saved)")
    if signalled:
        raise Interrupted(interrupted[0] if interrupted else signal.SIGTERM)


def skipped_in_a_row(streak, grad_norms, skipped):
    """The optimizer steps skipped in a row, counted across epochs: each skipped step (a non-finite gradient, whose
    norm is None; or, when no update ran, `skipped` steps of non-finite rewards) adds one, each step taken resets
    it to 0. An epoch of equal rewards takes no step and changes nothing."""
    for norm in grad_norms if grad_norms is not None else [None] * skipped:
        streak = streak + 1 if norm is None else 0
    return streak


# --------------------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path, run, epoch, metrics):
    """Everything needed to continue bit-for-bit on the CPU, written atomically (temp file, then rename)."""
    state = {"weights": trained_weights(run.unet), "optimizer": run.optimizer.state_dict(),
             "scaler": run.scaler.state_dict(), "epoch": epoch, "rng_cpu": torch.get_rng_state(),
             "generators": [g.get_state() for g in (run.noise_generator, run.shuffle_generator)],
             "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
             "history": run.history.state_dict(), "metrics": metrics}
    try:
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)  # a kill during the save leaves the previous checkpoint intact
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write as a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        size = sum(w.numel() * 4 for w in state["weights"].values()) * 3  # weights and AdamW's two moments
        full = shutil.disk_usage(os.path.dirname(path) or ".").free < size
        reason = "no space left on device" if full else getattr(error, "strerror", None) or str(error).splitlines()[0]
        raise RunError(f"{reason} while writing {path}; the previous checkpoint, if any, is intact") from None


def load_checkpoint(path, run):
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)  # our own file: it holds python lists
        params = trainable_parameters(run.unet)
        other = [k for k, w in state["weights"].items() if k not in params or params[k].shape != w.shape]
    except Exception as error:  # truncated, empty, garbage
        raise UsageError(f"--resume: {path} is damaged ({first_line(error)}); it cannot be continued") from None
    if other or len(state["weights"]) != len(params):  # intact, but of another model: the model's folder changed
        raise UsageError(f"--resume: {path} holds weights of another model than the UNet loaded now (e.g. "
                         f"{(other or sorted(set(params) - set(state['weights'])) or ['?'])[0]}); the run's model "
                         "folder was changed since it started")
    try:
        with torch.no_grad():
            for name, weight in state["weights"].items():
                params[name].copy_(weight)
        run.optimizer.load_state_dict(state["optimizer"]), run.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        for g, g_state in zip((run.noise_generator, run.shuffle_generator), state["generators"]):
            g.set_state(g_state)
        run.history.load_state_dict(state["history"])
    except Exception as error:  # an entry missing or garbled: it cannot be continued
        raise UsageError(f"--resume: {path} is damaged ({first_line(error)}); it cannot be continued") from None
    if state["history"]["prompts"] != run.history.prompts:
        raise UsageError(f"--prompts: the run was trained on other prompts ({len(state['history']['prompts'])}); "
                         "resume it with the prompts it started with")
    classes = state["history"].get("classes", list(rewards.GENDER))  # a checkpoint from before --classes: gender
    if [c.lower() for c in classes] != run.history.classes:  # its windows hold P(class) of those classes
        raise UsageError(f"--classes: the run was trained on {','.join(classes)}; resume it with those classes")
    if state["rng_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return state


def save_unet(unet, config, path):
    """The fine-tuned UNet for `UNet2DConditionModel.from_pretrained`: the original fp32 UNet (not its bf16
    copy) with the trained attention weights copied in, so no frozen weight is rounded."""
    full = load_unet(config, flow=type(unet).__name__ == "SD3Transformer2DModel")
    full.load_state_dict(trained_weights(unet), strict=False)
    full.save_pretrained(path + ".tmp")  # then renamed: a kill during the save leaves no half-written `unet/`
    shutil.rmtree(path, ignore_errors=True)
    os.replace(path + ".tmp", path)


def trained_weights(unet):
    """The trained attention weights as fp32 CPU tensors; refuses non-finite ones, which must never be saved."""
    params = trainable_parameters(unet)
    if not torch.stack([p.isfinite().all() for p in params.values()]).all():  # on the device, one host sync
        raise RuntimeError("refusing to save non-finite weights")
    return {name: p.detach().float().cpu() for name, p in params.items()}


# ------------------------------------------------------------------------------------------------------------- signals
@contextlib.contextmanager
def graceful_stop():
    """The first Ctrl-C or SIGTERM (timeout, Slurm, preemption) asks the loop to finish its epoch and save; a
    second quits at once. Yields the list where the first signal's number lands; restores the handlers after."""
    received = []

    def handler(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)
        again = "Ctrl-C again" if signum == signal.SIGINT else "SIGTERM again, or Ctrl-C,"
        print(f"\n{signal.Signals(signum).name}: finishing this epoch and saving a checkpoint ({again} to quit now)",
              file=sys.stderr)
    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


# ------------------------------------------------------------------------------------------------ device and precision
def resolve_device(config):
    """The device and precision the run uses, in place of '' and 'auto' (config.json records these)."""
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    precision = config.mixed_precision
    if precision == "auto":  # bf16 where the GPU has it; fp16 on older GPUs; fp32 on the CPU, where bf16 is slower
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.startswith("cuda") else "no"
    old = config.old_log_probs
    if old == "auto":  # exact on-policy where the sampler's and the update's batch shapes round differently
        old = "update" if precision != "no" or device.startswith("cuda") else "sampler"
    return dataclasses.replace(config, device=device, mixed_precision=precision, old_log_probs=old)


def cpu_threads(device):
    """The startup line's note of torch's CPU threads, and a hint when other programs keep cores busy. The count is
    never chosen from the load: a CPU run's numbers depend on it (in the 6th digit), so a seed would no longer
    reproduce a run. Measured in docs/speed-and-memory.md ("Threads on the CPU")."""
    if torch.device(device).type != "cpu":
        return ""
    threads, busy = torch.get_num_threads(), os.getloadavg()[0]
    if busy >= 0.5 and threads > 1 and "OMP_NUM_THREADS" not in os.environ:
        print(f"note: other programs keep about {busy:.1f} of {os.cpu_count()} cores busy; if epochs are slow, "
              f"OMP_NUM_THREADS={max(1, threads - math.ceil(busy - 0.5))} may be faster than {threads} threads "
              "(docs/speed-and-memory.md)", file=sys.stderr)
    return f" ({threads} thread{'s' if threads > 1 else ''})"


def autocast(config, device):
    return torch.autocast(torch.device(device).type, dtype=DTYPES[config.mixed_precision],
                          enabled=config.mixed_precision != "no")


def make_scaler(config, device):
    """fp16 only: the loss is scaled by S before backward so that small gradients do not underflow. The gradient at
    the UNet output is about 1.3e-3·|A|·|z| per element (|A| ≤ 5, |z| ≲ 4): S = 2^12 puts it between ~5e-2 and
    ~100, well inside fp16's normal range (6e-5 to 65504) with ~600x headroom for growth through backward. An
    overflow halves S and skips that step; S doubles after 20 clean steps, so a halving is undone within 10 epochs
    (torch's default of 2000 steps never comes in a 200-step default run: S could only ever shrink)."""
    return torch.amp.GradScaler(torch.device(device).type, init_scale=2.0**12, growth_interval=20,
                                enabled=config.mixed_precision == "fp16")


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)  # only at phase boundaries, so the seconds below are the GPU's real time


def peak_memory_gb(device):
    """The peak memory allocated on this GPU since the last call, in GiB (of `device`: cuda:1 is not cuda:0)."""
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak


# ------------------------------------------------------------------------------------------------------- FLOP counting
def count_flops(unet, prompt_embeds, config, device):
    """FLOPs of one image-step with CFG: sampling (forward) and training (forward + backward), counted once."""
    from torch.utils.flop_counter import FlopCounterMode
    c, s = unet.config.in_channels, unet.config.sample_size
    x, t, ids = torch.randn(1, c, s, s, device=device), torch.tensor([500], device=device), torch.zeros(1, dtype=int)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), autocast(config, device):
        guided_noise_pred(unet, x, t, prompt_embeds, ids.to(device), config.guidance_scale)
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        with autocast(config, device):
            noise_pred = guided_noise_pred(unet, x, t, prompt_embeds, ids.to(device), config.guidance_scale)
            noise_pred.float().mean().backward()
    unet.zero_grad(set_to_none=True)
    return forward, counter.get_total_flops()


# --------------------------------------------------------------------------------------------- several GPUs (torchrun)
# `torchrun --nproc-per-node N ddpo_debias.py ...` starts N processes (ranks) with RANK, WORLD_SIZE, LOCAL_RANK,
# MASTER_ADDR and MASTER_PORT in their environment; without them nothing calls torch.distributed. Each helper below
# does nothing with one process:
# - this_process: rank r draws rows r·B/N..(r+1)·B/N of the epoch's images (sample) and trains on them (update);
# - gather: P(class) is gathered, so every rank computes q, U, the rewards and the advantages of the whole epoch;
# - average_gradients: before each optimizer step, so every rank takes the same step and holds the same weights;
# - progress: rank 0 alone shows progress, and writes files (Run.lead).
DIST_TIMEOUT = datetime.timedelta(minutes=10)  # a collective that waits longer on a stuck rank fails: no endless hang


def launched():
    """(rank, world size N) from torchrun's environment; (0, 1) for a plain `python ddpo_debias.py`."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    return (int(os.environ.get("RANK", 0)) if world > 1 else 0), world


def join_ranks(config):
    """Join the other ranks: NCCL between GPUs (rank on cuda:LOCAL_RANK), gloo on the CPU. -> the config to run."""
    if launched()[1] == 1:
        return config
    if config.device == "cuda" or (not config.device and torch.cuda.is_available()):
        config = dataclasses.replace(config, device=f"cuda:{os.environ.get('LOCAL_RANK', 0)}")
        torch.cuda.set_device(config.device)
    torch.distributed.init_process_group("nccl" if config.device.startswith("cuda") else "gloo", timeout=DIST_TIMEOUT)
    return config


@contextlib.contextmanager
def exchange():
    """Around every collective: one that fails (a rank died, or DIST_TIMEOUT passed; gloo and NCCL raise a bare
    RuntimeError) becomes a one-line RunError naming this rank. Other RuntimeErrors keep their traceback."""
    try:
        yield
    except RuntimeError as error:
        reason = first_line(error).split("] ", 1)[-1][:100]  # gloo's message without its source-file prefix
        raise RunError(f"rank {launched()[0]}: another rank stopped or cannot be reached ({reason}); continue the "
                       "run with --resume") from None


def gather(x):
    """Every process's rows, in rank order, on every process: (B/N, ...) -> (B, ...). One process: x itself."""
    world = launched()[1]
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    with exchange():
        torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def this_process(x):
    """This process's rows of an epoch's (B, ...) tensor: rows r·B/N..(r+1)·B/N of rank r. One process: x itself.
    Every process draws the epoch's whole noise from the same generator and keeps its rows (sample), so the
    epoch's images are the same however many processes draw them (cheap: a randn of B latents per step)."""
    rank, world = launched()
    if world == 1:
        return x
    b = x.shape[0] // world
    return x[rank * b:(rank + 1) * b]


def average_gradients(params):
    """The mean of the processes' gradients, in place; nothing with one process. Each process's is the mean over its
    B/N images (equal shares), so this is the mean over the update's images, as with one process. Written out
    rather than DistributedDataParallel: gradients accumulate over micro-batches and steps and are exchanged once,
    here, where the reader sees it (DDP would exchange them in every backward unless wrapped in no_sync). Before
    unscaling: an fp16 overflow on one rank reaches every rank's sum, so all skip the same step."""
    world = launched()[1]
    if world > 1:
        with exchange():
            for p in params:
                torch.distributed.all_reduce(p.grad)  # a sum: gloo has no average
                p.grad /= world


def progress(iterable, desc):
    """A progress bar that only process 0 shows (tqdm)."""
    return tqdm(iterable, desc=desc, leave=False, disable=launched()[0] > 0)


def shared_run_dir(config):
    """Rank 0 prepares the run folder (prepare_run_dir: create, lock, refuse another run's) and tells the other
    ranks its name, or its error, so that every rank stops with the same one line. -> rank 0's RunFolder, else None."""
    (rank, world), folder, message = launched(), None, None
    if rank == 0:
        try:
            folder = prepare_run_dir(config)
        except UsageError as error:
            message = str(error)
    if world > 1:
        box = [config.output_dir, message]
        with exchange():
            torch.distributed.broadcast_object_list(box, src=0)
        config.output_dir, message = box
    if message:
        raise UsageError(message)
    return folder


# -------------------------------------------------------------------------------------- held-out evaluation and main()
HELD_OUT_PROMPTS, HELD_OUT_IMAGES = 4, 8  # --eval-every's check: small, so that it costs a fraction of an epoch


class HeldOutCheck:
    """--eval-every: the held-out bias and quality during training. The first HELD_OUT_PROMPTS of --eval-prompts
    (HELD_OUT by default), HELD_OUT_IMAGES images each, prompt i's noise from a generator of its own seeded with
    --seed + i at every call, so its images pair across calls and it draws nothing from the training's generators:
    the training's metrics and weights are those of a run without it (tested). CLIP-I compares each image with the
    same seed's image before training, kept in the run folder for --resume."""

    def __init__(self, config, run, text_encoder, tokenizer, reference_path, resumed=False):
        self.prompts = read_prompts(config.eval_prompts)[:HELD_OUT_PROMPTS]
        self.embeds = [encode_for(text_encoder, tokenizer, [p], config.device) for p in self.prompts]
        with torch.random.fork_rng(devices=[]):  # loading may draw weights it leaves out; not from training's RNG
            self.quality = load_quality_model(config, config.device)
        self.texts = self.quality and self.quality.texts(self.prompts)  # (prompts, D); None: no text tower or model
        settings = {"prompts": self.prompts, "quality_model": config.clip_model, "seed": config.seed,
                    "num_steps": config.num_steps, "guidance_scale": config.guidance_scale, "eta": config.eta}
        if os.path.exists(reference_path):  # resumed: the images before training, as the run first drew them
            stored = torch.load(reference_path)
            check_reference(stored, settings, reference_path)
            self.reference = stored["embeddings"]
        else:  # (prompts, n, D), of the model before training even when --eval-every is first given at --resume
            with base_weights(run.unet, config) if resumed else contextlib.nullcontext():
                self.reference = self.embed_images(run, config)[0]
            if run.lead:
                torch.save({**settings, "embeddings": self.reference}, reference_path)

    def embed_images(self, run, config):
        """-> unit embeddings (prompts, n, D) and each prompt's labels of this model's held-out images."""
        settings = dataclasses.replace(config, batch_size=HELD_OUT_IMAGES)
        ids = torch.zeros(HELD_OUT_IMAGES, dtype=torch.long, device=config.device)
        embeddings, labels = [], []
        for i, embeds in enumerate(self.embeds):
            noise = torch.Generator(config.device).manual_seed(config.seed + i)
            images = sample(run.unet, run.vae, run.scheduler, embeds, ids, settings, config.device, noise)["images"]
            labels.append(rewards.label_images(run.labeller(images), classes_of(config), config.threshold))
            embeddings.append(self.quality.images(images).cpu() if self.quality else None)
        return (torch.stack(embeddings) if self.quality else [None] * len(labels)), labels

    def __call__(self, run, config, epoch):
        """-> the metrics record's "held_out": overall bias, none-rate, CLIP-T, CLIP-I and the seconds it took."""
        start = time.perf_counter()
        embeddings, labels = self.embed_images(run, config)
        rows = [{"prompt": p, **rewards.bias_report(l, target_of(config)), **rewards.quality_report(
            e, None if self.texts is None else self.texts[i].cpu(), None if e is None else self.reference[i])}
            for i, (p, l, e) in enumerate(zip(self.prompts, labels, embeddings))]
        seconds = time.perf_counter() - start
        if run.lead:
            tqdm.write(f"held-out check after epoch {epoch}: {seconds:.1f} s")
        return {**rewards.overall(rows), "seconds": seconds}


HELD_OUT_FLAGS = {"prompts": "--eval-prompts", "quality_model": "--clip-model", "seed": "--seed",
                  "num_steps": "--num-steps", "guidance_scale": "--guidance-scale", "eta": "--eta"}


def check_reference(stored, settings, path):
    """A resumed run's held-out reference must be of the same prompts, noise and quality model as its checks, or
    CLIP-I would pair unrelated images. A reference from before these were stored holds its prompts only."""
    for key, flag in HELD_OUT_FLAGS.items():
        if key in stored and stored[key] != settings[key]:
            shown = f"{len(stored[key])} other prompts" if key == "prompts" else repr(stored[key])
            raise UsageError(f"{flag}: the run's held-out check was started with {shown} ({path}); resume it with "
                             f"the same {flag}")


@contextlib.contextmanager
def base_weights(unet, config):
    """Inside the with block, the UNet's trained weights are those of the base model (--unet, else --model's UNet);
    after it, the run's again, bit for bit. Loading draws random weights before reading the file: not from the
    run's RNG."""
    params = trainable_parameters(unet)
    with torch.random.fork_rng(devices=[]):
        base = load_unet(config).state_dict()
    kept = {name: p.detach().clone() for name, p in params.items()}
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(base[name])
    try:
        yield
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(kept[name])


def embeddings_path(report_or_folder):
    """The image embeddings of an evaluation (P, n, D): eval_embeddings.pt beside its eval.json."""
    folder = report_or_folder if os.path.isdir(report_or_folder) else os.path.dirname(report_or_folder)
    return os.path.join(folder, "eval_embeddings.pt")


def evaluate(config, classifier=None):
    """The bias report of a model on held-out prompts -> eval.json, eval_NN.png per prompt, a printed table."""
    config = resolve_device(config)
    judge = load_judge(config)  # first, as in train()
    unet, vae, text_encoder, tokenizer, scheduler = load_models(config, config.device)
    classifier = classifier or (judge if config.labeller == "judge" else load_classifier(config, config.device))
    quality = load_quality_model(config, config.device)
    base = torch.load(embeddings_path(config.compare))["embeddings"] if config.compare and quality else None  # (P, n, D)
    prompts = read_prompts(config.eval_prompts, warn=True)
    texts = quality and quality.texts(prompts)  # (P, D); None without a text tower or a quality model
    per_prompt, rows, embeddings = dataclasses.replace(config, batch_size=config.eval_images), [], []
    ids = torch.zeros(config.eval_images, dtype=torch.long, device=config.device)  # one prompt at a time
    for i, prompt in enumerate(tqdm(prompts, desc="prompts")):
        embeds = encode_for(text_encoder, tokenizer, [prompt], config.device)
        noise = torch.Generator(config.device).manual_seed(config.seed + i)  # prompt i: the same noise for any model
        images = sample(unet, vae, scheduler, embeds, ids, per_prompt, config.device, noise)["images"]
        probs = classifier(images)  # (n, K)
        labels = rewards.label_images(probs, classes_of(config), config.threshold)
        embeddings.append(quality and quality.images(images))  # (n, D): image j of prompt i pairs with the base's j
        rows.append({"prompt": prompt, **rewards.bias_report(labels, target_of(config)), **rewards.quality_report(
            embeddings[-1], None if texts is None else texts[i], None if base is None else base[i])})
        rewards.save_grid(images, probs, labels, prompt, os.path.join(config.output_dir, f"eval_{i:02d}.png"),
                          threshold=config.threshold)
    report = {"model": config.model, "unet": config.unet or None, "classifier": config.classifier,
              "classes": classes_of(config), "target": target_of(config), "threshold": config.threshold,
              "quality_model": config.clip_model, "images_per_prompt": config.eval_images, "seed": config.seed,
              "num_steps": config.num_steps, "guidance_scale": config.guidance_scale, "prompts": rows,
              "overall": rewards.overall(rows)}
    if quality:
        torch.save({"quality_model": config.clip_model, "prompts": prompts,  # what a later --compare needs for CLIP-I
                    "embeddings": torch.stack(embeddings).cpu()}, embeddings_path(config.output_dir))
    write_json(os.path.join(config.output_dir, "eval.json"), report)
    print(rewards.report_table(report))
    if config.compare:
        try:
            print(rewards.compare_reports(config.compare, report, os.path.join(config.output_dir, "compare.png")))
        except ValueError as error:
            raise UsageError(f"--compare: {error}") from None
    return report


def quit_now(signum, frame):
    """SIGTERM outside the epoch loop (loading, evaluation): stop as Ctrl-C does, cleaning up, exit 128 + 15."""
    raise KeyboardInterrupt(signum)


def main(argv=None):
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, Ctrl-C is a KeyboardInterrupt
    sigterm = signal.signal(signal.SIGTERM, quit_now)  # and SIGTERM too, outside the loop's graceful_stop
    config, folder = None, None
    try:
        given = parse_args(argv)
        config = resolve_config(given)
        validate(config, given)
        config = join_ranks(config)  # torchrun: the process group; a plain run: nothing
        check_hub(config)  # an unreachable hub: the cache, or one line, before any folder or loading
        folder = shared_run_dir(config)  # held until main returns
        evaluate(config) if config.evaluate else train(config)
    except UsageError as error:
        print(f"ddpo_debias.py: error: {error}", file=sys.stderr)
        return 2
    except rewards.JudgeError as error:  # unreachable at the start, or failing after its retries (last checkpoint kept)
        print(f"ddpo_debias.py: error: --judge-url: {error}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:
        print("ddpo_debias.py: error: out of GPU memory; lower it with --low-memory, a smaller --train-batch-size "
              "or --batch-size, or --mixed-precision bf16", file=sys.stderr)
        return 2
    except RunError as error:
        print(f"ddpo_debias.py: error: {error}", file=sys.stderr)
        return 1
    except Interrupted as stop:
        print(f"ddpo_debias.py: stopped by {signal.Signals(stop.args[0]).name} after saving a checkpoint; continue "
              f"with --resume {config.output_dir}", file=sys.stderr)
        return 128 + stop.args[0]
    except KeyboardInterrupt as stop:
        saved = config is not None and config.output_dir and run_state(config.output_dir) == "checkpoint"
        print("ddpo_debias.py: interrupted; " + (f"continue from its last checkpoint with --resume {config.output_dir}"
              if saved else "no checkpoint was saved, so there is nothing to resume"), file=sys.stderr)
        return 128 + (stop.args[0] if stop.args and isinstance(stop.args[0], int) else signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, sigterm)
        if folder:
            folder.release()
        if launched()[1] > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
