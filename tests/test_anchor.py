"""--kl-base β, DPOK's KL anchor to the pre-trained model (issue 34): the logged KL and the gradient it adds against a
float64 computation by hand, no effect where the policy is the base, and the CLI's metric."""
import json
import math

import pytest
import torch

import ddpo_debias as dd
from tests.test_cli import TINY

B, T, SKIP = 4, 4, 1


def setup(tiny_sd, seed=0):
    """The tiny UNet with its attention weights moved away from the base, the base's weights, and an epoch's samples
    (random trajectories: the anchor does not care how x_t was drawn)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    unet = dd.train_attention_only(UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet"), torch.float32)
    params = dd.trainable_parameters(unet)
    base = {name: p.detach().clone() for name, p in params.items()}
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    scheduler = DDIMScheduler.from_pretrained(tiny_sd, subfolder="scheduler")
    scheduler.set_timesteps(T)
    c, s = unet.config.in_channels, unet.config.sample_size
    samples = {"latents": torch.randn(B, T + 1, c, s, s, generator=generator),
               "log_probs": torch.zeros(B, T), "means": torch.randn(B, T, c, s, s, generator=generator),
               "timesteps": scheduler.timesteps.clone(), "prompt_ids": torch.zeros(B, dtype=torch.long)}
    embeds = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    return unet, base, scheduler, samples, embeds


def config(beta, **overrides):
    return dd.Config(batch_size=B, num_steps=T, skip_final_steps=SKIP, updates_per_epoch=1, train_batch_size=2,
                     kl_base=beta, device="cpu", mixed_precision="no", clip_range=1e-3, max_grad_norm=1e9,
                     **overrides)


def run_update(unet, base, scheduler, samples, embeds, beta):
    """One optimizer step of SGD at lr 1: the weights move by minus the gradient, which is what we compare."""
    params = dd.trainable_parameters(unet)
    before = {name: p.detach().clone() for name, p in params.items()}
    optimizer = torch.optim.SGD(params.values(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    stats, skipped, _ = dd.update(unet, optimizer, scaler, scheduler, embeds, samples, advantages, config(beta),
                                  torch.Generator().manual_seed(1), dd.frozen_base(unet, base) if beta else None)
    gradient = {name: before[name] - p.detach() for name, p in params.items()}
    with torch.no_grad():  # back to the weights before the step
        for name, p in params.items():
            p.copy_(before[name])
    return stats, gradient


def kl_by_hand(unet, base, scheduler, samples, embeds, w=5.0, eta=1.0):
    """Mean over the images and trained steps of ‖μ_θ - μ_base‖²/(2σ_t²)/(C·H·W), all in float64 with the DDIM
    formulas written out here: -> (the KL, a float64 copy of `unet` whose weights it is differentiable in)."""
    import copy
    policy = copy.deepcopy(unet).double()
    anchor = copy.deepcopy(unet).double()
    with torch.no_grad():
        for name, p in dd.trainable_parameters(anchor).items():
            p.copy_(base[name].double())
    alphas = scheduler.alphas_cumprod.double()
    step = scheduler.config.num_train_timesteps // T
    states = torch.cat([embeds[:1].expand(B, -1, -1), embeds[1:2].expand(B, -1, -1)]).double()  # uncond, then text
    total = 0.0
    for k in range(T - SKIP):
        t = int(samples["timesteps"][k])
        a_t = alphas[t]
        a_prev = alphas[t - step] if t - step >= 0 else scheduler.final_alpha_cumprod.double()
        var = eta**2 * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)  # σ_t², DDIM eq. (16)
        x = samples["latents"][:, k].double()

        def mean(model):  # DDIM eq. (12) without the noise, from the guided ε̂
            uncond, text = model(torch.cat([x, x]), t, encoder_hidden_states=states).sample.chunk(2)
            eps = uncond + w * (text - uncond)
            return a_prev.sqrt() * (x - (1 - a_t).sqrt() * eps) / a_t.sqrt() + (1 - a_prev - var).sqrt() * eps

        with torch.no_grad():
            target = mean(anchor)
        total = total + ((mean(policy) - target) ** 2 / (2 * var)).mean(dim=(1, 2, 3)).sum()
    return total / (B * (T - SKIP)), policy


def test_the_anchor_is_the_exact_gaussian_kl_to_the_base_by_hand(tiny_sd):
    unet, base, scheduler, samples, embeds = setup(tiny_sd)
    stats, _ = run_update(unet, base, scheduler, samples, embeds, beta=0.5)
    expected, _ = kl_by_hand(unet, base, scheduler, samples, embeds)
    assert expected.item() > 1e-6  # the weights were moved: a real distance
    assert stats[:, 5].mean().item() == pytest.approx(expected.item(), rel=1e-4)


def test_the_anchor_adds_beta_times_the_kl_gradient(tiny_sd):
    """The update's gradient with β minus the one without is β·∇(mean KL), ∇ taken in float64 by autograd."""
    unet, base, scheduler, samples, embeds = setup(tiny_sd)
    beta = 2.0
    _, with_anchor = run_update(unet, base, scheduler, samples, embeds, beta)
    _, without = run_update(unet, base, scheduler, samples, embeds, 0.0)
    kl, policy = kl_by_hand(unet, base, scheduler, samples, embeds)
    names = list(dd.trainable_parameters(policy))
    grads = torch.autograd.grad(kl, list(dd.trainable_parameters(policy).values()))
    largest = max(g.abs().max().item() for g in grads)
    assert largest > 0
    for name, g in zip(names, grads):
        difference = (with_anchor[name] - without[name]).double()
        assert torch.allclose(difference, beta * g, rtol=1e-3, atol=1e-4 * beta * largest), name


