"""Can a reader of the two-class world be 97% right on each class and still err where the reward's ViT errs no more
than twice as often as chance? On 2000 faces (1000 of each class) through the VAE, of the choosing seed (777) and
of tests/test_referee.py's seed (4242): for the referee at its numbers and with a larger LEGIBLE (below which it
answers "none": the VAE leaves the two paintings alike), for the referee given each face's true geometry, and for
the world's second classifier (the ResNet): each class's share right, the faces it labels wrongly (a "none" is not
a wrong label), how many of them the ViT also labels wrongly, and chance (wrong x ViT's wrong / faces). Then the
same split by legibility as the test splits it (the face drawn with the other style differs after the VAE by more
than 0.03 rms per value). Writes OUT.json. From the repository's root:

    python docs/benchmarks/2026-12-05-referee/colours/coincidence.py OUT.json
"""
import importlib.util
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.getcwd())
import rewards  # noqa: E402
from tests import referee, test_referee, toyworld  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("choose", os.path.join(HERE, "..", "refined", "choose.py"))
choose = importlib.util.module_from_spec(spec)
spec.loader.exec_module(choose)
LEGIBLE = (referee.LEGIBLE, 0.1, 0.2, 0.5, 1.0, 0.03 ** 2 * 3 * toyworld.SIZE ** 2)  # the last: the test's 0.03 rms


def faces(two, seed):
    """As test_referee's fixture: 2000 faces through the VAE, which are female, their draws, which are legible."""
    rng = np.random.default_rng(seed)
    female = np.zeros(2000, dtype=bool)
    female[:1000] = True
    rng.shuffle(female)
    shapes = [toyworld.face_geometry(rng, f) for f in female]
    images = two.through_vae(torch.stack([toyworld.to_tensor(toyworld.render_face(g)) for g in shapes]))
    other = torch.stack([toyworld.to_tensor(toyworld.render_face(
        {**g, "style": "short"} if g["style"] == "long" else {**g, "style": "long", "length": 1.625 * g["r"]}))
        for g in shapes])
    legible = ((two.through_vae(other) - images).pow(2).mean((1, 2, 3)).sqrt() > 0.03).numpy()
    return images, female, shapes, legible


def tally(labels, female, vit_wrong, where):
    """labels: "female" / "male" / None per face -> the counts on the faces `where` holds."""
    truth = np.where(female, "female", "male")
    labels = np.array([str(x) for x in labels])
    wrong = (labels != truth) & (labels != "None")
    n = where.sum()
    return dict(faces=int(n), female_right=round(float((labels == truth)[where & female].mean()), 4),
                male_right=round(float((labels == truth)[where & ~female].mean()), 4),
                wrong=int(wrong[where].sum()), none=int((labels == "None")[where].sum()),
                vit_wrong=int(vit_wrong[where].sum()), both=int((wrong & vit_wrong)[where].sum()),
                chance=round(float(wrong[where].sum() * vit_wrong[where].sum() / n), 3))


def labelled(found, legible):
    """Referee.read and decide from `readings` (grid's fit, search's) with this LEGIBLE -> labels."""
    probs = []
    for t, rms, reach in found:
        t = torch.cat([torch.full_like(t[:, :1], referee.CUT), torch.where(reach < legible, referee.CUT, t[:, 1:])], 1)
        p = (t / referee.SOFTNESS).softmax(dim=1)
        p[rms.gather(1, p.argmax(dim=1, keepdim=True))[:, 0] > referee.FIT_RMS] = 0.5
        probs.append(p)
    grid, searched = probs
    p = torch.where((grid.max(dim=1).values > rewards.THRESHOLD)[:, None], grid, searched)
    return rewards.label_images(p[:, [1, 0]])  # (female, male)


def main(out):
    toyworld.one_thread()
    two = referee.Referee()
    record = {}
    for seed in (777, 4242):
        images, female, shapes, legible = faces(two, seed)
        truth = np.where(female, "female", "male")
        vit_wrong = np.array([str(x) for x in rewards.label_images(rewards.Classifier(test_referee.VIT)(images))]) != truth
        found = choose.readings(two, images)
        true = [{**g, "length": g.get("length") or 1.625 * g["r"]} for g in shapes]
        readers = {f"referee, LEGIBLE {legible_at:.3g}": labelled(found, legible_at) for legible_at in LEGIBLE}
        readers["referee as shipped"] = rewards.label_images(two(images))
        readers["referee given the true geometry"] = labelled(choose.readings(two, images, true), referee.LEGIBLE)
        readers["second classifier (ResNet)"] = rewards.label_images(rewards.Classifier(test_referee.RESNET)(images))
        record[str(seed)] = {name: {part: tally(labels, female, vit_wrong, where) for part, where in (
            ("all", np.ones_like(legible)), ("legible", legible), ("illegible", ~legible))}
            for name, labels in readers.items()}
        for name, parts in record[str(seed)].items():
            print(seed, name, json.dumps(parts["all"]), "illegible:", json.dumps(parts["illegible"]))
    with open(out, "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
