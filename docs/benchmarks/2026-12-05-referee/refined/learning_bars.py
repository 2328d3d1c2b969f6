"""The refined referee's readings behind tests/test_learning.py's bars: R_balance (and with --purify 300), R_shift and the
three-class world's runs and their lr-0
controls, on seeds 0-4, each read by the world's referee over its last 4 and last 2 epochs (the minority's share:
female, or tall in the three-class world). Writes OUT/learning_bars.json. From the repository's root:

    python docs/benchmarks/2026-12-05-referee/refined/learning_bars.py OUT
"""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.getcwd())
from tests import test_learning, toyworld  # noqa: E402

READ = {"balance-clip": "female", "balance-purify": "female", "shift-clip": "female", "control": "female", "three": "tall",
        "three-control": "tall"}  # run -> the class whose share the test reads


def one(out, name, seed):
    folder = os.path.join(out, f"{name}-seed{seed}")
    argv = test_learning.command(name, folder)
    argv[argv.index("--seed") + 1] = str(seed)
    subprocess.run([sys.executable, *argv], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    classes = tuple(toyworld.THREE) if READ[name] == "tall" else ("female", "male")
    found = {f"last{k}": test_learning.independent_share(metrics, READ[name], k, classes) for k in (4, 2)}
    read = [m["independent"] for m in metrics]
    found["last2_shares"] = toyworld.pooled_shares(read[-2:], classes, 2)[0][1]  # every class, by the referee
    found["none_last4"] = sum(m["n_none"] for m in read[-4:]) / sum(m["n_images"] for m in read[-4:])
    return found


def main(out):
    os.makedirs(out)
    jobs = [(name, seed) for name in READ for seed in range(5)]
    with ThreadPoolExecutor(2) as pool:
        found = list(pool.map(lambda job: one(out, *job), jobs))
    table = {name: {seed: found[jobs.index((name, seed))] for seed in range(5)} for name in READ}
    print(json.dumps(table, indent=2))
    with open(os.path.join(out, "learning_bars.json"), "w") as f:
        json.dump(table, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1])