def test_where_the_policy_is_the_base_the_anchor_changes_nothing(tiny_sd):
    """At θ = base (the first update of a run) the KL and its gradient are exactly 0: the step is the same to the
    bit as without the anchor."""
    unet, base, scheduler, samples, embeds = setup(tiny_sd)
    with torch.no_grad():
        for name, p in dd.trainable_parameters(unet).items():
            p.copy_(base[name])
    stats, with_anchor = run_update(unet, base, scheduler, samples, embeds, beta=3.0)
    _, without = run_update(unet, base, scheduler, samples, embeds, beta=0.0)
    assert stats[:, 5].abs().max() == 0
    assert all(torch.equal(with_anchor[k], without[k]) for k in without)


def test_the_cli_logs_kl_base_and_only_with_the_flag(tiny_sd, tiny_classifier, tmp_path):
    common = ["--model", tiny_sd, "--classifier", tiny_classifier, *TINY, "--reward", "shift", "--lr", "1e-2",
              "--epochs", "3"]
    assert dd.main([*common, "--kl-base", "1", "--output-dir", str(tmp_path / "anchored")]) == 0
    assert dd.main([*common, "--output-dir", str(tmp_path / "plain")]) == 0
    read = lambda name: [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    anchored, plain = read("anchored"), read("plain")
    assert all("kl_base" not in m for m in plain)
    assert anchored[0]["kl_base"] == pytest.approx(anchored[0]["kl"], rel=1e-6)  # epoch 0: the old policy is the base
    assert all(math.isfinite(m["kl_base"]) and m["kl_base"] > 0 for m in anchored)
    assert anchored[2]["kl_base"] > anchored[2]["kl"]  # later, the base is further away than the last epoch's policy


def test_the_independent_classifier_scores_and_never_rewards(tiny_sd, tiny_classifier, models_dir, tmp_path):
    """--independent-classifier adds its labels' report to each epoch and changes nothing else: metrics and
    weights are the run's without it. Given a copy of the reward's own classifier (the classifier itself is
    refused: it could never disagree), it reads the same counts."""
    import shutil
    from tests.fixtures import make_tiny_classifier
    other = str(make_tiny_classifier(models_dir / "independent-tiny", seed=3))
    copy = str(shutil.copytree(tiny_classifier, tmp_path / "copy"))
    common = ["--model", tiny_sd, "--classifier", tiny_classifier, *TINY, "--reward", "shift", "--lr", "1e-2",
              "--epochs", "3", "--save-every", "1"]
    for name, extra in (("plain", []), ("same", ["--independent-classifier", copy]),
                        ("other", ["--independent-classifier", other])):
        assert dd.main([*common, *extra, "--output-dir", str(tmp_path / name)]) == 0
    read = lambda name: [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    timing = lambda m: "second" in m
    strip = lambda ms: [{k: v for k, v in m.items() if not timing(k) and k != "independent"} for m in ms]
    assert strip(read("same")) == strip(read("plain")) == strip(read("other"))
    weights = lambda name: torch.load(tmp_path / name / "checkpoint.pt", weights_only=False)["weights"]
    assert all(torch.equal(weights("other")[k], v) for k, v in weights("plain").items())
    for m in read("same"):
        assert {k: m["independent"][k] for k in ("n_female", "n_male", "n_none")} == {
            k: m[k] for k in ("n_female", "n_male", "n_none")}
    assert any(m["independent"]["n_female"] != m["n_female"] for m in read("other"))  # another reader


# ------------------------------------------------------------------------ --augment: the reward read through views
def test_views_are_the_image_its_mirror_two_shifts_and_a_blur_by_hand():
    import rewards
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32) / 6144
    v = rewards.views(images).view(5, 2, 3, 32, 32)
    assert torch.equal(v[0], images) and torch.equal(v[1], images.flip(-1))
    s = 32 // 16  # the shift: 1/16 of the side, the edge column (row) repeated into the gap
    assert torch.equal(v[2][..., :, s:], images[..., :, :-s]) and torch.equal(v[2][..., :, 0], images[..., :, 0])
    assert torch.equal(v[3][..., s:, :], images[..., :-s, :]) and torch.equal(v[3][..., 0, :], images[..., 0, :])
    i, j = 5, 7  # an inner pixel's blur: the mean of its 3x3 neighbourhood
    assert torch.allclose(v[4][..., i, j], images[..., i - 1:i + 2, j - 1:j + 2].mean(dim=(-2, -1)))
    assert torch.allclose(v[4][..., 0, 0], images[..., :2, :2].mean(dim=(-2, -1)))  # a corner: its 4 pixels


def test_augmented_reading_averages_the_views_and_a_one_view_feature_earns_no_label():
    """A 'classifier' fooled by one bright corner pixel says female with 0.95 when it sees it; averaged over the
    views (the mirror, the shifts and the blur move or dim the pixel) its P(female) falls under 0.7: no label."""
    import rewards

    def corner(images):  # (n, 3, H, W) -> (n, 2): female iff the top-left pixel is bright
        female = torch.where(images[:, 0, 0, 0] > 0.9, 0.95, 0.05)
        return torch.stack([female, 1 - female], dim=1)
    images = torch.zeros(4, 3, 32, 32)
    images[:2, :, 0, 0] = 1.0  # the faint feature, in images 0 and 1
    plain, read = corner(images), rewards.augmented(corner)(images)
    by_hand = corner(rewards.views(images)).view(5, 4, 2).mean(dim=0)
    assert torch.allclose(read, by_hand) and read.shape == (4, 2)
    assert rewards.label_images(plain)[:2] == ["female", "female"]
    assert rewards.label_images(read)[:2] == [None, None] and read[0, 0].item() < 0.7


def test_the_cli_rewards_through_views_and_only_with_a_classifier(tiny_sd, tiny_classifier, tmp_path, capsys):
    common = ["--model", tiny_sd, "--classifier", tiny_classifier, *TINY, "--reward", "shift"]
    assert dd.main([*common, "--augment", "--output-dir", str(tmp_path / "augmented")]) == 0
    assert dd.main([*common, "--output-dir", str(tmp_path / "plain")]) == 0
    read = lambda name: [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert read("augmented")[0]["reward_mean"] != read("plain")[0]["reward_mean"]  # same images, other reading
    capsys.readouterr()
    assert dd.main([*common, "--augment", "--labeller", "judge", "--judge-url", "http://127.0.0.1:9",
                    "--output-dir", str(tmp_path / "judge")]) == 2
    err = capsys.readouterr().err
    assert "--augment" in err and "--labeller classifier" in err
