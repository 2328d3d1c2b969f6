"""The CUDA path, checked on a CPU: devices, memory defaults, compile shapes, fp16 scaling, skipped updates.

The `meta` device stands in for CUDA: like a GPU tensor, a meta tensor refuses to be stacked with a CPU tensor,
and an op that mixes devices, or copies across them, shows up in the NoCrossDevice mode below. On a GPU each
such copy is a blocking host transfer, or (torch.stack, torch.cat) a crash.
"""
import json

import pytest
import torch
from diffusers import DDIMScheduler
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import ddpo_debias as dd
import rewards
from tests.fixtures import SD_SCHEDULER, two_classes


class NoCrossDevice(TorchDispatchMode):
    """Records every op whose tensor inputs and outputs do not all lie on one device."""

    def __init__(self):
        super().__init__()
        self.crossings = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        devices = {t.device.type for t in tensors}
        if len(devices) > 1:
            self.crossings.append(f"{func}: {sorted(devices)}")
        return out


def test_losses_step_kl_advantages_and_rewards_stay_on_the_inputs_device():
    """The crash: the losses returned a CPU zero that update() stacks with GPU tensors."""
    meta = torch.device("meta")
    scheduler = dd.schedule_on_device(DDIMScheduler(**SD_SCHEDULER), meta)
    scheduler.set_timesteps(50, device=meta)
    b = 3
    latents, noise_pred = torch.randn(b, 4, 8, 8, device=meta), torch.randn(b, 4, 8, 8, device=meta)
    log_prob_old, advantages = torch.randn(b, device=meta), torch.randn(b, device=meta)
    with NoCrossDevice() as mode:
        for t in (scheduler.timesteps[0], scheduler.timesteps[-1], scheduler.timesteps[[0, 10, 49]]):
            prev, log_prob, mean, std = dd.ddim_step_with_logprob(scheduler, noise_pred, t, latents, 1.0)
            outputs = [prev, log_prob, mean, std]
        kl = dd.gaussian_kl(mean, mean * 1.1, std)
        clip_loss, clip_stats = dd.ppo_clip_loss(log_prob, log_prob_old, advantages, 1e-4)
        truly_loss, truly_stats = dd.truly_ppo_loss(log_prob, log_prob_old, advantages, kl, 1e-4, 5.0)
        for loss, stats in ((clip_loss, clip_stats), (truly_loss, truly_stats)):
            # exactly what update() does with them
            outputs.append(torch.stack([loss.detach(), stats["approx_kl"].detach(), stats["clipfrac"],
                                        kl.detach().mean(), stats["rollback_frac"]]))
        history = rewards.PromptHistory(["a", "b"], 2)
        history.add("rewards", 1, [0.5, 0.25])  # prompt 1's own statistics, prompt 0 the batch's
        outputs.append(dd.compute_advantages(torch.randn(b, device=meta), torch.tensor([0, 1, 1], device=meta),
                                             history, 5.0))
        probs = torch.rand(b, 2, device=meta)  # P(female), P(male)
        for name in rewards.REWARDS:
            outputs.append(rewards.REWARDS[name](probs, ["female", "male", None], underrepresented="female",
                                                 ranks=torch.zeros(b, device=meta)))  # the judge's, for "rank"
        outputs.append(rewards.r_balance(probs, [None, None, None]))  # q undefined: zeros, still on the device
    assert mode.crossings == []
    assert all(t.device == meta for t in outputs + [kl])


def test_schedule_is_moved_to_the_device_once_and_the_step_copies_nothing(tiny_sd):
    """No host copy per DDIM step: ᾱ lives on the device from load_models on (here the CPU, so we check the
    step itself on meta, where any copy of a CPU table shows up as a crossing)."""
    scheduler = dd.load_models(dd.Config(model=tiny_sd, mixed_precision="no"), "cpu")[4]
    assert scheduler.alphas_cumprod.device.type == "cpu" and torch.is_tensor(scheduler.final_alpha_cumprod)
    meta_scheduler = dd.schedule_on_device(DDIMScheduler(**SD_SCHEDULER), "meta")
    meta_scheduler.set_timesteps(4, device="meta")
    x = torch.randn(2, 4, 8, 8, device="meta")
    with NoCrossDevice() as mode:
        for t in meta_scheduler.timesteps:
            dd.ddim_step_with_logprob(meta_scheduler, x, t, x, 1.0)
    assert mode.crossings == []


