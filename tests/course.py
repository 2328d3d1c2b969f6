"""The course kit (docs/course.md): student copies with functions to write, and their graders.

    python -m tests.course make OUT [--assignments 1,3]   a copy of the project with those functions stubbed
    python -m tests.course grade N [--no-train]           in a copy: check assignment N's functions, then train
    python -m tests.course path                           the student's reading path, counted

`make` copies the project and replaces the body of each function of the chosen assignments (ASSIGNMENTS) by
`raise NotImplementedError("Assignment N: ...")`, keeping its signature and docstring: everything else imports and
runs, and the project itself is the solution key. `grade` checks the functions of the copy it runs in against
references that are not the project's code (a student copy lacks it): diffusers' DDIMScheduler.step and
torch.distributions.Normal for the DDIM step, float64 hand computations for the losses, the rewards and the
advantages, the UNet called by hand for guidance and sampling. Then, unless --no-train, the end-to-end check: the
toy world fine-tuned with the student's code, at the demo's settings, balances within the demo's 16 epochs (and,
for assignment 4, the three-class world too). Each failed check prints one line saying what was expected.
"""
import argparse
import ast
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `tests.` from any folder
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# number -> (title, [(file, function)]): what the student writes. Assignment 5 is open (docs/course.md): no stub.
ASSIGNMENTS = {
    1: ("the DDIM step and its log-probability", [("ddpo_debias.py", "ddim_step_with_logprob")]),
    2: ("classifier-free guidance and the sampler", [("ddpo_debias.py", "guided_noise_pred"),
                                                      ("ddpo_debias.py", "sample")]),
    3: ("clipped PPO, and Truly PPO with the exact Gaussian KL", [("ddpo_debias.py", "gaussian_kl"),
                                                                   ("ddpo_debias.py", "ppo_clip_loss"),
                                                                   ("ddpo_debias.py", "truly_ppo_loss")]),
    4: ("R_shift, R_balance for K classes, and the advantages", [("rewards.py", "r_shift"),
                                                                  ("rewards.py", "r_balance"),
                                                                  ("ddpo_debias.py", "compute_advantages")]),
}
SKIPPED = {".git", "__pycache__", ".pytest_cache", ".whl", ".venv"}  # not copied into a student copy

# The student's reading path for the five assignments, in order: the README front page, then each file's docstring
# and these top-level definitions (with the comment lines just above them). Everything else may be skipped; what the
# path calls outside itself is in PATH_SKIPS with what it does, so a student can take it on trust.
READING_PATH = {
    "ddpo_debias.py": ("MethodConfig", "trained_steps", "ddim_step_with_logprob", "gaussian_kl", "ppo_clip_loss",
                       "truly_ppo_loss", "guided_noise_pred", "sample", "compute_advantages", "policy_step", "update",
                       "train"),
    "rewards.py": ("THRESHOLD", "GENDER", "label_images", "class_shares", "r_shift", "r_balance", "REWARDS", "RESCORED",
                   "PromptHistory"),
}
PATH_SKIPS = {  # a name the path uses but does not define -> what it does
    "autocast": "runs the UNet in --mixed-precision (bf16/fp16 on a GPU, nothing on the CPU)",
    "progress": "a tqdm progress bar",
    "this_process": "this process's rows of a batch under torchrun; with one process, the tensor itself",
    "gather": "every process's rows under torchrun; with one process, the tensor itself",
    "average_gradients": "the mean gradient over torchrun's processes; with one process, nothing",
    "decode": "the VAE: latents x_0 -> images in [0, 1]",
    "step_of": "the model's Gaussian step: ddim_step_with_logprob for SD 1.x, 2.x, SDXL (Flow-GRPO's for SD 3.x)",
    "trainable_parameters": "the UNet's parameters that require a gradient: its attention projections",
    "Laps": "a stopwatch for the epoch's phases (metrics' timings)",
    "judge_ranks": "--reward rank's Borda scores from the judge; None otherwise",
    "purified": "--purify T: the images as the base model redraws them from step T, for the reward to read",
    "start_run": "loading, resume and the run folder: the models, the optimizer and the PromptHistory in `run`",
    "epoch_record": "the epoch's line of metrics.jsonl",
    "end_epoch": "the sample grid, plot.png, a checkpoint every --save-every epochs, and stopping on a signal",
    "graceful_stop": "Ctrl-C and SIGTERM finish the epoch and save before the run stops",
    "finish_run": "the final checkpoint and the fine-tuned unet/",
    "uniform": "the default target: 1/K for each class",
    "r_soft_balance": "a reward not in the paper: R_balance on P(class) instead of labels (--reward soft_balance)",
    "r_rank": "--reward rank: the judge's Borda scores as the reward",
    "bias_report": "the metrics of a set of labels: counts, shares, the bias",
    "window_report": "the metrics of a prompt's window of labels",
}


