"""How the refined referee's reading was chosen (tests/referee.py: CUT, SOFTNESS, LEGIBLE, FIT_RMS), on faces and
attacks of seeds no test reads: 2000 faces of seed 777 (1000 of each class) through the VAE, and 100 "male" faces
of seed 31 attacked toward "female" through each of the world's three classifiers (toyworld.latent_attack). Every
image is read from the grid's fit and from the search's; each setting labels as the referee does (the search's
reading where the grid's leaves the image unlabelled). The rule: the highest accuracy on the worse class among the
settings that read at most 10% of each classifier's attacks "female". Writes OUT.json. From the repository's root:

    python docs/benchmarks/2026-12-05-referee/refined/choose.py OUT.json
"""
import itertools
import json
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.getcwd())
from tests import referee, test_referee, toyworld  # noqa: E402

BANDS = dict(short=(0.35, 0.4, 0.45), long=(0.5, 0.55, 0.6))  # t at or below: short; at or above: the style
FIT_RMS = (0.04, 0.0425, 0.045, 0.0475, 0.05)
LEGIBLE = (0.05, 0.1, 0.2, 0.3, 0.5)


def readings(two, images, true=None):
    """-> for the grid's fit and the search's: t (B, 2) with no legibility applied, rms (B, 2), reach (B, 1).
    true: each image's own geometry (face_geometry), read in place of both fits (what a perfect fit would read)."""
    fits = [(two.shapes[a], two.maps[a]) for a in referee.best_fit(two.basis, images).tolist()]
    if true is None:
        searched = [referee.refined(*fit, image, two.styles) for fit, image in zip(fits, images)]
    else:
        fits = searched = [(g, referee.region_maps(g, two.styles)) for g in true]
    return [two.seen(fitted, images, legible=0.0) for fitted in (fits, searched)]


def labels(found, short, long, fit_rms, legible):
    """As Referee.read and decide at these numbers: -> (long-haired labels, short labels), each (B,) bool."""
    cut = (short + long) / 2
    softness = (long - cut) / math.log(7 / 3)  # P >= 0.7 at t = long (and at t = short for short)
    probs = []
    for t, rms, reach in found:
        t = torch.cat([torch.full_like(t[:, :1], cut), torch.where(reach < legible, cut, t[:, 1:])], dim=1)
        p = (t / softness).softmax(dim=1)
        p[rms.gather(1, p.argmax(dim=1, keepdim=True))[:, 0] > fit_rms] = 0.5
        probs.append(p)
    grid, searched = probs
    p = torch.where((grid.max(dim=1).values > 0.7)[:, None], grid, searched)
    return (p[:, 1] > 0.7).numpy(), (p[:, 0] > 0.7).numpy()


def allowed(row):
    """The rule's bar: at most 10% of each classifier's attacks read "female"."""
    return max(row["attacks_read_female"].values()) <= 0.10


def main(out):
    toyworld.one_thread()
    two = referee.Referee()
    rng = np.random.default_rng(777)
    female = np.zeros(2000, dtype=bool)
    female[:1000] = True
    rng.shuffle(female)
    shapes = [toyworld.face_geometry(rng, f) for f in female]  # draw_face's draws
    faces = two.through_vae(torch.stack([toyworld.to_tensor(toyworld.render_face(g)) for g in shapes]))
    drawn, _ = toyworld.make_faces(100, 0.0, seed=31)
    sets = {"faces": readings(two, faces)}
    true = [{**g, "length": g.get("length") or 1.625 * g["r"]} for g in shapes]  # short faces: a mean length
    for name in ("classifier", toyworld.INDEPENDENT, "hardened"):
        attacked = toyworld.latent_attack(test_referee.differentiable(os.path.join(toyworld.SHIPPED, name)), two.vae,
                                          drawn, target=0)
        sets[name] = readings(two, attacked)
    rows = []
    for short, long, fit_rms, legible in itertools.product(BANDS["short"], BANDS["long"], FIT_RMS, LEGIBLE):
        is_long, is_short = labels(sets["faces"], short, long, fit_rms, legible)
        attacks = {n: float(labels(f, short, long, fit_rms, legible)[0].mean())
                   for n, f in sets.items() if n != "faces"}
        rows.append(dict(short=short, long=long, fit_rms=fit_rms, legible=legible,
                         female_right=float(is_long[female].mean()), male_right=float(is_short[~female].mean()),
                         attacks_read_female=attacks))
    chosen = max(filter(allowed, rows), key=lambda r: min(r["female_right"], r["male_right"]))
    numbers = (chosen[k] for k in ("short", "long", "fit_rms", "legible"))
    is_long, is_short = labels(readings(two, faces, true), *numbers)
    true_geometry = dict(female_right=float(is_long[female].mean()), male_right=float(is_short[~female].mean()))
    print(json.dumps({"chosen": chosen, "true_geometry": true_geometry}, indent=2))
    with open(out, "w") as f:
        json.dump({"chosen": chosen, "true_geometry": true_geometry, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1])
