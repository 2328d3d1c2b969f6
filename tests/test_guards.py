"""NaN/Inf guards: a non-finite reward or gradient skips the step; several in a row stop the run cleanly."""
import json

import pytest
import torch

import ddpo_debias as dd
from tests.fixtures import two_classes

SMALL = dict(batch_size=4, num_steps=3, mixed_precision="no", lr=1e-3)


def make_run(tiny_sd, tmp_path, **overrides):
    config = dd.Config(model=tiny_sd, output_dir=str(tmp_path / "run"), **{**SMALL, **overrides})
    dd.prepare_run_dir(config)
    return config


def test_non_finite_rewards_skip_updates_then_stop(tiny_sd, tmp_path):
    config = make_run(tiny_sd, tmp_path, epochs=10, updates_per_epoch=1, reward="shift", underrepresented="female")
    nan_classifier = lambda images: torch.full((images.shape[0], 2), float("nan"))
    with pytest.raises(dd.RunError, match="non-finite"):
        dd.train(config, classifier=nan_classifier)
    lines = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(lines) == dd.MAX_NONFINITE and all(m["skipped_steps"] == 1 for m in lines)
    assert lines[0]["reward_mean"] is None  # JSON null, not NaN
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)  # written before the stop
    assert all(torch.isfinite(w).all() for w in state["weights"].values())


def test_non_finite_gradient_skips_that_step_only(tiny_sd, tiny_classifier, tmp_path, monkeypatch):
    config = make_run(tiny_sd, tmp_path, epochs=2, updates_per_epoch=2, classifier=tiny_classifier,
                      reward="shift", underrepresented="female")  # P(female) differs per image: never equal rewards
    calls = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def poisoned_clip(params, max_norm):  # the first update's gradient becomes NaN
        params = list(params)
        if not calls:
            params[0].grad.fill_(float("nan"))
        calls.append(1)
        return real_clip(params, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", poisoned_clip)
    metrics = dd.train(config)
    assert [m["skipped_steps"] for m in metrics] == [1, 0] and len(calls) == 4
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "run" / "unet")
    assert all(torch.isfinite(p).all() for p in unet.parameters())
    before = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").state_dict()
    assert any(not torch.equal(before[k], v) for k, v in unet.state_dict().items())  # later steps were taken


def test_out_of_memory_is_one_line_naming_the_memory_flags(tiny_sd, tmp_path, capsys, monkeypatch):
    def out_of_memory(config, classifier=None):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(dd, "train", out_of_memory)
    code = dd.main(["--model", tiny_sd, "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "--low-memory" in err and "--train-batch-size" in err
