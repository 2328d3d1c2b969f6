"""One command that measures ddpo_debias.py on a GPU: speed, memory, precision and resume, within a time budget.

    python -m tests.benchmark OUT                 on a GPU machine: SD v1.5's architecture with random weights
    python -m tests.benchmark OUT --tiny          the tests' tiny models on the CPU (what the suite runs)
    python -m tests.benchmark OUT --only sdxl,sdxl-low-memory    SDXL's shapes (built in --sdxl-model), 1024 px
    python -m tests.benchmark OUT --only sd35-low-memory,sd35-auto    SD 3.5 medium's (in --sd35-model), 1024 px

It builds the SD v1.5 architecture with random weights (tests.random_sd15) in --model, or reuses it there, then
runs the real CLI with --profile in each configuration of CONFIGS, one after another, and a kill -9 of one run
followed by its --resume. Each configuration gets its weighted part of the time left (--budget seconds in all): at
its end the run gets SIGTERM, finishes its epoch and saves (docs/reliability.md), and after a grace period
SIGKILL; what it logged is kept either way. Into OUT, so that few files come back from a lent machine:

    summary.json    the GPU, torch/diffusers/transformers versions, and per configuration: epochs done (and updated), exit
                    code, seconds per epoch split into sampling, reward and update (epochs after the first), TFLOP/s,
                    peak GB, and the first (on-policy) update's rms of log r and clip fraction (precision alone can
                    clip at ε = 1e-4: DDPO's r is 1 there in exact arithmetic)
    runs.tar.gz     each run's metrics.jsonl, config.json and plot.png untouched, and its stdout and stderr

The images are noise, so the rewards and the female ratio mean nothing here: use it for speed and memory only.
"""
import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `tests.` from any folder
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, flags, epochs, weight). The defaults are the README's command: 16 images, 50 steps, CFG 5.0, auto
# precision. --kl-base adds one no-grad forward of the base weights per trained micro-step: its cost on SD's shapes.
# A configuration gets the time left in proportion to its weight: --compile's first epoch compiles two
# graphs. fp16 comes last so that it takes the time the others leave: its GradScaler needs epochs to act (20 asked).
# --train-batch-size auto stacks as many (image, step) pairs per UNet call as the free memory holds; --old-log-probs
# sampler is DDPO's π_old, whose on-policy clip fraction shows what the default (update, under bf16) removes.
CONFIGS = [("defaults", [], 3, 1.0), ("compile", ["--compile"], 3, 1.8), ("low-memory", ["--low-memory"], 3, 1.0),
           ("auto", ["--train-batch-size", "auto"], 3, 1.0),
           ("auto-compile", ["--train-batch-size", "auto", "--compile"], 3, 2.0),
           ("old-log-probs-sampler", ["--old-log-probs", "sampler"], 3, 1.0), ("kl-base", ["--kl-base", "0.01"], 3, 1.0),
           ("resume", ["--save-every", "1"], 3, 1.2),
           ("fp16", ["--mixed-precision", "fp16"], 20, 1.0),
           # SDXL (--sdxl-model: its shapes with random weights, 1024 px): T = 10 so that an epoch takes about half a
           # minute on an H200; its sampling and update scale with T (docs/speed-and-memory.md extrapolates to 50)
           ("sdxl", ["--num-steps", "10"], 3, 1.5), ("sdxl-low-memory", ["--num-steps", "10", "--low-memory"], 3, 1.5),
           ("sdxl-auto", ["--num-steps", "10", "--train-batch-size", "auto"], 3, 1.5),
           # SD 3.5 medium's shapes (--sd35-model, no T5), through Flow-GRPO's SDE step; T = 10 as SDXL's
           ("sd35-low-memory", ["--num-steps", "10", "--low-memory"], 3, 1.5),
           ("sd35-auto", ["--num-steps", "10", "--train-batch-size", "auto"], 3, 1.5)]
SDXL = ("sdxl", "sdxl-low-memory", "sdxl-auto")
SD35 = ("sd35-low-memory", "sd35-auto")  # the configurations run on the SD 3.5 pipeline
TINY = ["--batch-size", "4", "--num-steps", "4", "--mixed-precision", "no"]  # --tiny: before each config's flags
GRACE = 60  # seconds after SIGTERM for the run to finish its epoch and save, before SIGKILL
PACKED = ("metrics.jsonl", "config.json", "plot.png")  # of each run folder, into runs.tar.gz


def build_model(path, tiny, family=""):
    """The pipeline folder and its classifier, built once: SD v1.5's (or `family` sdxl's or sd35's) shapes with random
    weights, or the tiny ones."""
    if os.path.exists(os.path.join(path, "model_index.json")):
        return "reused"
    from tests import random_sd15
    random_sd15.main([path] + (["--tiny"] if tiny else []) + ([f"--{family}"] if family else []))
    return "built"