def test_low_memory_is_checkpointing_and_keeps_the_micro_batch(tiny_sd):
    config = dd.Config(model=tiny_sd, mixed_precision="no", low_memory=True, batch_size=16, train_batch_size=4)
    unet = dd.load_models(config, "cpu")[0]
    assert unet.is_gradient_checkpointing
    assert dd.micro_batch(config) == 4  # --low-memory no longer forces micro-batches of one image
    assert dd.micro_batch(config, world=4) == 4  # torchrun: 16 images / 4 ranks / 2 updates: 2 images x 2 steps
    assert not dd.load_models(dd.Config(model=tiny_sd, mixed_precision="no"), "cpu")[0].is_gradient_checkpointing


def test_defaults_fit_a_24gb_card_by_count():
    """The activation count of tests/count_memory.py for SD v1.5 at the default micro-batch, plus everything
    resident: at most 20 GiB (the old default of 8 images counts about 21.5 GiB)."""
    from tests.count_memory import count
    config = dd.Config()
    weights, rows, sampling, _, decoding = count([dd.micro_batch(config)], checkpointing_options=(False,))
    trajectories = config.batch_size * (2 * config.num_steps + 1) * 4 * 64 * 64 * 4
    resident = sum(weights.values()) + trajectories
    peak = resident + max(rows[0][2], sampling, *decoding.values())
    assert peak / 2**30 <= 20, f"{peak / 2**30:.1f} GiB"


def test_equal_rewards_skip_the_update(tiny_sd, tmp_path):
    """Every image confidently female: R_balance gives each the same -|q - 0.5|, so A = 0 everywhere. No forward,
    no backward, no optimizer step: AdamW's decay (and any stale momentum) must not move the weights."""
    config = dd.Config(model=tiny_sd, output_dir=str(tmp_path / "run"), epochs=2, batch_size=4, num_steps=3,
                       mixed_precision="no", lr=1e-2, reward="balance")
    dd.prepare_run_dir(config)
    all_female = lambda images: two_classes(torch.full((images.shape[0],), 0.9))
    metrics = dd.train(config, classifier=all_female)
    assert [m["equal_rewards"] for m in metrics] == [True, True]
    assert all(m["loss"] is None and m["skipped_steps"] == 0 for m in metrics)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["optimizer"]["state"] == {}  # AdamW never stepped
    from diffusers import UNet2DConditionModel
    before = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").state_dict()
    after = UNet2DConditionModel.from_pretrained(tmp_path / "run" / "unet").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_compile_uses_two_static_graphs(tiny_sd, tiny_classifier, tmp_path, monkeypatch):
    """--compile: one graph for sampling (2B rows), one for training (2b rows), no dynamic shapes, and none for
    --profile's one-image FLOP count. A backend that records the graphs stands in for inductor."""
    graphs = []

    def recording_backend(gm, example_inputs):
        values = [n.meta.get("example_value") for n in gm.graph.find_nodes(op="placeholder")]
        graphs.append(any(isinstance(v, torch.SymInt) or any(isinstance(d, torch.SymInt) for d in getattr(v, "shape", ()))
                          for v in values))  # True: a graph with symbolic (dynamic) sizes
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real_compile(fn, backend=recording_backend, **kwargs))
    torch._dynamo.reset()
    config = dd.Config(model=tiny_sd, classifier=tiny_classifier, output_dir=str(tmp_path / "run"), epochs=2,
                       batch_size=8, train_batch_size=2, num_steps=3, mixed_precision="no", compile=True,
                       profile=True, reward="shift", underrepresented="male")
    dd.prepare_run_dir(config)
    metrics = dd.train(config)
    torch._dynamo.reset()
    assert all(m["loss"] is not None for m in metrics)  # the training graph did run
    assert graphs == [False, False]