# ---------------------------------------------------------------------------------------------------------- make
def stub(source, names, number):
    """`source` with the body of each top-level function in `names` replaced by a NotImplementedError, after its
    docstring. Lines are replaced bottom-up so that earlier line numbers stay valid."""
    lines = source.splitlines(keepends=True)
    found = {node.name: node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)}
    missing = set(names) - set(found)
    if missing:
        raise SystemExit(f"course: no function {', '.join(sorted(missing))} to stub")
    for node in sorted((found[n] for n in names), key=lambda n: n.lineno, reverse=True):
        body = node.body
        has_doc = isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant)
        first = body[1] if has_doc and len(body) > 1 else body[0]
        indent = " " * first.col_offset
        start = (body[0].end_lineno if has_doc else first.lineno - 1)  # 0-based index of the first body line
        message = f"Assignment {number}: write {node.name} (docs/course.md)"
        lines[start:node.end_lineno] = [f"{indent}raise NotImplementedError({message!r})\n"]
    return "".join(lines)


def make(out, numbers):
    """A student copy of the project in `out` with the functions of assignments `numbers` stubbed."""
    if os.path.exists(out) and os.listdir(out):
        raise SystemExit(f"course: error: OUT: {out} is not empty; give a new folder")
    shutil.copytree(ROOT, out, ignore=lambda folder, names: [n for n in names if n in SKIPPED], dirs_exist_ok=True)
    by_file = {}
    for number in numbers:
        for file, name in ASSIGNMENTS[number][1]:
            by_file.setdefault(file, []).append((name, number))
    for file, items in by_file.items():
        path = os.path.join(out, file)
        with open(path) as f:
            source = f.read()
        for name, number in items:
            source = stub(source, [name], number)
        with open(path, "w") as f:
            f.write(source)
    return by_file


# --------------------------------------------------------------------------------------------------------- grade
class Check:
    """Collects a grader's verdicts: each failure one line a student can act on."""

    def __init__(self):
        self.failures, self.passed = [], 0

    def __call__(self, ok, message):
        if ok:
            self.passed += 1
        else:
            self.failures.append(message)
        return ok


def close(a, b, tol):
    import torch
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=tol, atol=tol)


