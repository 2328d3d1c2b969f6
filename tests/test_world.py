"""The shipped toy world (tests/toyworld.py): a model that learnt its bias from data, as SD did.

These tests check what the world is: its UNet draws the skew it was trained on (15% "female") as faces its
classifier can read; the classifier is right on unseen faces and says "none" to the rest; the VAE keeps the
faces legible; and the builder still builds a world that loads. What the method does on it (learning runs of
1.5-4 minutes each) is measured in docs/toy-world.md, with the raw records in docs/toyworld/.
"""
import os

import numpy as np
import pytest
import torch

import ddpo_debias as dd
import rewards
from tests import toyworld

WORLD = toyworld.SHIPPED
CLASSIFIER = os.path.join(WORLD, "classifier")


def test_the_world_is_biased_and_draws_faces():
    """64 samples at 20 DDIM steps, guidance 5: the learnt skew, and images the classifier reads as faces."""
    config = dd.Config(model=WORLD, batch_size=64, num_steps=20, guidance_scale=5.0, mixed_precision="no")
    unet, vae, text_encoder, tokenizer, scheduler = dd.load_models(config, "cpu")
    embeds = dd.encode_prompts(text_encoder, tokenizer, [toyworld.PROMPT], "cpu")
    images = dd.sample(unet, vae, scheduler, embeds, torch.zeros(64, dtype=torch.long), config, "cpu",
                       torch.Generator().manual_seed(1))["images"]
    labels = rewards.label_images(rewards.Classifier(CLASSIFIER)(images))
    assert 0.1 <= labels.count("female") / 64 <= 0.25, labels
    assert labels.count(None) < 0.25 * 64, labels


def test_the_two_prompt_world_is_skewed_in_opposite_directions():
    """The two-prompt world (build --two-prompts, docs/many-prompts.md): 32 samples of each prompt, drawn in one
    batch. Its nurses are mostly "female" and its engineers mostly "male": the batch as a whole looks balanced,
    which is why q must be taken per prompt."""
    config = dd.Config(model=WORLD, unet=toyworld.TWO_UNET, batch_size=64, num_steps=20, mixed_precision="no")
    unet, vae, text_encoder, tokenizer, scheduler = dd.load_models(config, "cpu")
    embeds = dd.encode_prompts(text_encoder, tokenizer, list(toyworld.TWO_PROMPTS), "cpu")
    ids = torch.arange(64) % 2
    images = dd.sample(unet, vae, scheduler, embeds, ids, config, "cpu", torch.Generator().manual_seed(2))["images"]
    labels = rewards.label_images(rewards.Classifier(CLASSIFIER)(images))
    nurses, engineers = labels[0::2], labels[1::2]
    assert rewards.female_ratio(nurses) >= 0.65 and rewards.female_ratio(engineers) <= 0.35, labels
    assert 0.3 <= rewards.female_ratio(labels) <= 0.7 and labels.count(None) < 0.25 * 64, labels


def test_the_classifier_reads_held_out_faces_and_says_none_to_the_rest():
    """> 95% right on faces it never saw (seed 999), "none" (max probability ≤ 0.7) on noise and non-faces."""
    classifier = rewards.Classifier(CLASSIFIER)
    faces, female = toyworld.make_faces(400, 0.5, seed=999)
    labels = rewards.label_images(classifier(faces))
    accuracy = sum(label == ("female" if f else "male") for label, f in zip(labels, female.tolist())) / 400
    assert accuracy > 0.95, accuracy
    rng = np.random.default_rng(999)
    noise = torch.rand(100, 3, toyworld.SIZE, toyworld.SIZE, generator=torch.Generator().manual_seed(999))
    others = torch.stack([toyworld.to_tensor(toyworld.draw_non_face(rng)) for _ in range(300)])
    for images in (noise, others):
        assert rewards.label_images(classifier(images)).count(None) >= 0.9 * len(images)


def test_the_vae_keeps_faces_legible_at_unit_latent_std():
    """Scaled latents of unseen faces have about unit std (scaling_factor, as SD's 0.18215), and the classifier
    still reads the faces after encoding and decoding: the hair survives the 4x8x8 bottleneck."""
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(os.path.join(WORLD, "vae")).eval()
    faces, female = toyworld.make_faces(256, 0.5, seed=998)
    with torch.no_grad():
        latents = vae.encode(faces * 2 - 1).latent_dist.mode()
        decoded = ((vae.decode(latents).sample + 1) / 2).clamp(0, 1)
    assert 0.8 < (latents * vae.config.scaling_factor).std().item() < 1.25
    labels = rewards.label_images(rewards.Classifier(CLASSIFIER)(decoded))
    assert sum(label == ("female" if f else "male") for label, f in zip(labels, female.tolist())) > 0.9 * 256


