"""The referee's figures in docs/toy-world.md ("The referee"), on the faces tests/test_referee.py reads (seeds
4242, 4343, 4444, 4545): accuracy through the VAE, "none" on non-faces, the latent attacks on each reward
classifier, and how often its errors coincide with the reward's ViT. Writes OUT.json: at revision c9196da (the first
referee, the grid's fit alone) it wrote referee_check.json here, at d6b5dca (the search added) refined/, and since
each painting's colours are corrected through the VAE, colours/referee_check.json. From the repository's root:

    python docs/benchmarks/2026-12-05-referee/referee_check.py OUT.json [--attacked 64]
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.getcwd())
import rewards  # noqa: E402
from tests import referee, test_referee, toyworld  # noqa: E402


def shares_right(labels, truth, groups):
    hits = np.array([a == b for a, b in zip(labels, truth)])
    return {g: float(hits[np.array(truth) == g].mean()) for g in groups}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--attacked", type=int, default=64, help="faces attacked per classifier")
    args = parser.parse_args(argv)
    two = referee.Referee()
    report = {}
    rng = np.random.default_rng(4242)  # as test_referee's `faces`
    female = np.zeros(2000, dtype=bool)
    female[:1000] = True
    rng.shuffle(female)
    shapes = [toyworld.face_geometry(rng, f) for f in female]
    images = two.through_vae(torch.stack([toyworld.to_tensor(toyworld.render_face(g)) for g in shapes]))
    truth = ["female" if f else "male" for f in female]
    labels = rewards.label_images(two(images))
    report["two_class_right"] = shares_right(labels, truth, ("female", "male"))
    report["two_class_none"] = labels.count(None) / len(labels)
    readers = {"vit": test_referee.VIT, "resnet": test_referee.RESNET}
    hardened = os.path.join(toyworld.SHIPPED, "hardened")
    if os.path.isdir(hardened):
        readers["hardened"] = hardened
    for name, path in readers.items():
        read = rewards.label_images(rewards.Classifier(path)(images))
        report[f"{name}_right"] = shares_right(read, truth, ("female", "male"))
    other = torch.stack([toyworld.to_tensor(toyworld.render_face(
        {**g, "style": "short"} if g["style"] == "long" else {**g, "style": "long", "length": 1.625 * g["r"]}))
        for g in shapes])
    legible = ((two.through_vae(other) - images).pow(2).mean((1, 2, 3)).sqrt() > 0.03).numpy()
    ref_wrong = np.array([a not in (None, b) for a, b in zip(labels, truth)])
    vit_wrong = np.array([a != b for a, b in zip(rewards.label_images(rewards.Classifier(test_referee.VIT)(images)),
                                                 truth)])
    for part, keep in (("all", np.ones_like(legible)), ("legible", legible)):
        r, v = ref_wrong[keep], vit_wrong[keep]
        report[f"coincidence_{part}"] = {"faces": int(keep.sum()), "referee_wrong": int(r.sum()),
                                         "vit_wrong": int(v.sum()), "both": int((r & v).sum()),
                                         "chance": float(r.mean() * v.mean() * keep.sum())}
    styles = list(toyworld.THREE)
    three = referee.Referee(styles)
    drawn, which = toyworld.make_styled_faces(600, dict.fromkeys(styles, 1 / 3), seed=4343)
    read = rewards.label_images(three(three.through_vae(drawn)), styles)
    report["three_class_right"] = shares_right(read, [styles[k] for k in which.tolist()], styles)
    rng = np.random.default_rng(4444)
    others = torch.stack([toyworld.to_tensor(toyworld.draw_non_face(rng)) for _ in range(300)])
    report["non_faces_none"] = rewards.label_images(two(others)).count(None) / 300
    drawn, _ = toyworld.make_faces(args.attacked, 0.0, seed=4545)
    for name, path in readers.items():
        attacked = toyworld.latent_attack(test_referee.differentiable(path), two.vae, drawn, target=0)
        report[f"attack_on_{name}"] = {
            reader: rewards.label_images(rewards.Classifier(p)(attacked)).count("female") / args.attacked
            for reader, p in readers.items()} | {"referee": rewards.label_images(two(attacked)).count("female")
                                                 / args.attacked}
    print(json.dumps(report, indent=2))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