LIVE = []  # the run now going, if any: stopped with the benchmark (Ctrl-C, SIGTERM), so no run outlives it


def start(args, log_dir, name):
    """The CLI in its own process group, its stdout and stderr to files."""
    out, err = (open(os.path.join(log_dir, f"{name}.{kind}.txt"), "w") for kind in ("stdout", "stderr"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the models are local: never wait on a hub
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "ddpo_debias.py"), *args], cwd=ROOT, env=env,
                            stdout=out, stderr=err, start_new_session=True)
    LIVE[:] = [proc]
    return proc


def finish(proc, deadline):
    """Wait for the run until `deadline`; then SIGTERM (it finishes its epoch and saves), then SIGKILL after GRACE.
    -> (exit code, how it ended: 'finished', 'budget' or 'killed')."""
    try:
        return proc.wait(timeout=max(0.0, deadline - time.time())), "finished"
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=GRACE), "budget"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait(), "killed"


def read_metrics(folder):
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarise(metrics):
    """Per-epoch means over the epochs after the first (compilation and warm-up), the peak memory, and the first
    epoch's on-policy update (the precision check)."""
    later = metrics[1:]
    mean = lambda key: (lambda xs: sum(xs) / len(xs) if xs else None)([m[key] for m in later if m.get(key) is not None])
    peaks = [m["peak_memory_gb"] for m in metrics if m.get("peak_memory_gb") is not None]
    return {"epochs_done": len(metrics), "epoch_seconds": mean("epoch_seconds"),
            **{key: mean(key) for key in ("sample_seconds", "reward_seconds", "train_seconds", "sample_tflops",
                                          "train_tflops")},
            "first_epoch_seconds": metrics[0]["epoch_seconds"] if metrics else None,
            "peak_memory_gb": max(peaks) if peaks else None,
            "onpolicy_log_ratio_rms": [m.get("onpolicy_log_ratio_rms") for m in metrics[:3]],
            "onpolicy_clipfrac": [m.get("onpolicy_clipfrac") for m in metrics[:3]],
            "sampler_log_ratio_rms": [m.get("sampler_log_ratio_rms") for m in metrics[:3]],  # the rounding avoided
            "skipped_steps": sum(m["skipped_steps"] for m in metrics),
            "updated_epochs": sum(m.get("loss") is not None for m in metrics)}  # epochs whose update ran


def run_config(name, flags, epochs, base, runs, deadline):
    """One configuration (the resume one: killed after its first checkpoint, then --resume) -> its summary row."""
    folder, began = os.path.join(runs, name), time.time()
    args = [*base, *flags, "--epochs", str(epochs), "--output-dir", folder]
    proc = start(args, runs, name)
    row = {"flags": flags, "epochs_asked": epochs}
    if name == "resume":  # kill -9 once the first checkpoint is on disk, then continue it
        checkpoint = os.path.join(folder, "checkpoint.pt")
        while proc.poll() is None and not os.path.exists(checkpoint) and time.time() < deadline:
            time.sleep(0.2)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        row["killed_after_epochs"] = len(read_metrics(folder))
        proc.wait()
        proc = start(["--resume", folder], runs, f"{name}-resumed")
    row["returncode"], row["ended"] = finish(proc, deadline)
    row["wall_seconds"] = time.time() - began
    metrics = read_metrics(folder)
    for m in metrics:  # the whole epoch, as the phases add up
        m["epoch_seconds"] = m["sample_seconds"] + m["reward_seconds"] + m["train_seconds"]
    row.update(summarise(metrics))
    if os.path.exists(os.path.join(folder, "config.json")):
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
        row.update(clip_range=config["clip_range"], mixed_precision=config["mixed_precision"],
                   device=config["device"], train_batch_size=config["train_batch_size"],
                   old_log_probs=config["old_log_probs"])
    return row


def environment():
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    for package in ("diffusers", "transformers"):
        try:
            info[package] = __import__(package).__version__
        except ImportError as error:
            info[package] = f"not importable ({error})"
    return info


def pack(runs, path):
    """runs.tar.gz: each run folder's PACKED files and every log, a few MB at most (no checkpoints, no UNets)."""
    with tarfile.open(path, "w:gz") as tar:
        for name in sorted(os.listdir(runs)):
            full = os.path.join(runs, name)
            if os.path.isdir(full):
                for file in PACKED:
                    if os.path.exists(os.path.join(full, file)):
                        tar.add(os.path.join(full, file), arcname=os.path.join("runs", name, file))
            else:
                tar.add(full, arcname=os.path.join("runs", name))