def sd_scheduler(steps=50, spacing="leading", **changes):
    """Stable Diffusion v1.5's scheduler as DDIM; changes: e.g. prediction_type="v_prediction" (SD 2.x),
    set_alpha_to_one=True (ᾱ of the step past the last is 1, not ᾱ_0)."""
    from diffusers import DDIMScheduler
    from tests.fixtures import SD_SCHEDULER  # Stable Diffusion v1.5's, as DDIM
    scheduler = DDIMScheduler(**{**SD_SCHEDULER, **changes}, timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    return scheduler


def reference_step(scheduler, eps, t, x, eta, z):
    """diffusers' DDIM step and the Gaussian around it, in float64: -> (x_{t-1}, mean, std, log-density per
    element averaged over C·H·W)."""
    import torch
    prev = scheduler.step(eps, t, x, eta=eta, variance_noise=z).prev_sample.double()
    mean = scheduler.step(eps, t, x, eta=eta, variance_noise=torch.zeros_like(z)).prev_sample.double()
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    std = eta * scheduler._get_variance(t, prev_t).double().sqrt()
    log_prob = torch.distributions.Normal(mean, std).log_prob(prev).mean(dim=(1, 2, 3))
    return prev, mean, std, log_prob


def grade_1(check):
    """ddim_step_with_logprob against diffusers' DDIMScheduler.step and torch.distributions.Normal."""
    import torch
    import ddpo_debias as dd
    generator = torch.Generator().manual_seed(1)
    kinds = [("leading", {}, (0, 17, 48)), ("trailing", {}, (0, 17, 48)),
             ("leading", {"prediction_type": "v_prediction"}, (0, 17, 48))]  # SD 2.x: the model predicts v
    for spacing, changes, indices in kinds:
        scheduler = sd_scheduler(50, spacing, **changes)
        for eta in (1.0, 0.5):
            for index in indices:
                t = int(scheduler.timesteps[index])
                x, eps, z = (torch.randn(3, 4, 8, 8, generator=generator) for _ in range(3))
                prev, mean, std, log_prob = reference_step(scheduler, eps, t, x, eta, z)
                where = f"t = {t} ({spacing} spacing{''.join(f', {k}={v}' for k, v in changes.items())}), η = {eta}"
                got = dd.ddim_step_with_logprob(scheduler, eps, t, x, eta, noise=z)
                if not check(isinstance(got, tuple) and len(got) == 4, "ddim_step_with_logprob must return "
                             "(prev_latents, log_prob, prev_mean, std_dev), as its docstring says"):
                    return
                g_prev, g_log, g_mean, g_std = got
                if not check(close(g_mean, mean, 1e-5), f"prev_mean at {where}: not diffusers' DDIM mean "
                             f"(DDIM eq. 12 with z = 0); off by up to {(g_mean.double() - mean).abs().max():.3g}"):
                    wrong_eta = reference_step(scheduler, eps, t, x, 1.0, z)[1]
                    if eta != 1.0 and close(g_mean, wrong_eta, 1e-5):
                        check(False, f"at η = {eta} the mean equals η = 1's: σ_t must be η·√(...) (eq. 16), "
                                     "and the direction term uses √(1 - ᾱ_{t-1} - σ_t²)")
                    return
                g_std = torch.as_tensor(g_std).double()
                if not check(torch.allclose(g_std.expand(3, 1, 1, 1), std.expand(3, 1, 1, 1), rtol=1e-5),
                             f"std_dev at {where}: expected σ_t = {std.item():.6g}, got "
                             f"{g_std.flatten()[0].item():.6g}" + (" (σ_t without η?)" if eta != 1.0 and math.isclose(
                                 g_std.flatten()[0].item(), std.item() / eta, rel_tol=1e-4) else "")):
                    return
                check(close(g_prev, prev, 1e-5), f"prev_latents at {where}: expected μ + σ_t·z with the given noise z")
                if not check(close(g_log, log_prob, 1e-4), f"log_prob at {where}: expected the Normal log-density "
                             f"per element averaged over C·H·W (shape (B,)), e.g. {log_prob[0].item():.6g}, got "
                             f"{g_log.flatten()[0].item():.6g}" + summed_hint(g_log, log_prob, 4 * 8 * 8)):
                    return
                again = dd.ddim_step_with_logprob(scheduler, eps, t, x, eta, prev_latents=prev.float())[1]
                if not check(close(again, log_prob, 1e-4), f"log_prob at {where} with prev_latents given: it must "
                             "score the x_{t-1} passed in (training re-scores stored samples), not draw a new one"):
                    return
    # the last step where ᾱ past it is 1 (set_alpha_to_one=True): x_0 = x̂₀, σ_t = 0 (no log-probability, so only
    # the mean is compared). SD's config sets final_alpha_cumprod to ᾱ_0, where alphas_cumprod[0] would agree.
    scheduler = sd_scheduler(50, set_alpha_to_one=True)
    t, zeros = int(scheduler.timesteps[-1]), torch.zeros(3, 4, 8, 8)
    x, eps = (torch.randn(3, 4, 8, 8, generator=generator) for _ in range(2))
    mean = scheduler.step(eps, t, x, eta=1.0, variance_noise=zeros).prev_sample
    if not check(close(dd.ddim_step_with_logprob(scheduler, eps, t, x, 1.0, noise=zeros)[2], mean, 1e-5),
                 f"prev_mean at the last step (t = {t}) of a scheduler with set_alpha_to_one=True: ᾱ_{{t-1}} past the "
                 "last step is scheduler.final_alpha_cumprod (1 here), not alphas_cumprod[0] (on SD's config the two "
                 "agree, so the mistake would not show there)"):
        return
    # the gradient: training moves θ through ε̂ -> μ_θ -> log π; a detached mean trains nothing
    scheduler = sd_scheduler(50)
    t = int(scheduler.timesteps[17])
    x, eps, z = (torch.randn(2, 4, 8, 8, generator=generator) for _ in range(3))
    prev = reference_step(scheduler, eps, t, x, 1.0, z)[0].float()
    eps = eps.clone().requires_grad_(True)
    log_prob = dd.ddim_step_with_logprob(scheduler, eps, t, x, 1.0, prev_latents=prev)[1]
    if not check(log_prob.requires_grad, "log_prob carries no gradient to the noise prediction: the mean μ_θ(x_t) "
                 "must stay in the graph (no .detach(), no torch.no_grad()), or the update trains nothing"):
        return
    log_prob.sum().backward()
    check(eps.grad is not None and bool(eps.grad.abs().sum() > 0), "log_prob's gradient with respect to the noise "
          "prediction is zero: the mean μ_θ(x_t) must depend on it")
    try:
        dd.ddim_step_with_logprob(sd_scheduler(), torch.zeros(1, 4, 8, 8), 981, torch.zeros(1, 4, 8, 8), eta=0.0)
        check(False, "eta = 0 must raise ValueError: with σ_t = 0 the step has no log-probability")
    except ValueError:
        check(True, "")


def summed_hint(got, expected, n):
    ratio = (got.double().flatten()[0] / expected.flatten()[0]).item() if got.numel() else 0
    return f" (yours is {n}× it: a sum over the elements, not the mean)" if math.isclose(ratio, n, rel_tol=1e-3) else ""


def toy_parts():
    """The toy world's UNet and VAE, and random prompt embeddings (1+P, L, D) for P = 2 prompts."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from tests import toyworld
    unet = UNet2DConditionModel.from_pretrained(toyworld.SHIPPED, subfolder="unet", low_cpu_mem_usage=False).eval()
    vae = AutoencoderKL.from_pretrained(toyworld.SHIPPED, subfolder="vae", low_cpu_mem_usage=False).eval()
    embeds = torch.randn(3, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    return unet, vae, embeds


def by_hand_guidance(unet, x, t, embeds, ids, g):
    """Two UNet calls, unconditional (row 0 of embeds) and conditional (row 1 + prompt id), then ε_u + g·(ε_c - ε_u)."""
    import torch
    t = t if torch.as_tensor(t).dim() else torch.as_tensor(t).repeat(len(x))
    uncond = unet(x, t, encoder_hidden_states=embeds[:1].expand(len(x), -1, -1)).sample
    cond = unet(x, t, encoder_hidden_states=embeds[1 + ids]).sample
    return uncond + g * (cond - uncond)


def grade_2(check):
    """guided_noise_pred against two UNet calls by hand; sample() against a loop of diffusers' DDIM steps."""
    import torch
    import ddpo_debias as dd
    unet, vae, embeds = toy_parts()
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 8, 8, generator=generator)
    ids = torch.tensor([1, 0, 1])
    with torch.no_grad():
        for t, what in ((torch.tensor(801), "one timestep (sampling)"), (torch.tensor([801, 401, 1]), "a timestep per "
                                                                        "image (training)")):
            expected = by_hand_guidance(unet, x, t, embeds, ids, 5.0)
            got = dd.guided_noise_pred(unet, x, t, embeds, ids, 5.0)
            if not check(close(got, expected, 1e-4), f"guided_noise_pred with {what}: expected ε_u + w·(ε_c - ε_u), "
                         "ε_u from the empty prompt (row 0 of prompt_embeds) and ε_c from row 1 + prompt_ids"):
                return
    ids = torch.tensor([0, 1, 1, 0])
    for eta, guidance in ((1.0, 5.0), (0.6, 2.5)):  # config's η and w, never constants
        config = dd.Config(batch_size=4, num_steps=4, guidance_scale=guidance, eta=eta, mixed_precision="no",
                           device="cpu", train_batch_size=4)
        got = dd.sample(unet, vae, sd_scheduler(4), embeds, ids, config, "cpu", torch.Generator().manual_seed(4))
        keys = ("latents", "log_probs", "means", "timesteps", "prompt_ids", "images")
        if not check(isinstance(got, dict) and set(keys) <= set(got),
                     f"sample must return a dict with {', '.join(keys)}"):
            return
        generator, scheduler = torch.Generator().manual_seed(4), sd_scheduler(4)
        with torch.no_grad():
            latents = torch.randn(4, 4, 8, 8, generator=generator)  # x_T first, then each step's z, one generator
            chain, log_probs, means = [latents], [], []
            for t in scheduler.timesteps:
                eps = by_hand_guidance(unet, latents, t, embeds, ids, guidance)
                z = torch.randn(4, 4, 8, 8, generator=generator)
                latents, mean, _, log_prob = reference_step(scheduler, eps, int(t), latents, eta, z)
                latents = latents.float()
                chain.append(latents), means.append(mean), log_probs.append(log_prob)
        expected = {"latents": torch.stack(chain, 1), "log_probs": torch.stack(log_probs, 1),
                    "means": torch.stack(means, 1)}
        for key, shape in (("latents", "(B, T+1, C, H, W), x_T first"), ("log_probs", "(B, T)"),
                           ("means", "(B, T, C, H, W)")):
            if not check(close(got[key], expected[key], 1e-4), f"sample's {key} at η = {eta}, guidance {guidance}: "
                         f"expected {shape}, from x_T and then each step's z drawn from `generator` in that order, "
                         "each step ddim_step_with_logprob of the guided ε̂, with config's eta and guidance_scale"):
                return
    check(torch.equal(got["timesteps"], scheduler.timesteps) and torch.equal(got["prompt_ids"], ids),
          "sample's timesteps must be the scheduler's T timesteps, and prompt_ids those given")
    with torch.no_grad():
        images = (vae.decode(chain[-1] / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    check(close(got["images"], images, 1e-4), "sample's images: x_0 decoded by the VAE (decode), in [0, 1]")


def grade_3(check):
    """gaussian_kl, ppo_clip_loss and truly_ppo_loss against float64 computations by hand, value and gradient."""
    import torch
    import ddpo_debias as dd
    generator = torch.Generator().manual_seed(5)
    old_mean, new_mean = torch.randn(2, 4, 2, 2, generator=generator), torch.randn(2, 4, 2, 2, generator=generator)
    std = torch.tensor([0.5, 0.2]).view(2, 1, 1, 1)
    by_hand = [sum((n - o) ** 2 / (2 * s ** 2) for n, o in zip(new_mean[i].flatten().tolist(),
                                                                  old_mean[i].flatten().tolist())) / 16
               for i, s in enumerate((0.5, 0.2))]
    got = dd.gaussian_kl(old_mean, new_mean, std)
    check(close(got, torch.tensor(by_hand), 1e-5), f"gaussian_kl: expected ‖μ_new - μ_old‖²/(2σ_t²) averaged over "
          f"C·H·W per sample, {by_hand[0]:.6g} and {by_hand[1]:.6g}")
    eps = 0.1  # the clip range; samples chosen on each side of it for both signs of A
    log_r = [0.05, 0.3, -0.2, 0.04, 0.25, -0.3]  # not symmetric: r inverted gives another loss
    adv = [1.0, 1.0, 1.0, -1.0, -1.0, -1.0]
    cases = ["A > 0, r inside", "A > 0, r > 1 + ε", "A > 0, r < 1 - ε", "A < 0, r inside", "A < 0, r > 1 + ε",
             "A < 0, r < 1 - ε"]
    terms, grads = [], []
    for lr, a in zip(log_r, adv):
        r = math.exp(lr)
        plain, clipped = -a * r, -a * min(max(r, 1 - eps), 1 + eps)
        terms.append(max(plain, clipped))
        grads.append(-a * r / len(adv) if plain >= clipped else 0.0)  # the clipped branch has no gradient
    lp, old = torch.tensor(log_r, requires_grad=True), torch.zeros(6)
    loss, stats = dd.ppo_clip_loss(lp, old, torch.tensor(adv), eps)
    loss.backward()
    if not check(math.isclose(loss.item(), sum(terms) / 6, rel_tol=1e-5),
                 f"ppo_clip_loss: expected mean of max(-A·r, -A·clip(r, 1-ε, 1+ε)) = {sum(terms) / 6:.6g}, got "
                 f"{loss.item():.6g}"):
        for case, lr_, a, term in zip(cases, log_r, adv, terms):
            one = dd.ppo_clip_loss(torch.tensor([lr_]), torch.zeros(1), torch.tensor([a]), eps)[0].item()
            check(math.isclose(one, term, rel_tol=1e-5), f"ppo_clip_loss for {case}: expected {term:.6g}, got "
                  f"{one:.6g} (the clip must bind only where it makes the objective worse: for A < 0, at r < 1 - ε)")
        return
    check(lp.grad is not None and torch.allclose(lp.grad.double(), torch.tensor(grads, dtype=torch.float64),
                                                 atol=1e-6),
          "ppo_clip_loss's gradient: -A·r/b where the unclipped term is taken, 0 where the clip binds")
    check(math.isclose(stats["clipfrac"].item(), 4 / 6, rel_tol=1e-6), "ppo_clip_loss's stats['clipfrac']: the "
          "share of samples with |r - 1| > ε")
    check(math.isclose(stats["approx_kl"].item(), 0.5 * sum(x * x for x in log_r) / 6, rel_tol=1e-5),
          "ppo_clip_loss's stats['approx_kl']: ½·mean((log r)²)")
    kl, delta, alpha = [0.5, 0.01, 0.5, 0.5, 0.5, 0.125], 0.125, 2.0  # the last at exactly δ: outside (KL ≥ δ)
    objective, rolled = [], []
    for lr, a, k in zip(log_r, adv, kl):
        surrogate = math.exp(lr) * a
        back = k >= delta and surrogate > a  # outside the trust region (KL ≥ δ) and still "improving"
        objective.append(surrogate - alpha * k if back else surrogate)
        rolled.append(back)
    lp = torch.tensor(log_r, requires_grad=True)
    kl_t = torch.tensor(kl, requires_grad=True)
    loss, stats = dd.truly_ppo_loss(lp, torch.zeros(6), torch.tensor(adv), kl_t, delta, alpha)
    loss.backward()
    check(math.isclose(loss.item(), -sum(objective) / 6, rel_tol=1e-5), "truly_ppo_loss: expected -mean of r·A, "
          f"minus α·KL where KL ≥ δ and r·A > A (the rollback) = {-sum(objective) / 6:.6g}, got {loss.item():.6g}")
    check(kl_t.grad is not None and torch.allclose(kl_t.grad.double(), torch.tensor(
        [alpha / 6 if b else 0.0 for b in rolled], dtype=torch.float64), atol=1e-6),
        "truly_ppo_loss: the rollback's α·KL must carry the KL's gradient, on the rolled-back samples only")
    check(math.isclose(stats["rollback_frac"].item(), sum(rolled) / 6, rel_tol=1e-6),
          "truly_ppo_loss's stats['rollback_frac']: the share of rolled-back samples")


def grade_4(check):
    """r_shift, r_balance (K classes) and compute_advantages against hand counts in float64."""
    import torch
    import ddpo_debias as dd
    import rewards
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.1, 0.9], [0.5, 0.5], [0.05, 0.95]])
    check(close(rewards.r_shift(probs, underrepresented="female"), probs[:, 0], 1e-7), "r_shift: P(image shows U), "
          "U's column of probs")
    three = {"a": 0.5, "b": 0.3, "c": 0.2}
    p3 = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8]])
    check(close(rewards.r_shift(p3, target=three, underrepresented="c"), p3[:, 2], 1e-7), "r_shift with classes a, b, "
          "c and U = c: the column of U in the target's class order")
    labels = ["female", "male", "male", None, "male"]  # q = F / (F + M) = 1/4 over the 4 labelled images
    expected = [0.25, -0.25, -0.25, -0.25, -0.25]  # eq. (3): the minority |q - ½|, the rest -|q - ½|
    got = rewards.r_balance(probs, labels)
    if not check(close(got, torch.tensor(expected), 1e-6), f"r_balance: with labels {labels}, q = F/(F+M) = 1/4 over "
                 f"the labelled images, expected {expected} (eq. 3), got {[round(v, 4) for v in got.tolist()]}" +
                 (" (the shares over all 5 images, not over the 4 labelled ones)" if len(got) == 5 and math.isclose(
                     got[0].item(), 0.5 - 1 / 5, rel_tol=1e-5) else "")):
        return
    labels3 = ["a", "a", "a", "b", None, "c"]  # p̂ = (3/5, 1/5, 1/5), t = (.5, .3, .2): gaps -.1, +.1, 0
    got = rewards.r_balance(torch.zeros(6, 3), labels3, target=three)
    expected = [-0.1, -0.1, -0.1, 0.1, -0.1, 0.0]
    check(close(got, torch.tensor(expected), 1e-6), f"r_balance for K = 3 (target {three}, labels {labels3}): each "
          f"image of class c gets t_c - p̂_c, an unlabelled one min_c (t_c - p̂_c): expected {expected}, got "
          f"{[round(v, 4) for v in got.tolist()]}")
    window = torch.tensor([[0.9, 0.1]] * 3 + [[0.1, 0.9]] + [[0.6, 0.4]])  # labels F, F, F, M, None: q = 3/4
    got = rewards.r_balance(probs[:2], ["female", "male"], window)
    check(close(got, torch.tensor([-0.25, 0.25]), 1e-6), "r_balance with a window: the shares are the window's "
          "(its P(class) labelled at the threshold, 0.7), not the batch's: expected [-0.25, 0.25]")
    check(close(rewards.r_balance(probs[:2], [None, None]), torch.zeros(2), 0), "r_balance with no labelled image: "
          "p̂ is undefined, every reward 0")
    window = torch.tensor([[0.75, 0.25]] * 2 + [[0.1, 0.9]] * 2)  # at threshold 0.8 only the last two are labelled
    got = rewards.r_balance(probs[:2], ["female", "male"], window, threshold=0.8)
    check(close(got, torch.tensor([0.5, -0.5]), 1e-6), "r_balance with a window and threshold=0.8: the window's "
          "images are labelled at the threshold given (here only its two 'male' ones), not at 0.7: expected "
          f"[0.5, -0.5], got {[round(v, 4) for v in got.tolist()]}")
    history = rewards.PromptHistory(["p", "q"], 4)
    history.windows["rewards"][0] = [0.0, 1.0, 2.0, 5.0]  # prompt 0's window is full: its stats are the window's
    values = torch.tensor([1.0, 3.0, 2.0, 4.0])
    ids = torch.tensor([0, 1, 0, 1])
    mean0, std0 = 2.0, math.sqrt(((0 - 2) ** 2 + (1 - 2) ** 2 + 0 + 3 ** 2) / 3)  # torch's std: n - 1
    mean_b, std_b = 2.5, math.sqrt((1.5 ** 2 + 0.5 ** 2 + 0.5 ** 2 + 1.5 ** 2) / 3)  # prompt 1: the batch's
    expected = [(1 - mean0) / std0, (3 - mean_b) / std_b, (2 - mean0) / std0, (4 - mean_b) / std_b]
    got = dd.compute_advantages(values, ids, history, adv_clip=5.0)
    check(close(got, torch.tensor(expected), 1e-5), f"compute_advantages: (R - mean)/std (std with n - 1), the mean "
          f"and std of the image's prompt's window when full, of the batch otherwise: expected "
          f"{[round(v, 4) for v in expected]}, got {[round(v, 4) for v in got.tolist()]}")
    got = dd.compute_advantages(values, ids, history, adv_clip=0.5)
    check(close(got, torch.tensor(expected).clamp(-0.5, 0.5), 1e-5), "compute_advantages: clipped to ±adv_clip")
    for n, value in ((3, 0.3), (7, 0.1), (9, 0.7)):  # float32 means of 7 x 0.1 and 9 x 0.7 are not exact
        got = dd.compute_advantages(torch.full((n,), value), torch.zeros(n, dtype=torch.long),
                                    rewards.PromptHistory(["p"], n), adv_clip=5.0)
        if not check(torch.equal(got, torch.zeros(n)), f"compute_advantages of {n} equal rewards {value}: exactly 0 "
                     f"(they carry no signal; their float32 std is rounding), got {got.tolist()[:3]}..."):
            break
    got = dd.compute_advantages(torch.tensor([0.1, 0.3]), torch.zeros(2, dtype=torch.long), rewards.PromptHistory(
        ["p"], 2), adv_clip=5.0, scale=0.1)
    check(close(got, torch.tensor([-1.0, 1.0]), 1e-5), "compute_advantages with scale > 0: (R - mean)/scale")


