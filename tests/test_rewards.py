"""rewards.py against hand-computed tables and against transformers' own pipeline."""
import pytest
import torch
from PIL import Image

import rewards
from rewards import Classifier, female_ratio, label_images, r_balance, r_shift
from tests.fixtures import make_tiny_classifier, two_classes


def test_label_images_threshold_is_strict():
    p = torch.tensor([[0.71, 0.29], [0.7, 0.3], [0.5, 0.5], [0.3, 0.7], [0.29, 0.71], [1.0, 0.0], [0.0, 1.0]])
    assert label_images(p) == ["female", None, None, None, "male", "female", "male"]


def test_r_shift_eq1():
    p = two_classes([0.9, 0.2])
    assert torch.allclose(r_shift(p, underrepresented="female"), torch.tensor([0.9, 0.2]))
    assert torch.allclose(r_shift(p, underrepresented="male"), torch.tensor([0.1, 0.8]))
    with pytest.raises(ValueError):
        r_shift(p, underrepresented="other")


@pytest.mark.parametrize("labels, expected", [
    # q = 1/4 -> d = 0.25, minority female: female +d, male and None -d
    (["female", "male", "male", "male"], [0.25, -0.25, -0.25, -0.25]),
    # q = 2/3 (None not counted in q) -> d = 1/6, minority male
    (["female", "female", "male", None], [-1 / 6, -1 / 6, 1 / 6, -1 / 6]),
    (["female", "male"], [0.0, 0.0]),  # q = 0.5: balanced, every reward 0
    ([None, None], [0.0, 0.0]),  # F + M = 0: q undefined, reward 0
    (["male", "male", "male"], [-0.5, -0.5, -0.5]),  # q = 0 -> d = 0.5, no female image to reward
])
def test_r_balance_table(labels, expected):
    assert torch.allclose(r_balance(torch.zeros(len(labels), 2), labels), torch.tensor(expected))


def test_female_ratio():
    assert female_ratio(["female", "male", None, "male"]) == pytest.approx(1 / 3)
    assert female_ratio([None]) is None


@pytest.mark.parametrize("n_female", range(0, 9))
def test_r_balance_total_is_minus_2n_q_minus_half_squared(n_female):
    """Fig. 2 of the paper: with no None images the batch total is -2·n·(q - 0.5)², zero only at q = 0.5."""
    n = 8
    labels = ["female"] * n_female + ["male"] * (n - n_female)
    q = n_female / n
    total = r_balance(torch.zeros(n, 2), labels).sum().item()
    assert total == pytest.approx(-2 * n * (q - 0.5) ** 2)
    assert (total == pytest.approx(0.0)) == (q == 0.5)


def test_registry_picks_by_name():
    p = two_classes([0.9, 0.1])
    labels = label_images(p)
    assert rewards.REWARDS["shift"] is r_shift and rewards.REWARDS["balance"] is r_balance
    assert torch.equal(rewards.REWARDS["shift"](p, labels, None, None, "male"), p[:, 1])
    assert torch.equal(rewards.REWARDS["balance"](p, labels), torch.zeros(2))  # q = 0.5


def _smooth_images(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=size, mode="bilinear")


def test_classifier_agrees_with_transformers_pipeline(tiny_classifier):
    from transformers import pipeline
    classifier = Classifier(tiny_classifier)
    images = _smooth_images(6, 48)  # 48 -> 32: the resize shrinks, as SD's 512 -> 224 does
    ours = classifier(images)
    pipe = pipeline("image-classification", model=tiny_classifier, device="cpu")
    pils = [Image.fromarray((im.permute(1, 2, 0) * 255).round().byte().numpy()) for im in images]
    theirs = [[next(r["score"] for r in out if r["label"] == c) for c in ("female", "male")]
              for out in pipe(pils, top_k=None)]
    assert ours.dtype == torch.float32 and ours.shape == (6, 2)
    assert torch.allclose(ours, torch.tensor(theirs), atol=0.02), (ours, theirs)
    assert ours[:, 0].std() > 0.05  # the comparison is not between constants


def test_labels_found_by_name_not_index(models_dir):
    images = _smooth_images(5, 32)
    a = Classifier(make_tiny_classifier(models_dir / "fm", labels=("female", "male")))
    b = Classifier(make_tiny_classifier(models_dir / "mf", labels=("male", "female")))
    # same weights, swapped label names: P(female) of one is P(male) of the other
    assert torch.equal(a(images), b(images).flip(-1)) and not torch.equal(a(images), b(images))
    c = Classifier(make_tiny_classifier(models_dir / "wm", labels=("Man", "Woman")))  # synonyms, any case
    assert torch.equal(c(images), b(images))


def test_classifier_without_gender_labels_is_refused(models_dir):
    path = make_tiny_classifier(models_dir / "catdog", labels=("cat", "dog"))
    with pytest.raises(ValueError, match="no label 'female'; its labels are: cat, dog"):
        Classifier(path)


def test_soft_balance_by_hand():
    """q̃ = mean P(female); for two classes image i gets |q̃ - 0.5|·(2·P_i(minority) - 1)."""
    p = two_classes([1.0, 0.0, 0.0, 0.0])  # q̃ = 0.25, minority female, d = 0.25: eq. (3)'s ±d on confident images
    assert torch.allclose(rewards.r_soft_balance(p), torch.tensor([0.25, -0.25, -0.25, -0.25]))
    p = two_classes([0.9, 0.8, 0.9, 0.5])  # q̃ = 0.775, minority male: P(male) 0.1, 0.2, 0.1, 0.5; "none" gets 0
    assert torch.allclose(rewards.r_soft_balance(p), 0.275 * torch.tensor([-0.8, -0.6, -0.8, 0.0]))
    assert torch.allclose(rewards.r_soft_balance(two_classes([0.2, 0.8])), torch.zeros(2))  # q̃ = 0.5: balanced


def test_soft_balance_still_ranks_a_batch_without_a_minority_image():
    """Eq. (3) gives every image -d when no image is confidently female: A = 0, nothing is learnt. The soft variant
    still rewards the images that come closest to the minority."""
    p = two_classes([0.02, 0.10, 0.25, 0.05])  # every label "male"
    labels = rewards.label_images(p)
    assert rewards.r_balance(p, labels).unique().numel() == 1
    soft = rewards.r_soft_balance(p)
    assert soft.argsort().tolist() == p[:, 0].argsort().tolist()  # more female-looking, more reward
