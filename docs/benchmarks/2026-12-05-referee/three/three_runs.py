"""The three-class world with a reward that is harder to fool, on seeds 0-4, 16 epochs at toyworld.THREE_SETTINGS,
every epoch read by the world's referee: `hardened` rewards with the world's hardened ViT
(tests/toyworld_three/hardened) instead of its ViT, `purify-300` reads each image as the base model redraws it
from step 300 (--purify). Per seed: each class's share by the referee over the last 2 epochs (128 images) and the
referee's "none" over the last 4; the issue's goal asks every class within 0.1 of 1/3 on at least 4 of 5 seeds. The
same reading of the ViT-rewarded runs is ../learning_bars.json ("three"). From the repository's root:

    python docs/benchmarks/2026-12-05-referee/three/three_runs.py OUT hardened
    python docs/benchmarks/2026-12-05-referee/three/three_runs.py OUT purify-300

writes OUT/three-NAME.json and the runs' folders.
"""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.getcwd())
from tests import toyworld  # noqa: E402

RUNS = {"hardened": ["--classifier", os.path.join(toyworld.THREE_WORLD, "hardened")],
        "purify-300": ["--purify", "300"]}  # name -> flags of `python -m tests.toyworld three`


def one(out, name, seed):
    folder = os.path.join(out, f"three-{name}-seed{seed}")
    subprocess.run([sys.executable, "-m", "tests.toyworld", "three", folder, "--seed", str(seed), *RUNS[name]],
                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    classes = tuple(toyworld.THREE)
    read = [m["independent"] for m in metrics]
    last2 = toyworld.pooled_shares(read[-2:], classes, 2)[0][1]
    by_reward = toyworld.pooled_shares(metrics[-2:], classes, 2)[0][1]
    return {"last2_shares": last2, "within_0.1": all(abs(v - 1 / 3) <= 0.1 for v in last2.values()),
            "none_last4": sum(m["n_none"] for m in read[-4:]) / sum(m["n_images"] for m in read[-4:]),
            "last2_shares_by_reward": by_reward}


def main(out, name):
    if name not in RUNS:
        sys.exit(f"three_runs.py: error: NAME: one of {', '.join(RUNS)}, not {name!r}")
    os.makedirs(out, exist_ok=True)
    with ThreadPoolExecutor(2) as pool:
        found = dict(zip(range(5), pool.map(lambda seed: one(out, name, seed), range(5))))
    found["within_0.1_seeds"] = f"{sum(row['within_0.1'] for row in found.values())}/5"
    print(json.dumps(found, indent=2))
    with open(os.path.join(out, f"three-{name}.json"), "w") as f:
        json.dump(found, f, indent=2)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