def stop(name, out):
    """Ctrl-C or SIGTERM: the run going is killed with its process group; what was written stays in OUT."""
    for proc in LIVE:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    sys.exit(f"stopped by {name}; what was measured so far is in {out} (summary.json, runs/)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="a new folder for summary.json and runs.tar.gz")
    parser.add_argument("--model", help="the random pipeline folder, built if missing (default: OUT/model, removed "
                                        "at the end; 4.3 GB for SD 1.5's shapes)")
    parser.add_argument("--sdxl-model", help="the random SDXL pipeline folder for the sdxl configurations, built if "
                                             "missing (default: OUT/sdxl-model, removed at the end; 6.8 GB)")
    parser.add_argument("--sd35-model", help="the random SD 3.5 medium pipeline folder (no T5) for the sd35 "
                                             "configurations, built if missing (default: OUT/sd35-model, removed at "
                                             "the end; 7 GB)")
    parser.add_argument("--budget", type=float, default=420, help="seconds for all runs together (default 420)")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny models and a small batch, for the CPU")
    parser.add_argument("--only", help="comma-separated configuration names (default: all of CONFIGS)")
    parser.add_argument("--epochs", type=int, help="epochs for every configuration instead of CONFIGS' own")
    args = parser.parse_args(argv)
    names = [c[0] for c in CONFIGS]
    chosen = args.only.split(",") if args.only else names
    if set(chosen) - set(names):
        parser.error(f"--only: unknown configuration(s) {', '.join(sorted(set(chosen) - set(names)))}; "
                     f"known: {', '.join(names)}")
    if os.path.exists(args.out) and os.listdir(args.out):
        parser.error(f"out: {args.out} is not empty; give a new folder")
    import torch
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no GPU here (torch.cuda.is_available() is False): the full-size models need one (SD 1.5's "
                     "shapes take 4.3 GB on disk and about 15 GB of memory on the CPU); --tiny runs the tiny models")
    for sig in (signal.SIGINT, signal.SIGTERM):  # stop the run going with us, keep what is written, one line
        signal.signal(sig, lambda signum, frame: stop(signal.Signals(signum).name, args.out))
    began = time.time()
    deadline = began + args.budget
    model = args.model or os.path.join(args.out, "model")
    runs = os.path.join(args.out, "runs")
    os.makedirs(runs)
    todo = [c for c in CONFIGS if c[0] in chosen]
    summary = {"environment": environment(), "model": model, "budget_seconds": args.budget, "configurations": {}}
    if any(c[0] not in SDXL + SD35 for c in todo):
        summary["model_was"] = build_model(model, args.tiny)
    folders = {"sdxl": args.sdxl_model or os.path.join(args.out, "sdxl-model"),
               "sd35": args.sd35_model or os.path.join(args.out, "sd35-model")}
    for family, names in (("sdxl", SDXL), ("sd35", SD35)):
        if any(c[0] in names for c in todo):
            began_family = time.time()
            summary.update({f"{family}_model": folders[family],
                            f"{family}_model_was": build_model(folders[family], args.tiny, family),
                            f"{family}_build_seconds": time.time() - began_family})
    summary["build_seconds"] = time.time() - began
    # --reward shift: the images are noise, which a random classifier puts under none of its labels at 0.7, so
    # R_balance would be 0 for all and the update skipped (equal rewards); P(female) differs image to image, so every
    # update runs, at the same cost as R_balance's.
    base = lambda folder: ["--model", folder, "--classifier", os.path.join(folder, "classifier"), "--reward", "shift",
                           "--profile", *(TINY if args.tiny else [])]
    for i, (name, flags, epochs, weight) in enumerate(todo):
        share = (deadline - time.time()) * weight / sum(c[3] for c in todo[i:])  # its part of what is left
        print(f"{name}: up to {share:.0f} s", flush=True)
        folder = folders["sdxl"] if name in SDXL else folders["sd35"] if name in SD35 else model
        row = run_config(name, flags, args.epochs or epochs, base(folder), runs, time.time() + share)
        summary["configurations"][name] = row
        print(f"  {row['ended']}, exit {row['returncode']}, {row['epochs_done']} epochs, "
              f"{row['epoch_seconds'] or 0:.1f} s/epoch after the first, peak {row['peak_memory_gb']} GB", flush=True)
        with open(os.path.join(args.out, "summary.json"), "w") as f:  # after every configuration: a kill keeps it
            json.dump(summary, f, indent=2)
        for large in ("checkpoint.pt", "unet", "unet.tmp"):  # SDXL's are 11 and 10 GB: free the disk as we go
            path = os.path.join(runs, name, large)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    summary["total_seconds"] = time.time() - began
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    pack(runs, os.path.join(args.out, "runs.tar.gz"))
    shutil.rmtree(runs)  # checkpoints and UNets (GBs on SD): only the packed files come back
    for folder, given in ((model, args.model), (folders["sdxl"], args.sdxl_model), (folders["sd35"], args.sd35_model)):
        if not given and os.path.isdir(folder):  # the models it built into OUT: GBs, and random
            shutil.rmtree(folder)
    print(f"wrote {args.out}/summary.json and {args.out}/runs.tar.gz in {summary['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