def test_the_builder_still_builds_a_world_that_loads(tmp_path):
    """A few steps of every stage (build --quick), saved and loaded back by the real loading code."""
    log = toyworld.build(str(tmp_path / "world"), quick=True)
    assert log["steps"] == {"vae": 20, "unet": 20, "classifier": 20}
    config = dd.Config(model=str(tmp_path / "world"), mixed_precision="no")
    unet, vae, text_encoder, tokenizer, scheduler = dd.load_models(config, "cpu")
    assert unet.config.sample_size == 8 and unet.config.in_channels == 4 and vae.config.scaling_factor != 1.0
    assert dd.derived_sizes(config, unet)["clip_range"] == pytest.approx(8e-4)
    classifier = rewards.Classifier(str(tmp_path / "world" / "classifier"))
    assert classifier(torch.rand(2, 3, 32, 32)).shape == (2, 2)


def test_the_builder_builds_a_three_class_world_that_loads(tmp_path):
    """build --three-classes --quick: the shipped world's VAE and text encoder, a new UNet and a three-label
    classifier whose labels are found by name."""
    log = toyworld.build(str(tmp_path / "three"), quick=True, reuse=WORLD, three=True)
    assert log["shares"] == toyworld.THREE and "classifier_loss" in log
    config = dd.Config(model=str(tmp_path / "three"), mixed_precision="no")
    assert dd.load_models(config, "cpu")[0].config.sample_size == 8
    classifier = rewards.Classifier(str(tmp_path / "three" / "classifier"), THREE)
    assert classifier(torch.rand(2, 3, 32, 32)).shape == (2, 3)


THREE = list(toyworld.THREE)  # short, long, tall: the three-class world's classes


def test_the_three_class_world_is_skewed_70_20_10():
    """The three-class world (build --three-classes, docs/classes.md): 128 samples at 20 steps draw short hair
    most, long hair less and tall hair least, as its data (70/20/10), and its classifier reads them."""
    config = dd.Config(model=WORLD, unet=os.path.join(toyworld.THREE_WORLD, "unet"), batch_size=128, num_steps=20,
                       mixed_precision="no")
    unet, vae, text_encoder, tokenizer, scheduler = dd.load_models(config, "cpu")
    embeds = dd.encode_prompts(text_encoder, tokenizer, [toyworld.PROMPT], "cpu")
    images = dd.sample(unet, vae, scheduler, embeds, torch.zeros(128, dtype=torch.long), config, "cpu",
                       torch.Generator().manual_seed(3))["images"]
    classifier = rewards.Classifier(os.path.join(toyworld.THREE_WORLD, "classifier"), THREE)
    labels = rewards.label_images(classifier(images), THREE)
    shares = dict(zip(THREE, rewards.class_shares(labels, THREE)))
    assert shares["short"] >= 0.55 and shares["tall"] <= 0.2 and shares["short"] > shares["long"], shares
    assert labels.count(None) < 0.25 * 128, labels


def test_the_three_class_classifier_reads_held_out_faces_by_name():
    """> 90% right on balanced faces it never saw, though its labels are "Long", "Short", "Tall" in another order
    than --classes; "none" on most non-faces."""
    classifier = rewards.Classifier(os.path.join(toyworld.THREE_WORLD, "classifier"), THREE)
    faces, style = toyworld.make_styled_faces(300, dict.fromkeys(THREE, 1 / 3), seed=999)
    labels = rewards.label_images(classifier(faces), THREE)
    accuracy = sum(label == THREE[k] for label, k in zip(labels, style.tolist())) / 300
    assert accuracy > 0.9, accuracy
    rng = np.random.default_rng(999)
    others = torch.stack([toyworld.to_tensor(toyworld.draw_non_face(rng)) for _ in range(200)])
    assert rewards.label_images(classifier(others), THREE).count(None) >= 0.9 * 200


@pytest.mark.parametrize("three", [False, True])
def test_the_independent_classifiers_read_unseen_faces(three):
    """The worlds' second classifiers (a ResNet, the first is a ViT; other faces): > 90% right on faces neither saw,
    half of them seen through the VAE as samples are, with labels in the order and case of their world."""
    import os
    import rewards
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(os.path.join(toyworld.SHIPPED, "vae")).eval()
    if three:
        classes = list(toyworld.THREE)
        faces, which = toyworld.make_styled_faces(240, dict.fromkeys(classes, 1 / 3), 777)
        folder = os.path.join(toyworld.THREE_WORLD, toyworld.INDEPENDENT)
    else:
        classes = ["female", "male"]
        faces, female = toyworld.make_faces(240, 0.5, 777)
        which = (~female).long()
        folder = os.path.join(toyworld.SHIPPED, toyworld.INDEPENDENT)
    with torch.no_grad():
        half = faces[:120] * 2 - 1
        faces[:120] = ((vae.decode(vae.encode(half).latent_dist.mode()).sample + 1) / 2).clamp(0, 1)
    labels = rewards.label_images(rewards.Classifier(folder, classes)(faces), classes, 0.7)
    right = sum(label == classes[k] for label, k in zip(labels, which.tolist()))
    assert right / len(labels) > 0.9, right