GRADERS = {1: grade_1, 2: grade_2, 3: grade_3, 4: grade_4}


def run_checks(number):
    """-> Check with assignment `number`'s verdicts; a stub's NotImplementedError is one failure."""
    check = Check()
    try:
        GRADERS[number](check)
    except NotImplementedError as error:
        check(False, f"not written yet: {error}")
    except Exception as error:  # a student's bug: say where, in one line
        check(False, f"{type(error).__name__} in your code: {error}")
    return check


def train_check(number, out, epochs=16):
    """The toy world fine-tuned with R_balance through this copy's CLI at the demo's settings, one thread, checked by
    verdict(); for assignment 4 the three-class world too. -> failure messages."""
    from tests import toyworld
    worlds = [("two-class", toyworld.cli_flags(), [])]
    if number == 4:
        worlds.append(("three-class", toyworld.cli_flags(toyworld.THREE_SETTINGS), toyworld.THREE_FLAGS))
    failures = []
    for name, flags, extra in worlds:
        folder = os.path.join(out, name)
        result = subprocess.run([sys.executable, os.path.join(ROOT, "ddpo_debias.py"), *flags, *extra,
                                 "--reward=balance", f"--epochs={epochs}", "--seed=0", f"--output-dir={folder}"],
                                cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
                                capture_output=True, text=True)
        if result.returncode:
            failures.append(f"the {name} toy world's run failed: {cause(result.stderr)}")
            continue
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            failures += verdict(name, [json.loads(line) for line in f])
    return failures


