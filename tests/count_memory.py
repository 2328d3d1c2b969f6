"""Count the GPU memory of ddpo_debias.py on SD v1.5 without a GPU: every tensor is a FakeTensor (shapes and
dtypes, no data), so the real model's memory is counted in seconds on a CPU.

    python -m tests.count_memory [--micro-batches 1 2 4 8] > docs/memory/sd15-count.txt

Method. The SD v1.5 UNet is built from its config under FakeTensorMode and prepared as load_models does
(attention projections fp32 and trainable, every other weight bf16). A TorchDispatchMode then adds up the bytes
of every storage created while one training micro-step runs (guided forward over 2b rows with per-sample
timesteps, the DDIM log-prob, the loss and its backward), removes them when the storage is freed, and keeps the
peak: activations saved for backward, the backward's temporaries and the fp32 gradients of the trained weights.
CUDA's autocast runs group_norm and layer_norm in fp32 (its fp32 list), the CPU's does not, so both are wrapped
to run in fp32 here as they would on the GPU. Attention uses SDPA, whose CPU kernel saves O(n) like the GPU's
flash/memory-efficient kernels. Not counted: the CUDA caching allocator's rounding and fragmentation, and cuDNN
or cuBLAS workspaces (a few hundred MB), so a GPU's max_memory_allocated will read somewhat higher.
"""
import argparse

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ddpo_debias import LiveBytes, fp32_norms  # the counter --train-batch-size auto uses

GIB = 2**30


def count(micro_batches, checkpointing_options=(False, True), family="sd15"):
    """-> (resident bytes by name, [(checkpointing, b, training peak)], sampling peak, latent side, {b: decode peak})."""
    with fp32_norms():
        return counted(micro_batches, checkpointing_options, family)


