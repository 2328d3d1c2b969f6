"""Learning, not just running: on a tiny pipeline, R_shift raises the reward and R_balance moves q toward 0.5.

The testbed: a tiny SD pipeline whose VAE passes latent channels 0 and 1 to red and blue (tests/fixtures.py),
4x4x4 latents (the policy-gradient noise grows with the latent's size), and a stand-in classifier whose
P(female) is a smooth function of the image's red-minus-blue, standardised on the untrained model's samples
and biased toward "male" at the start. Each check is made against the same run with --lr 0 (same seed, same
noise): that control must fail it, so the check is a test.
"""
import statistics

import pytest
import torch

import ddpo_debias as dd
from tests.fixtures import make_tiny_sd

# Settings for the tiny latent: 5 steps; one update per epoch; clip range 1e-3 since log r is a mean over
# 64 elements, not 16384; lr 1e-2 for a random tiny UNet.
TINY = dict(batch_size=16, num_steps=5, updates_per_epoch=1, clip_range=1e-3, epochs=30, mixed_precision="no")


def redness(images):
    return images[:, 0].mean(dim=(1, 2)) - images[:, 2].mean(dim=(1, 2))  # (B,)


class ColourClassifier:
    """P(female) = sigmoid(slope·(redness - centre)/spread + bias)."""

    def __init__(self, model, slope, bias):
        config = dd.Config(model=model, batch_size=32, num_steps=TINY["num_steps"], mixed_precision="no")
        unet, vae, text_encoder, tokenizer, scheduler = dd.load_models(config, "cpu")
        embeds = dd.encode_prompt(text_encoder, tokenizer, config.prompt, "cpu")
        images = dd.sample(unet, vae, scheduler, embeds, config, "cpu", torch.Generator().manual_seed(123))["images"]
        self.centre, self.spread, self.slope, self.bias = redness(images).mean(), redness(images).std(), slope, bias

    def __call__(self, images):
        return torch.sigmoid(self.slope * (redness(images) - self.centre) / self.spread + self.bias)


@pytest.fixture(scope="module")
def linear_sd(models_dir):
    return str(make_tiny_sd(models_dir / "tiny-sd-linear-4", linear_vae=True, sample_size=4))


def run(path, tmp_path, classifier, **overrides):
    config = dd.Config(model=path, output_dir=str(tmp_path / f"run-{overrides}"), **{**TINY, **overrides})
    dd.prepare_run_dir(config)
    return dd.train(config, classifier=classifier)


def test_r_shift_raises_the_reward(linear_sd, tmp_path):
    classifier = ColourClassifier(linear_sd, slope=2.0, bias=-1.5)
    kwargs = dict(reward="shift", underrepresented="female", trust_region="clip")
    learned = [m["reward_mean"] for m in run(linear_sd, tmp_path, classifier, lr=1e-2, **kwargs)]
    control = [m["reward_mean"] for m in run(linear_sd, tmp_path, classifier, lr=0.0, **kwargs)]
    gain = lambda rewards: statistics.mean(rewards[-5:]) - statistics.mean(rewards[:5])
    assert gain(learned) > 0.15, learned
    assert not gain(control) > 0.15, control  # the same check fails when nothing is learned
    assert statistics.mean(learned[-10:]) > statistics.mean(control[-10:]) + 0.15


def test_r_balance_moves_female_ratio_toward_half(linear_sd, tmp_path):
    classifier = ColourClassifier(linear_sd, slope=4.0, bias=-1.5)
    kwargs = dict(reward="balance", trust_region="truly")
    distance = lambda metrics: [abs(m["female_ratio"] - 0.5) if m["female_ratio"] is not None else 0.5 for m in metrics]
    learned = distance(run(linear_sd, tmp_path, classifier, lr=1e-2, **kwargs))
    control = distance(run(linear_sd, tmp_path, classifier, lr=0.0, **kwargs))
    assert statistics.mean(control[:5]) > 0.15  # it starts biased
    assert statistics.mean(learned[-10:]) < statistics.mean(control[-10:]) - 0.05, (learned, control)