def cause(stderr):
    """A failed run's reason: the last line of its stderr that is not a progress bar (tqdm redraws its bars with
    carriage returns, so they can come after the traceback's last line)."""
    lines = [line.strip() for line in stderr.replace("\r", "\n").splitlines()]
    lines = [line for line in lines if line and not re.search(r"\d+%\||it/s\]|s/it\]|\| *\d+/\d+ \[", line)]
    return lines[-1] if lines else "no message"


def verdict(name, metrics):
    """What the suite's learning tests require of a run (tests/test_learning.py, at the same settings and seed): the
    two-class world balanced (2-epoch windows: within 0.1 of 0.5, then within 0.2), the three-class world a third
    each, and faces kept ("none" under 25% in every epoch). -> failure messages."""
    from tests import debias_bench
    failures = []
    if name == "two-class" and debias_bench.balanced_at(metrics) is None:
        failures.append(f"the two-class toy world did not balance in {len(metrics)} epochs: q per epoch "
                        f"{[round(m['female_ratio'] or 0, 2) for m in metrics]}")
    if name == "three-class":
        from tests.test_learning import thirds
        if not thirds(metrics):
            failures.append(f"the three-class toy world did not come to a third each in {len(metrics)} epochs: "
                            f"shares {[m['shares'] for m in metrics[-2:]]} in the last epochs")
    none = max(m["n_none"] / m["n_images"] for m in metrics)
    if none >= 0.25:
        failures.append(f"the {name} toy world's faces broke: {none:.0%} 'none' in one epoch")
    return failures