def counted(micro_batches, checkpointing_options, family):
    import ddpo_debias as dd
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
    from tests.fixtures import SD3_SCHEDULER, SD_SCHEDULER
    from tests import random_sd15
    rows = []
    sd3 = family.startswith("sd35")  # SD 3.5: its transformer in the UNet's place, a flow schedule
    with torch.device("meta"):  # for their sizes only
        unet, vae, text_encoder, classifier = (random_sd15.sd35_models(family.split("-")[1]) if sd3 else
                                               getattr(random_sd15, f"{family}_models")())
    c, s = unet.config.in_channels, unet.config.sample_size  # latent channels and side
    d = unet.config.joint_attention_dim if sd3 else unet.config.cross_attention_dim  # text embedding width
    xl = not sd3 and unet.config.addition_embed_type == "text_time"  # SDXL: added conditions (pooled text, size ids)
    scheduler = FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER) if sd3 else DDIMScheduler(**SD_SCHEDULER)
    scheduler.set_timesteps(50)  # real tensors: the flow schedule's set-up reads its values
    with FakeTensorMode(allow_non_fake_inputs=True):
        unet = dd.as_policy(type(unet).from_config(unet.config))  # the same model, with fake weights that can run
        dd.train_attention_only(unet, torch.bfloat16)  # as load_models prepares it
        numel = lambda model: sum(p.numel() for p in model.parameters())
        trained = sum(p.numel() for p in unet.parameters() if p.requires_grad)
        weights = {"UNet trained attention weights, fp32": 4 * trained,
                   "UNet frozen weights, bf16": 2 * (numel(unet) - trained),
                   "AdamW state (two fp32 moments)": 8 * trained,
                   "VAE, bf16": 2 * numel(vae),
                   f"text encoder{'s (three: CLIP-L, CLIP-G, T5-XXL)' if sd3 else 's (two)' if xl else ''}, bf16":
                       2 * numel(text_encoder),
                   "ViT-base classifier, fp32": 4 * numel(classifier)}
        embeds = torch.randn(2, 77 + (dd.T5_TOKENS if sd3 else 0), d, dtype=torch.bfloat16)
        if sd3:  # as encode_prompts_sd3 gives them
            embeds = {"encoder_hidden_states": embeds, "text_embeds": torch.randn(2, 2048, dtype=torch.bfloat16)}
        if xl:  # as encode_prompts_xl gives them: (1+P, ...) rows
            embeds = {"encoder_hidden_states": embeds, "text_embeds": torch.randn(2, 1280, dtype=torch.bfloat16),
                      "time_ids": torch.randn(2, 6, dtype=torch.bfloat16)}
        config = dd.Config(mixed_precision="bf16")
        for checkpointing in checkpointing_options:
            if checkpointing:
                unet.enable_gradient_checkpointing()
            for b in micro_batches:
                x_t, x_prev = torch.randn(b, c, s, s), torch.randn(b, c, s, s)
                t = scheduler.timesteps[:b]
                tracker = LiveBytes()
                with tracker:
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        noise_pred = dd.guided_noise_pred(unet, x_t, t, embeds, torch.zeros(b, dtype=torch.long), 5.0)
                    _, log_prob, mean, std = dd.step_of(scheduler)(scheduler, noise_pred, t, x_t, 1.0, x_prev)
                    loss, _ = dd.ppo_clip_loss(log_prob, log_prob.detach(), torch.ones(b), 1e-4)
                    loss.backward()
                    del noise_pred, log_prob, mean, std, loss
                unet.zero_grad(set_to_none=True)
                rows.append((checkpointing, b, tracker.peak))
        # sampling: one guided forward over 2B = 32 rows without gradients (B = 16, the default)
        tracker = LiveBytes()
        with tracker, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            dd.guided_noise_pred(unet, torch.randn(16, c, s, s), scheduler.timesteps[0], embeds,
                                 torch.zeros(16, dtype=torch.long), 5.0)
        sampling = tracker.peak
        # the VAE's decode of b images (decode's chunks are --train-batch-size's), no grad: large at SDXL's 1024 px
        vae = type(vae).from_config(vae.config)
        for p in vae.parameters():  # bf16, as load_models gives it (p.data: a fake tensor cannot be swapped by .to)
            p.data = p.data.to(torch.bfloat16)
        decoding = {}
        for b in micro_batches:
            tracker = LiveBytes()
            with tracker, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                vae.decode(torch.randn(b, c, s, s, dtype=torch.bfloat16))
            decoding[b] = tracker.peak
    return weights, rows, sampling, (c, s), decoding


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--family", choices=("sd15", "sd21", "sdxl", "sd35-medium", "sd35-large"), default="sd15",
                        help="SD v1.5 (512 px), SD 2.1 (768 px, v-prediction: the same memory as epsilon), SDXL "
                             "(1024 px), or SD 3.5 medium or large (1024 px, the transformer in the UNet's place)")
    args = parser.parse_args(argv)
    weights, rows, sampling, (c, s), decoding = count(args.micro_batches, family=args.family)
    B, T = 16, 50  # the defaults
    fixed = {**weights, f"trajectories of B={B}, T={T}: latents and means, fp32": B * (2 * T + 1) * c * s * s * 4}
    name = {"sd15": "SD v1.5 UNet", "sd21": "SD 2.1 (768 px) UNet", "sdxl": "SDXL base 1.0 (1024 px) UNet",
            "sd35-medium": "SD 3.5 medium (1024 px) transformer", "sd35-large": "SD 3.5 large (1024 px) transformer"
            }[args.family]
    print(f"torch {torch.__version__}; {name} under FakeTensorMode, bf16 autocast with CUDA's fp32 norms\n")
    print("Resident through the run:")
    for name, n in fixed.items():
        print(f"  {name:50s} {n / GIB:6.2f} GiB")
    total_fixed = sum(fixed.values())
    print(f"  {'total':50s} {total_fixed / GIB:6.2f} GiB\n")
    print(f"Sampling step, 32 rows (B = 16 with CFG), no grad: peak {sampling / GIB:.2f} GiB")
    print("VAE decode of b images (decode's chunks are --train-batch-size), no grad: "
          + ", ".join(f"b {b}: {peak / GIB:.2f} GiB" for b, peak in decoding.items()) + "\n")
    print("Training micro-step (forward + backward of b images with CFG, incl. fp32 gradients of trained weights):")
    print(f"  {'checkpointing':14s} {'b':>3s} {'peak GiB':>9s} {'per image':>10s} {'+ resident':>11s}")
    for checkpointing, b, peak in rows:
        print(f"  {'yes' if checkpointing else 'no':14s} {b:3d} {peak / GIB:9.2f} {peak / b / GIB:10.2f} "
              f"{(peak + total_fixed) / GIB:11.2f}")
    print("\nThe largest micro-batch b (--train-batch-size) whose epoch peak, max(training step, sampling step, VAE "
          "decode) + resident, fits a card (counted, before the allocator's overhead; at most 8, an update's images at the defaults):")
    for capacity in (24, 48, 80):  # a "24 GB" card holds 24 GiB
        fits = {ckpt: max([b for c, b, peak in rows if c == ckpt and max(peak, sampling, decoding[b]) + total_fixed
                           <= capacity * GIB], default=None) for ckpt in (False, True)}
        print(f"  {capacity} GB: {fits[False] or 'none'} without --low-memory, {fits[True] or 'none'} with it")


if __name__ == "__main__":
    main()
