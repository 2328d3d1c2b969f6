"""The toy worlds' referee (tests/referee.py): a reader of the faces that no reward uses and that the reward's
classifiers cannot fool as they fool each other.

The two-class world's accuracy and the attacks are held to the bars the referee was asked to meet (97%, 10%); the
other bars are its measured readings less a margin. All on faces of seeds no other test uses; docs/toy-world.md
("The referee") has the figures.
"""
import os

import numpy as np
import pytest
import torch

import rewards
from tests import referee, toyworld

VIT = os.path.join(toyworld.SHIPPED, "classifier")
RESNET = os.path.join(toyworld.SHIPPED, toyworld.INDEPENDENT)


@pytest.fixture(scope="module")
def two():
    return referee.Referee()


@pytest.fixture(scope="module")
def vae(two):
    return two.vae


@pytest.fixture(scope="module")
def faces(two):
    """1000 faces of each class (seed 4242), through the VAE as every sample is, with their draws."""
    rng = np.random.default_rng(4242)
    female = np.zeros(2000, dtype=bool)
    female[:1000] = True
    rng.shuffle(female)  # make_faces' order of draws, keeping each face's geometry
    shapes = [toyworld.face_geometry(rng, f) for f in female]
    drawn = torch.stack([toyworld.to_tensor(toyworld.render_face(g)) for g in shapes])
    return two.through_vae(drawn), torch.from_numpy(female), shapes


@pytest.fixture(scope="module")
def labels(two, faces):
    """The referee's labels of those faces (read once: two tests read them)."""
    return rewards.label_images(two(faces[0]))


def right(labels, truth):
    return np.array([label == want for label, want in zip(labels, truth)])


def test_the_referee_reads_the_faces_through_the_vae(faces, labels):
    """Long hair is "female", the cap alone "male", on 1000 unseen faces of each through the VAE round trip: at least
    97% of each (the bar asked for)."""
    _, female, _ = faces
    hits = right(labels, ["female" if f else "male" for f in female.tolist()])
    assert hits[female.numpy()].mean() >= 0.97 and hits[~female.numpy()].mean() >= 0.97, (
        hits[female.numpy()].mean(), hits[~female.numpy()].mean())


def test_the_referee_reads_the_three_hair_styles():
    """The three-class world (short, long, tall; its VAE is the two-class world's, which keeps tall hair worst)."""
    styles = list(toyworld.THREE)
    reader = referee.Referee(styles)
    drawn, which = toyworld.make_styled_faces(600, dict.fromkeys(styles, 1 / 3), seed=4343)
    labels = rewards.label_images(reader(reader.through_vae(drawn)), styles)
    hits = right(labels, [styles[k] for k in which.tolist()])
    shares = [hits[which.numpy() == k].mean() for k in range(3)]
    assert shares[0] >= 0.97 and shares[1] >= 0.96 and shares[2] >= 0.9, shares


def test_the_referee_says_none_to_non_faces(two):
    rng = np.random.default_rng(4444)
    others = torch.stack([toyworld.to_tensor(toyworld.draw_non_face(rng)) for _ in range(300)])
    noise = torch.rand(100, 3, toyworld.SIZE, toyworld.SIZE, generator=torch.Generator().manual_seed(4444))
    for images in (others, noise):
        assert rewards.label_images(two(images)).count(None) >= 0.95 * len(images)


def differentiable(path):
    """A shipped classifier as images -> P(female, male) with gradients (rewards.Classifier reads without them)."""
    classifier = rewards.Classifier(path)
    return lambda images: rewards.Classifier.__call__.__wrapped__(classifier, images)


@pytest.mark.parametrize("attacked", ["classifier", toyworld.INDEPENDENT, "hardened"])
def test_attacks_that_fool_a_reward_classifier_hardly_fool_the_referee(two, vae, attacked):
    """Adam on the VAE latents of 64 "male" faces toward "female" (toyworld.latent_attack, mean change 0.04): the
    attacked classifier reads at least 90% of them "female", the referee at most 10% (the bar asked for)."""
    path = os.path.join(toyworld.SHIPPED, attacked)
    drawn, _ = toyworld.make_faces(64, 0.0, seed=4545)
    images = toyworld.latent_attack(differentiable(path), vae, drawn, target=0)
    fooled = rewards.label_images(rewards.Classifier(path)(images)).count("female") / 64
    by_referee = rewards.label_images(two(images)).count("female") / 64
    assert fooled >= 0.9 and by_referee <= 0.1, (fooled, by_referee)