def test_scheduler_outside_the_equations_is_refused(tiny_sd, tmp_path, capsys):
    import shutil
    for change, shown in (({"prediction_type": "sample"}, "prediction_type"),
                          ({"clip_sample": True}, "clip_sample"), ({"thresholding": True}, "thresholding")):
        model = tmp_path / f"sd-{shown}"
        shutil.copytree(tiny_sd, model)
        path = model / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
        code = dd.main(["--model", str(model), "--output-dir", str(tmp_path / f"run-{shown}"), "--epochs", "1"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err and "--model" in err and shown in err, err


def test_a_flow_matching_model_other_than_sd3_is_refused_at_start(tmp_path, capsys):
    """FLUX (a FlowMatchEulerDiscreteScheduler, a transformer instead of a UNet, another pipeline): one line that says
    why, exit 2, no run folder; an SD 3 folder without its transformer: one line naming what is missing."""
    for pipeline, expected in (("FluxPipeline", "FluxPipeline"), ("StableDiffusion3Pipeline", "transformer")):
        model = tmp_path / pipeline
        (model / "scheduler").mkdir(parents=True), (model / "transformer").mkdir()
        (model / "scheduler" / "scheduler_config.json").write_text(json.dumps(
            {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}))
        (model / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
        code = dd.main(["--model", str(model), "--output-dir", str(tmp_path / f"run-{pipeline}"), "--epochs", "1"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err and "--model" in err and expected in err, err
        assert not (tmp_path / f"run-{pipeline}").exists()


def test_cuda_index_reaches_synchronize_and_memory_stats(monkeypatch):
    """--device cuda:1: the timings and the peak memory are those of GPU 1, not of the current device 0."""
    seen = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: seen.append(("sync", device)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: seen.append(("peak", device)) or 0)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: seen.append(("reset", device)))
    dd.sync("cuda:1")
    dd.peak_memory_gb("cuda:1")
    assert seen == [("sync", "cuda:1"), ("peak", "cuda:1"), ("reset", "cuda:1")]


def test_fp16_scale_recovers_within_a_default_run():
    """After an overflow halves the loss scale, it must grow back within the run: 100 epochs x 2 updates."""
    config = dd.Config(mixed_precision="fp16")
    scaler = dd.make_scaler(config, "cpu")
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.SGD([weight], lr=0.0)
    start = scaler.get_scale()
    for step in range(config.epochs * config.updates_per_epoch):
        scaler.scale((weight * (float("inf") if step == 0 else 1.0)).sum()).backward()
        scaler.step(optimizer), scaler.update(), optimizer.zero_grad()
        if step == 0:
            assert scaler.get_scale() == start / 2  # the overflow was seen and backed off
    assert scaler.get_scale() >= start


def test_trust_region_threshold_is_derived_from_the_clip_range(tiny_sd, tmp_path):
    """ε = 1.28e-2/√(C·H·W): DDPO's 1e-4 on SD's 4x64x64 latent, 8e-4 on the toy world's 4x8x8; δ = ε²·C·H·W/2
    (truly_ppo_loss): 8.2e-5 for SD. What the run uses is written to config.json; given values are kept."""
    def unet(side):
        return type("U", (), {"config": type("C", (), {"in_channels": 4, "sample_size": side})})
    sd15 = dd.derived_sizes(dd.Config(), unet(64))
    assert sd15["clip_range"] == pytest.approx(1e-4) and sd15["kl_threshold"] == pytest.approx(1e-8 * 16384 / 2)
    assert dd.derived_sizes(dd.Config(), unet(8))["clip_range"] == pytest.approx(8e-4)
    assert dd.derived_sizes(dd.Config(kl_threshold=0.01), unet(64))["kl_threshold"] == 0.01
    assert dd.derived_sizes(dd.Config(clip_range=0.3), unet(64))["clip_range"] == 0.3
    config = dd.Config(model=tiny_sd, output_dir=str(tmp_path / "run"), epochs=1, batch_size=2, num_steps=3,
                       mixed_precision="no", trust_region="truly", clip_range=1e-3)
    dd.prepare_run_dir(config)
    dd.train(config, classifier=lambda images: two_classes(torch.rand(images.shape[0])))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["kl_threshold"] == pytest.approx(1e-6 * 4 * 8 * 8 / 2) and saved["clip_range"] == 1e-3


def test_non_finite_weights_are_never_saved(tiny_sd):
    unet = dd.load_models(dd.Config(model=tiny_sd, mixed_precision="no"), "cpu")[0]
    assert all(torch.isfinite(w).all() for w in dd.trained_weights(unet).values())
    with torch.no_grad():
        next(iter(dd.trainable_parameters(unet).values()))[0].fill_(float("inf"))
    with pytest.raises(RuntimeError, match="non-finite"):
        dd.trained_weights(unet)
