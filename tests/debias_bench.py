"""Time to debias: how many epochs and seconds R_balance takes to balance the toy world, per configuration.

    python -m tests.debias_bench OUT [--configs today,ddpo,...] [--seeds 0,1,2,3,4] [--epochs 16] [--jobs 2]

Each configuration is the toy world's run at toyworld.SETTINGS with --reward balance and some flags changed
(CONFIGS), run through the real CLI on every seed, `--jobs` runs side by side with one thread each. Every epoch's
images are also read by the world's referee (tests/referee.py, --independent-classifier tests.referee:Referee),
which no reward uses. For each run: the epoch at which q, pooled over 2 epochs (128 images), first comes within
0.1 of 0.5 and then stays within 0.2 to the end of the run (balanced_at), by the reward's classifier and by the
referee, the seconds of training until then (the epochs' sampling, reward and update seconds, loading left out),
the worst none-rate of any epoch, the seconds per epoch by phase; then the final UNet's 512 fresh samples read
by the referee (q, none, the mean background colour against the base model's: a nuisance the class does not
depend on). Per configuration: the medians over the seeds, and how many seeds balanced within the run. Writes
OUT/bench.json, a table (printed and OUT/bench.txt), and keeps every run's metrics.jsonl, config.json and
referee.json in OUT/runs/.
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `tests.` from any folder
from tests import toyworld  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIT, RESNET = (os.path.join(toyworld.SHIPPED, name) for name in ("classifier", toyworld.INDEPENDENT))
HARDENED = os.path.join(toyworld.SHIPPED, "hardened")  # the reward's ViT hardened (toyworld independent --hardened)
ENSEMBLE = [f"--classifier={VIT},{RESNET}", "--ensemble=min"]  # both shipped classifiers, each must agree
FAST = ["--advantage-scale=0.1", "--lr=1e-3", "--batch-size=32", "--train-batch-size=8"]
# name -> flags changed from toyworld.SETTINGS (R_balance, 16 epochs unless --epochs)
CONFIGS = {
    "today": [],
    "ddpo": ["--skip-final-steps=0"],  # DDPO's scheme: every step trained
    "half-steps": ["--train-fraction=0.5"],  # 2 of the 3 trained steps of each image at T = 5, at random (DDPO's)
    "fixed-scale": ["--advantage-scale=0.1"],  # R_balance's rewards divided by a fixed 0.1, not the batch's std
    "fixed-scale-lr1e-3": ["--advantage-scale=0.1", "--lr=1e-3"],
    "two-updates": ["--updates-per-epoch=2", "--train-batch-size=32", "--lr=1e-3"],
    "batch-32": ["--batch-size=32", "--train-batch-size=8"],  # half the images an epoch, 4 updates of 8
    "fixed-scale-lr2e-3": ["--advantage-scale=0.1", "--lr=2e-3"],
    "fixed-scale-lr1e-3-batch-32": ["--advantage-scale=0.1", "--lr=1e-3", "--batch-size=32", "--train-batch-size=8"],
    "fixed-scale-lr1e-3-half-steps": ["--advantage-scale=0.1", "--lr=1e-3", "--train-fraction=0.5"],
    "fixed-scale-0.15-lr1e-3-batch-32": ["--advantage-scale=0.15", "--lr=1e-3", "--batch-size=32",
                                         "--train-batch-size=8"],
    "fixed-scale-lr7e-4-batch-32": ["--advantage-scale=0.1", "--lr=7e-4", "--batch-size=32", "--train-batch-size=8"],
    "kl-base-0.01": ["--kl-base=0.01"],  # DPOK's anchor to the pre-trained model, β swept (at 1, q never moved)
    "kl-base-0.03": ["--kl-base=0.03"],
    "kl-base-0.1": ["--kl-base=0.1"],
    "kl-base-1": ["--kl-base=1"],
    "augment": ["--augment"],  # the reward's classifier read through 5 views of each image
    "threshold-0.9": ["--threshold=0.9"],  # a stricter label
    "fast-kl-base-0.01": ["--advantage-scale=0.1", "--lr=1e-3", "--batch-size=32", "--train-batch-size=8",
                          "--kl-base=0.01"],  # the fast combination, anchored, β swept
    "fast-kl-base-0.03": ["--advantage-scale=0.1", "--lr=1e-3", "--batch-size=32", "--train-batch-size=8",
                          "--kl-base=0.03"],
    "fast-kl-base-0.1": ["--advantage-scale=0.1", "--lr=1e-3", "--batch-size=32", "--train-batch-size=8",
                         "--kl-base=0.1"],
    # a reward that is hard to fool (docs/benchmarks.md, "Debiased, not fooled")
    "hardened": [f"--classifier={HARDENED}"],
    "ensemble": ENSEMBLE,
    "ensemble-product": [f"--classifier={VIT},{RESNET}", "--ensemble=product"],
    "hardened-kl-base-0.01": [f"--classifier={HARDENED}", "--kl-base=0.01"],
    "ensemble-kl-base-0.01": ENSEMBLE + ["--kl-base=0.01"],
    "hardened-ensemble": [f"--classifier={HARDENED},{RESNET}", "--ensemble=min"],
    "fast-ensemble": FAST + ENSEMBLE,
    "fast-ensemble-kl-base-0.01": FAST + ENSEMBLE + ["--kl-base=0.01"],
    "fast-hardened": FAST + [f"--classifier={HARDENED}"],
    # the update's shapes (docs/speed-and-memory.md): 16 images x their 3 trained steps in one UNet call, and the
    # exact π_old from the update's own forward (the default under bf16 and on a GPU)
    "stacked": ["--train-batch-size=48"],
    "old-log-probs-update": ["--old-log-probs=update"],
    "fast-hardened-kl-base-0.01": FAST + [f"--classifier={HARDENED}", "--kl-base=0.01"],
    "soft-balance": ["--reward=soft_balance"],  # eq. 2-3 on P(female): a label's threshold is no longer the target
    "soft-balance-ensemble": ["--reward=soft_balance"] + ENSEMBLE,
    # the reward reads each image as the base model redraws it from step T (--purify, DiffPure)
    "purify-200": ["--purify=200"],
    "purify-300": ["--purify=300"],
    "purify-400": ["--purify=400"],
    "purify-300-lr1e-3": ["--purify=300", "--lr=1e-3"],
    "purify-300-kl-base-0.01": ["--purify=300", "--kl-base=0.01"],
    "purify-300-soft-balance": ["--purify=300", "--reward=soft_balance"],
}
REFEREE = toyworld.REFEREE  # the world's referee reads every epoch (--independent-classifier)
FRESH = 512  # the final UNet's samples read by the referee
WITHIN, STAYS = 0.1, 0.2  # the balance test of tests/test_learning.py, on 2-epoch windows


def balanced_at(metrics, within=WITHIN, stays=STAYS, by=None):
    """The epoch at whose end q pooled over it and the epoch before first comes within `within` of 0.5 and stays
    within `stays` for every later such window; None if it never does. by="independent": q read by the world's
    second classifier (metrics' "independent", --independent-classifier), which never gave a reward."""
    counts = [m[by] if by else m for m in metrics]
    pooled = []
    for e in range(1, len(metrics)):
        f = counts[e - 1]["n_female"] + counts[e]["n_female"]
        m = counts[e - 1]["n_male"] + counts[e]["n_male"]
        pooled.append((e, f / (f + m) if f + m else None))
    for i, (e, q) in enumerate(pooled):
        if q is not None and abs(q - 0.5) <= within and all(
                later is not None and abs(later - 0.5) <= stays for _, later in pooled[i + 1:]):
            return e
    return None


def summarise(metrics, fresh=None, base=None):
    """One run's row: balanced_at by the reward's classifier and by the referee (metrics' "independent"), seconds of
    training until then, none-rates, seconds per epoch by phase; with fresh (the referee's reading of the final
    UNet's FRESH samples) and base (the same of the base UNet): the final q, none and the background's drift."""
    refereed = "independent" in metrics[0]  # the referee's reading of every epoch (--independent-classifier)
    at, by_referee = balanced_at(metrics), balanced_at(metrics, by="independent") if refereed else None
    seconds = lambda m: m["sample_seconds"] + m["reward_seconds"] + m["train_seconds"]
    mean = lambda key: statistics.fmean(m[key] for m in metrics)
    images = lambda m: m["n_female"] + m["n_male"] + m["n_none"]
    pooled = lambda ms: [(a["n_none"] + b["n_none"]) / (images(a) + images(b)) for a, b in zip(ms, ms[1:])]
    read = [m["independent"] for m in metrics] if refereed else None
    row = {"balanced_at": at, "seconds_to_balance": None if at is None else sum(map(seconds, metrics[:at + 1])),
           "referee_balanced_at": by_referee,
           "referee_seconds_to_balance": None if by_referee is None else sum(map(seconds, metrics[:by_referee + 1])),
           "worst_pooled_none_rate": max(pooled(metrics)),  # by the reward's reading (its --threshold, --augment)
           # the faces, read the same way for every configuration
           "referee_worst_pooled_none_rate": max(pooled(read)) if read else None,
           "referee_none_last_4": sum(m["n_none"] for m in read[-4:]) / sum(map(images, read[-4:])) if read else None,
           "worst_none_rate": max(m["n_none"] / images(m) for m in metrics),
           "final_q": metrics[-1]["female_ratio"], "sample_seconds": mean("sample_seconds"),
           "reward_seconds": mean("reward_seconds"), "train_seconds": mean("train_seconds")}
    if fresh:
        labelled = fresh["female"] + fresh["male"]
        row.update(referee_final_q=fresh["female"] / labelled if labelled else None, referee_final_none=fresh["none"],
                   background_drift=max(abs(a - b) for a, b in zip(fresh["background"], base["background"])))
    return row


def run(out, name, seed, epochs):
    """Start a run's training (the referee reads every epoch): -> its folder and process."""
    folder = os.path.join(out, "runs", f"{name}-seed{seed}")
    flags = toyworld.cli_flags() + ["--reward=balance", f"--epochs={epochs}", f"--seed={seed}",
                                    f"--output-dir={folder}", "--save-every=1000",
                                    f"--independent-classifier={REFEREE}"] + CONFIGS[name]
    return folder, child([os.path.join(ROOT, "ddpo_debias.py"), *flags], folder + ".log")


def read_fresh(unet, out_json, seed, log, images=FRESH):
    """Start the referee's reading of `images` new samples of a UNet (tests.referee) into out_json: -> its process."""
    return child(["-m", "tests.referee", unet, f"--images={images}", f"--seed={seed}", f"--out={out_json}"], log, "a")


def child(args, log_path, mode="w"):
    """python ARGS at one thread, offline, its output into log_path."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(log_path, mode) as log:
        return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def evaluate(out, name, unet=None):
    """--evaluate of the world on its prompt, 64 images at SETTINGS' steps and guidance, CLIP-I by the world's ViT
    encoder (as docs/quality/toyworld.sh): the base model's (unet None) into OUT/eval/base, or a run's against it."""
    world, folder = toyworld.SHIPPED, os.path.join(out, "eval")
    prompt = os.path.join(folder, "prompt.txt")
    if not os.path.exists(prompt):
        os.makedirs(folder, exist_ok=True)
        with open(prompt, "w") as f:
            f.write(toyworld.PROMPT + "\n")
    flags = ["--evaluate", f"--model={world}", f"--classifier={os.path.join(world, 'classifier')}",
             f"--clip-model={os.path.join(world, 'classifier')}", f"--eval-prompts={prompt}", "--eval-images=64",
             f"--num-steps={toyworld.SETTINGS['num_steps']}", f"--guidance-scale={toyworld.SETTINGS['guidance_scale']}",
             "--mixed-precision=no", "--device=cpu", f"--output-dir={os.path.join(folder, name)}"]
    if unet:
        flags += [f"--unet={unet}", f"--compare={os.path.join(folder, 'base', 'eval.json')}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "ddpo_debias.py"), *flags], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def clip_i(out, folders, jobs):
    """CLIP-I of each run's final UNet against the base model: {run folder name: mean CLIP-I}."""
    if not os.path.exists(os.path.join(out, "eval", "base", "eval.json")) and evaluate(out, "base").wait():
        sys.exit("the base model's evaluation failed")
    todo, running, found = list(folders), [], {}
    while todo or running:
        while todo and len(running) < jobs:
            folder = todo.pop(0)
            name = os.path.basename(folder)
            running.append((name, evaluate(out, name, os.path.join(folder, "unet"))))
        time.sleep(0.3)
        for name, proc in [r for r in running if r[1].poll() is not None]:
            running.remove((name, proc))
            with open(os.path.join(out, "eval", name, "eval.json")) as f:
                found[name] = json.load(f)["overall"]["mean_clip_i"]
    return found


def table(results, epochs):
    rows = [f"{'configuration':28s} {'balanced':>8s} {'epochs':>6s} {'seconds':>7s} {'referee':>7s} {'seconds':>7s} "
            f"{'q end':>5s} {'referee':>7s} {'none 2ep':>8s} {'last 4':>6s} {'drift':>5s} {'CLIP-I':>6s} "
            f"{'s/epoch: sample reward update':>30s}"]
    fmt = lambda v, f: "-" if v is None else format(v, f)
    for name, r in results.items():
        rows.append(f"{name:28s} {r['balanced']:>8s} {fmt(r['median_epochs'], '>6'):>6s} "
                    f"{fmt(r['median_seconds'], '>7.1f'):>7s} {r['referee_balanced']:>7s} "
                    f"{fmt(r['referee_median_seconds'], '>7.1f'):>7s} {r['median_final_q']:>5.2f} "
                    f"{fmt(r.get('referee_median_final_q'), '>7.2f'):>7s} {r['referee_worst_pooled_none_rate']:>8.0%} "
                    f"{r['referee_median_none_last_4']:>6.0%} {fmt(r.get('worst_background_drift'), '>5.2f'):>5s} "
                    f"{fmt(r.get('median_clip_i'), '>6.2f'):>6s} "
                    f"{r['sample_seconds']:>15.2f} {r['reward_seconds']:>6.2f} {r['train_seconds']:>6.2f}")
    return "\n".join(rows + [f"(balanced: seeds whose q, pooled over 2 epochs, came within {WITHIN} of 0.5 and stayed "
                             f"within {STAYS}, in {epochs} epochs, read by the reward's classifier, then by the referee; "
                             "epochs and seconds are medians, counting a seed that never balanced as "
                             f"{epochs} epochs and its whole training time; q end: the last epoch's median, then the "
                             f"referee's median over the final UNet's {FRESH} fresh samples; none 2ep: the referee's "
                             "worst none-rate pooled over 2 epochs, any seed; last 4: its median none-rate over the last "
                             "4 epochs; drift: the largest change of the mean background colour (per channel, 0-1) "
                             "from the base's, any seed; CLIP-I: the final model's against the base's, with --clip-i)"])


def summary(name, rows, epochs, base):
    """A configuration's medians over its seeds, and the goal's counts (docs/benchmarks.md)."""
    whole = lambda r: sum(r[k] for k in ("sample_seconds", "reward_seconds", "train_seconds")) * epochs
    finals = [r["referee_final_q"] for r in rows if r.get("referee_final_q") is not None]
    return {
        "flags": CONFIGS[name],
        "balanced": f"{sum(r['balanced_at'] is not None for r in rows)}/{len(rows)}",
        "median_epochs": statistics.median(epochs if r["balanced_at"] is None else r["balanced_at"] for r in rows),
        "median_seconds": statistics.median(whole(r) if r["seconds_to_balance"] is None
                                            else r["seconds_to_balance"] for r in rows),
        "referee_balanced": f"{sum(r['referee_balanced_at'] is not None for r in rows)}/{len(rows)}",
        "referee_median_epochs": statistics.median(epochs if r["referee_balanced_at"] is None
                                                   else r["referee_balanced_at"] for r in rows),
        "referee_median_seconds": statistics.median(whole(r) if r["referee_seconds_to_balance"] is None
                                                    else r["referee_seconds_to_balance"] for r in rows),
        "worst_none_rate": max(r["worst_none_rate"] for r in rows),
        "worst_pooled_none_rate": max(r["worst_pooled_none_rate"] for r in rows),
        "referee_worst_pooled_none_rate": max(r["referee_worst_pooled_none_rate"] for r in rows),
        "referee_median_none_last_4": statistics.median(r["referee_none_last_4"] for r in rows),
        "median_final_q": statistics.median(r["final_q"] for r in rows if r["final_q"] is not None),
        **({"referee_median_final_q": statistics.median(finals),
            "referee_final_within_0.1": f"{sum(abs(q - 0.5) <= 0.1 for q in finals)}/{len(rows)}",
            "worst_background_drift": max(r["background_drift"] for r in rows)} if base else {}),
        **({"median_clip_i": statistics.median(r["clip_i"] for r in rows)} if "clip_i" in rows[0] else {}),
        **{k: statistics.fmean(r[k] for r in rows) for k in ("sample_seconds", "reward_seconds", "train_seconds")}}


def seed_list(text):
    """--seeds: "0,1,2" -> [0, 1, 2]; anything else is argparse's one-line error (exit 2)."""
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be integers, comma-separated, got {text!r}") from None
    if len(set(seeds)) < len(seeds):
        raise argparse.ArgumentTypeError(f"has a repeated seed: {text!r}")
    return seeds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="a new folder")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"of {', '.join(CONFIGS)}")
    parser.add_argument("--seeds", default="0,1,2,3,4", type=seed_list, help="comma-separated integers")
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side, one thread each")
    parser.add_argument("--clip-i", action="store_true", help="then CLIP-I of each run's final model against the "
                                                             "base model's (64 images each, about 7 s a run)")
    parser.add_argument("--fresh", type=int, default=FRESH, help=f"new samples of each final UNet (and of the base) "
                        f"the referee reads (default {FRESH})")
    parser.add_argument("--summarise", action="store_true", help="run nothing: summarise the finished runs already "
                        "in OUT/runs (of one benchmark or several copied together) into OUT/bench.json and bench.txt")
    args = parser.parse_args(argv)
    if args.summarise:
        return summarise_folder(args.out, args.epochs, args.clip_i, args.jobs)
    names, seeds = [n.strip() for n in args.configs.split(",")], args.seeds
    if args.epochs < 2 or args.jobs < 1 or args.fresh < 1:
        parser.error(f"--epochs: at least 2 (a window is 2 epochs), got {args.epochs}" if args.epochs < 2 else
                     f"--jobs: at least 1, got {args.jobs}" if args.jobs < 1 else f"--fresh: at least 1, got {args.fresh}")
    if set(names) - set(CONFIGS):
        parser.error(f"--configs: unknown {', '.join(sorted(set(names) - set(CONFIGS))) or 'empty name'}; known: "
                     f"{', '.join(CONFIGS)}")
    if len(set(names)) < len(names):
        parser.error(f"--configs: names a configuration twice: {args.configs!r}")
    if os.path.exists(args.out) and os.listdir(args.out):
        parser.error(f"out: {args.out} is not empty")
    os.makedirs(os.path.join(args.out, "runs"))
    running = []
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f"stopped by SIGTERM; the finished runs are in "
                                                                 f"{args.out}/runs (--summarise reads them)"))
    try:
        return bench(args, names, seeds, running)
    except KeyboardInterrupt:
        sys.exit(f"stopped by Ctrl-C; the finished runs are in {args.out}/runs (--summarise reads them)")
    finally:  # an error, Ctrl-C or SIGTERM: no run goes on without its parent
        for item in running:
            item[-1].kill()
            item[-1].wait()