def grade(number, train=True, out=None):
    """Grade assignment `number` in this copy: -> (passed checks, failure messages)."""
    check = run_checks(number)
    if train and not check.failures:
        with tempfile.TemporaryDirectory() as tmp:
            failures = train_check(number, out or tmp)
        check.failures += failures
        check.passed += not failures
    return check.passed, check.failures


# ---------------------------------------------------------------------------------------------------- reading path
def definitions(path):
    """-> (the module docstring's last line, {top-level name: (first line, last line)}), the first line taking in a
    decorator and the comment lines just above."""
    with open(os.path.join(ROOT, path)) as f:
        source = f.read()
    lines, tree, spans = source.splitlines(), ast.parse(source), {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else node
        name = getattr(target, "name", None) or getattr(target, "id", None)
        if name:
            first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            while first > 1 and lines[first - 2].startswith("#"):
                first -= 1
            spans[name] = (first, node.end_lineno)
    return tree.body[0].end_lineno, spans


def reading_path():
    """-> [(file, part, lines)] in reading order, and their total: the README front page, then READING_PATH."""
    with open(os.path.join(ROOT, "README.md")) as f:
        rows = [("README.md", "the front page", len(f.read().splitlines()))]
    for path, names in READING_PATH.items():
        docstring, spans = definitions(path)
        rows.append((path, "the module docstring", docstring))
        rows += [(path, name, spans[name][1] - spans[name][0] + 1) for name in names]
    return rows, sum(n for _, _, n in rows)


def main(argv=None):
    import logging
    from tests.random_sd15 import NoTorchvisionNotice  # transformers' notice that PIL, not torchvision, resizes
    logging.getLogger("transformers.utils.import_utils").addFilter(NoTorchvisionNotice())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    maker = sub.add_parser("make", help="a student copy with the assignments' functions stubbed")
    maker.add_argument("out", help="a new folder")
    maker.add_argument("--assignments", default=",".join(map(str, ASSIGNMENTS)),
                       help=f"comma-separated, of {', '.join(map(str, ASSIGNMENTS))} (default: all)")
    grader = sub.add_parser("grade", help="check an assignment in this copy")
    grader.add_argument("number", type=int, choices=sorted(ASSIGNMENTS))
    grader.add_argument("--no-train", action="store_true", help="the function checks only (seconds), not the toy "
                                                                "world's run (about a minute)")
    sub.add_parser("path", help="the student's reading path, with its lines")
    args = parser.parse_args(argv)
    if args.command == "path":
        rows, total = reading_path()
        for path, part, n in rows:
            print(f"{n:5d}  {path}: {part}")
        print(f"{total:5d}  lines in all. Used on the way, and safe to skip:")
        for name, what in PATH_SKIPS.items():
            print(f"       {name}: {what}")
        return 0
    if args.command == "make":
        try:
            numbers = sorted({int(n) for n in args.assignments.split(",")})
        except ValueError:
            parser.error(f"--assignments: comma-separated numbers, got {args.assignments!r}")
        if set(numbers) - set(ASSIGNMENTS):
            parser.error(f"--assignments: no assignment {', '.join(map(str, sorted(set(numbers) - set(ASSIGNMENTS))))}"
                         f"; there are {', '.join(map(str, ASSIGNMENTS))}")
        if os.path.exists(args.out) and os.listdir(args.out):
            parser.error(f"out: {args.out} is not empty; give a new folder")
        stubbed = make(args.out, numbers)
        for file, items in stubbed.items():
            print(f"{file}: stubbed {', '.join(f'{name} (assignment {n})' for name, n in items)}")
        print(f"wrote {args.out}; grade with: cd {args.out} && python -m tests.course grade N")
        return 0
    title = ASSIGNMENTS[args.number][0]
    print(f"assignment {args.number}: {title}")
    passed, failures = grade(args.number, train=not args.no_train)
    for message in failures:
        print(f"  FAIL {message}")
    print(f"assignment {args.number}: {'passed' if not failures else 'not yet'} ({passed} check"
          f"{'s' if passed != 1 else ''} passed, {len(failures)} failed)")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