def test_the_referees_errors_are_not_the_reward_classifiers(two, faces, labels):
    """Where the VAE keeps the class legible (the face drawn with the other hair style differs after the round trip
    by more than 0.03 rms per value), the referee labels wrongly ("none" is no label) at most 10% of the faces the
    reward's ViT does not label right. The bar asked for, "no more than twice as often as chance", cannot be tested
    there: the referee errs on 3 of 1851 legible faces, and chance is 0.06 of a face. Where the VAE leaves the class
    illegible every reader guesses, and they guess wrong together: even the referee given each face's true geometry
    shares 2 of its 3 errors with the ViT (docs/toy-world.md, "The referee"; colours/coincidence.json)."""
    images, female, shapes = faces
    other = torch.stack([toyworld.to_tensor(toyworld.render_face(
        {**g, "style": "short"} if g["style"] == "long" else {**g, "style": "long", "length": 1.625 * g["r"]}))
        for g in shapes])
    legible = ((two.through_vae(other) - images).pow(2).mean((1, 2, 3)).sqrt() > 0.03).numpy()
    truth = ["female" if f else "male" for f in female.tolist()]
    referee_wrong = np.array([label not in (None, want) for label, want in zip(labels, truth)])[legible]
    vit_wrong = ~right(rewards.label_images(rewards.Classifier(VIT)(images)), truth)[legible]  # "none" too: no reward
    assert legible.mean() > 0.85 and vit_wrong.sum() >= 20, (legible.mean(), vit_wrong.sum())
    assert (referee_wrong & vit_wrong).sum() <= 0.1 * vit_wrong.sum(), (
        (referee_wrong & vit_wrong).sum(), vit_wrong.sum(), referee_wrong.sum())


# ------------------------------------------------------------------------- the reward's classifier, hardened
HARDENED = os.path.join(toyworld.SHIPPED, "hardened")


def test_the_hardened_classifier_reads_faces_and_refuses_hard_negatives(two):
    """tests/toyworld_model/hardened (toyworld independent --hardened): as right as the ViT it hardens on unseen
    faces through the VAE, and "none" where today's ViT sees "female" in part of long hair's look
    (draw_hard_negative: faint, too short, or one-sided)."""
    drawn, female = toyworld.make_faces(300, 0.5, seed=4646)
    images = two.through_vae(drawn)
    truth = ["female" if f else "male" for f in female.tolist()]
    for path, bar in ((HARDENED, 0.9), (VIT, 0.9)):
        assert right(rewards.label_images(rewards.Classifier(path)(images)), truth).mean() >= bar, path
    rng = np.random.default_rng(4747)
    hard = two.through_vae(torch.stack([toyworld.draw_hard_negative(rng) for _ in range(200)]))
    female_by = {path: rewards.label_images(rewards.Classifier(path)(hard)).count("female") / 200
                 for path in (HARDENED, VIT)}
    assert female_by[HARDENED] <= 0.15 and female_by[VIT] >= 2 * female_by[HARDENED], female_by


HARDENED_THREE = os.path.join(toyworld.THREE_WORLD, "hardened")


def test_the_three_class_hardened_classifier_reads_faces_and_refuses_hard_negatives(two):
    """tests/toyworld_three/hardened (toyworld independent --three-classes --hardened): within 0.06 of the
    three-class ViT on unseen faces of each style through the VAE (on 600 faces of another seed: 87% against 90%),
    and "none" on long hair's hard negatives where that ViT reads "long" (there: 9% against 29%). Tall hair's hard
    negatives it reads as the ViT does (28% "tall", half of them the pile on one side, which is still a pile):
    docs/toy-world.md says so."""
    styles = list(toyworld.THREE)
    drawn, which = toyworld.make_styled_faces(300, dict.fromkeys(styles, 1 / 3), seed=4848)
    images = two.through_vae(drawn)
    truth = [styles[k] for k in which.tolist()]
    vit = os.path.join(toyworld.THREE_WORLD, "classifier")
    read = {path: rewards.Classifier(path, classes=styles) for path in (HARDENED_THREE, vit)}
    hits = {path: right(rewards.label_images(c(images), styles), truth).mean() for path, c in read.items()}
    assert hits[HARDENED_THREE] >= 0.78 and hits[HARDENED_THREE] >= hits[vit] - 0.06, hits
    rng = np.random.default_rng(4949)
    hard = two.through_vae(torch.stack([toyworld.draw_hard_negative(rng, "long") for _ in range(200)]))
    by = {path: rewards.label_images(c(hard), styles).count("long") / 200 for path, c in read.items()}
    assert by[HARDENED_THREE] <= 0.15 and by[vit] >= 2 * by[HARDENED_THREE], by


@pytest.mark.parametrize("three", [False, True])
def test_the_hardened_classifier_trains_and_loads(tmp_path, three):
    """A few steps of the hardened training (hard negatives and latent attacks in the loop), saved, loaded."""
    log = toyworld.build_independent(str(tmp_path / "hardened"), three=three, steps=8, n=120, hardened=True)
    assert log["architecture"] == "ViT, hardened"
    classes = list(toyworld.THREE) if three else ["female", "male"]
    assert rewards.Classifier(str(tmp_path / "hardened"), classes=classes)(torch.rand(2, 3, 32, 32)).shape == (
        2, len(classes))
