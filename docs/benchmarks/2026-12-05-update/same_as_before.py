"""The same runs on two revisions of the project, compared bit for bit: metrics.jsonl (timings left out) and the saved
UNet's weights. It shows that a change meant to change nothing changed nothing.

    python docs/benchmarks/2026-12-05-update/same_as_before.py BASE_REVISION OUT.json

Runs, each at one thread, through the CLI of the working tree and of BASE_REVISION (a git worktree in a temporary
folder, removed at the end): the toy world at the demo's settings for 3 epochs; the tiny SD, SD 2 (v-prediction)
and SDXL for 2 epochs with R_shift and --kl-base 0.1; the tiny SDXL in fp16 with Truly PPO.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, ROOT)


def models(folder):
    """The tiny pipelines and classifier, built once into `folder`."""
    from tests.fixtures import make_tiny_classifier, make_tiny_sd, make_tiny_sdxl
    make_tiny_sd(os.path.join(folder, "sd")), make_tiny_sdxl(os.path.join(folder, "sdxl"))
    shutil.copytree(os.path.join(folder, "sd"), os.path.join(folder, "sd2"))
    path = os.path.join(folder, "sd2", "scheduler", "scheduler_config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump({**config, "prediction_type": "v_prediction"}, f)
    make_tiny_classifier(os.path.join(folder, "classifier"))


def runs(folder):
    world = os.path.join(ROOT, "tests", "toyworld_model")
    tiny = lambda model: ["--model", os.path.join(folder, model), "--classifier", os.path.join(folder, "classifier"),
                          "--batch-size", "8", "--num-steps", "4", "--epochs", "2", "--reward", "shift"]
    return {"toy-world": ["--model", world, "--classifier", os.path.join(world, "classifier"), "--batch-size", "64",
                          "--num-steps", "5", "--updates-per-epoch", "4", "--train-batch-size", "16", "--lr", "5e-4",
                          "--mixed-precision", "no", "--epochs", "3"],
            **{model: tiny(model) + ["--mixed-precision", "no", "--kl-base", "0.1"] for model in ("sd", "sd2", "sdxl")},
            "sdxl-fp16-truly": tiny("sdxl") + ["--mixed-precision", "fp16", "--trust-region", "truly"]}


def compare(a, b):
    import torch
    from safetensors.torch import load_file
    drop = lambda rows: [{k: v for k, v in r.items() if "seconds" not in k and k not in
                          ("images_per_second", "sampler_log_ratio_rms")} for r in rows]  # timings; a new metric
    read = lambda d: drop([json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))])
    weights = [load_file(os.path.join(d, "unet", "diffusion_pytorch_model.safetensors")) for d in (a, b)]
    return {"metrics_equal": read(a) == read(b), "weights_equal": weights[0].keys() == weights[1].keys() and all(
        torch.equal(weights[0][k], weights[1][k]) for k in weights[0])}


def main(argv=None):
    base, out = (argv or sys.argv[1:])[:2]
    results = {"base": base, "head": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                                   text=True).stdout.strip(), "runs": {}}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        old = os.path.join(tmp, "base")
        subprocess.run(["git", "worktree", "add", "--detach", old, base], cwd=ROOT, check=True, capture_output=True)
        try:
            models(tmp)
            for name, flags in runs(tmp).items():
                folders = []
                for code in (old, ROOT):
                    folder = os.path.join(tmp, f"{name}-{len(folders)}")
                    done = subprocess.run([sys.executable, os.path.join(code, "ddpo_debias.py"), *flags,
                                           "--output-dir", folder], cwd=code, env=env, capture_output=True, text=True)
                    if done.returncode:
                        sys.exit(f"{name} failed on {code}: {done.stderr.strip().splitlines()[-1]}")
                    folders.append(folder)
                results["runs"][name] = compare(*folders)
                print(name, results["runs"][name], flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", old], cwd=ROOT, capture_output=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    return 0 if all(all(r.values()) for r in results["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