def summarise_folder(out, epochs, clip=False, jobs=2):
    """bench.json and bench.txt from OUT/runs/NAME-seedK folders that finished (metrics.jsonl and referee.json) and
    OUT/base-referee.json; with clip, CLIP-I of each (OUT/eval/NAME-seedK/eval.json, evaluated where missing).
    Configurations in CONFIGS' order."""
    runs = os.path.join(out, "runs")
    found = {}
    for folder in sorted(os.listdir(runs)):
        name, _, seed = folder.rpartition("-seed")
        path = os.path.join(runs, folder)
        if name in CONFIGS and seed.isdigit() and os.path.exists(os.path.join(path, "referee.json")):
            found.setdefault(name, {})[int(seed)] = path
    if not found:
        sys.exit(f"out: {runs} holds no finished run")
    with open(os.path.join(out, "base-referee.json")) as f:
        base = json.load(f)
    scores = {}
    if clip:
        missing = [p for seeds in found.values() for p in seeds.values()
                   if not os.path.exists(os.path.join(out, "eval", os.path.basename(p), "eval.json"))]
        scores = clip_i(out, missing, jobs) if missing else {}
        for seeds in found.values():
            for p in seeds.values():
                with open(os.path.join(out, "eval", os.path.basename(p), "eval.json")) as f:
                    scores[os.path.basename(p)] = json.load(f)["overall"]["mean_clip_i"]
    results = {}
    for name in [n for n in CONFIGS if n in found]:
        rows = {}
        for seed, path in sorted(found[name].items()):
            with open(os.path.join(path, "metrics.jsonl")) as f, open(os.path.join(path, "referee.json")) as g:
                rows[seed] = summarise([json.loads(line) for line in f], json.load(g), base)
            if clip:
                rows[seed]["clip_i"] = scores[os.path.basename(path)]
        results[name] = {**summary(name, list(rows.values()), epochs, base), "seeds": rows}
    text = table(results, epochs)
    print(text)
    with open(os.path.join(out, "bench.txt"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump({"settings": toyworld.SETTINGS, "epochs": epochs, "base": base, "results": results}, f, indent=2)
    return 0


def bench(args, names, seeds, running):
    """Run every (configuration, seed): training, then the referee's reading of its final UNet; the base UNet's
    reading first. `running` holds the live processes, for main() to stop."""
    base_json = os.path.join(args.out, "base-referee.json")
    todo = [("base", None, "read")] + [(n, s, "train") for n in names for s in seeds]
    done, began = {}, time.time()
    while todo or running:
        while todo and len(running) < args.jobs and not (todo[0][0] != "base" and not os.path.exists(base_json)
                                                          and running and running[0][0] == "base"):
            name, seed, stage = todo.pop(0)
            if name == "base":
                proc = read_fresh(os.path.join(toyworld.SHIPPED, "unet"), base_json, 0, base_json + ".log", args.fresh)
                running.append((name, seed, stage, args.out, proc))
            else:
                running.append((name, seed, stage, *run(args.out, name, seed, args.epochs)))
        time.sleep(0.5)
        for item in [r for r in running if r[-1].poll() is not None]:
            running.remove(item)
            name, seed, stage, folder, proc = item
            if proc.returncode:
                sys.exit(f"{name} seed {seed} {stage} failed (exit {proc.returncode}): see {folder}.log")
            if stage == "train":  # then the referee reads its final UNet, in the same slot
                running.append((name, seed, "read", folder, read_fresh(folder, os.path.join(folder, "referee.json"),
                                                                       seed, folder + ".log", args.fresh)))
            elif name != "base":
                with open(os.path.join(folder, "metrics.jsonl")) as f, open(os.path.join(folder, "referee.json")) as g, \
                        open(base_json) as h:
                    done[name, seed] = summarise([json.loads(line) for line in f], json.load(g), json.load(h))
                print(f"{name} seed {seed}: balanced at epoch {done[name, seed]['balanced_at']}, by the referee at "
                      f"{done[name, seed]['referee_balanced_at']}", flush=True)
    if args.clip_i:
        scores = clip_i(args.out, [os.path.join(args.out, "runs", f"{n}-seed{s}") for n, s in done], args.jobs)
        for (name, seed), row in done.items():
            row["clip_i"] = scores[f"{name}-seed{seed}"]
    with open(base_json) as f:
        base = json.load(f)
    results = {name: {**summary(name, [done[name, s] for s in seeds], args.epochs, base),
                      "seeds": {s: done[name, s] for s in seeds}} for name in names}
    text = table(results, args.epochs)
    print(text)
    with open(os.path.join(args.out, "bench.txt"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump({"settings": toyworld.SETTINGS, "epochs": args.epochs, "seeds": seeds, "jobs": args.jobs,
                   "fresh": args.fresh, "base": base, "wall_seconds": time.time() - began, "results": results}, f,
                  indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
