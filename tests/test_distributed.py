"""Several processes (torchrun), on the CPU with gloo: the ranks agree on q, U and the advantages, hold the same
weights, write one run folder; 2 ranks of B/2 images do what 1 process of B does; a killed rank stops the other
instead of hanging it, and --resume continues. tests/dist_worker.py runs the CLI and saves what each rank saw."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import torch
from PIL import Image

from tests.test_cli import ROOT, read_metrics, wait_for

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(dump, *flags, n=2):
    """The real launcher: `torchrun --nproc-per-node n -m tests.dist_worker DUMP FLAGS`."""
    os.makedirs(dump, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port",
               str(free_port()), "-m", "tests.dist_worker", str(dump), *map(str, flags)]
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def ranks_by_hand(logs, *flags, n=2):
    """The ranks as torchrun's environment describes them, started here, with no launcher to kill the survivors:
    whether a rank stops when its peer dies is then up to ddpo_debias.py alone. Rank r's stderr goes to logs/r."""
    port, logs = free_port(), [open(f"{logs}.{r}", "w") for r in range(n)]
    return [subprocess.Popen([sys.executable, os.path.join(ROOT, "ddpo_debias.py"), *map(str, flags)], cwd=ROOT,
                             env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(n),
                                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                             stdout=subprocess.DEVNULL, stderr=logs[r]) for r in range(n)]


def load(path):
    return torch.load(path, weights_only=False)


def test_two_ranks_agree_and_write_one_run_folder(tiny_sd, tiny_classifier, tmp_path):
    out = tmp_path / "run"
    result = torchrun(tmp_path / "dump", "--model", tiny_sd, "--classifier", tiny_classifier, "--epochs", "2",
                      "--batch-size", "8", "--num-steps", "3", "--mixed-precision", "no", "--reward", "shift",
                      "--lr", "1e-2", "--save-every", "1", "--output-dir", out)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = load(tmp_path / "dump" / "rank0.pt"), load(tmp_path / "dump" / "rank1.pt")
    timing = ("sample_seconds", "reward_seconds", "train_seconds", "images_per_second")
    strip = lambda ms: [{k: v for k, v in m.items() if k not in timing} for m in ms]
    assert strip(rank0["metrics"]) == strip(rank1["metrics"])  # q, U, counts, rewards, losses
    assert rank0["metrics"][0]["underrepresented"] in ("female", "male")
    assert rank0["advantages"] == rank1["advantages"] and len(rank0["advantages"][0]) == 8  # the whole epoch's
    assert all(torch.equal(rank0["weights"][k], rank1["weights"][k]) for k in rank0["weights"])
    assert strip(read_metrics(out)) == strip(rank0["metrics"])  # one metrics.jsonl, one line per epoch
    assert sorted(p.name for p in out.glob("samples_*.png")) == ["samples_0000.png", "samples_0001.png"]
    assert Image.open(out / "samples_0000.png").height == 16 + 2 * (128 + 14)  # all 8 images: 2 rows of 4
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").exists() and (out / "checkpoint.pt").exists()
    assert result.stdout.count("done:") == 1 and "x 2 ranks" in result.stdout


def test_two_ranks_of_half_the_images_equal_one_process(tiny_sd, tiny_classifier, tmp_path):
    """One epoch, one update: the same images (the noise rows), labels, q and advantages, and the same step."""
    from diffusers import UNet2DConditionModel
    flags = ["--model", tiny_sd, "--classifier", tiny_classifier, "--epochs", "1", "--batch-size", "4",
             "--num-steps", "3", "--mixed-precision", "no", "--reward", "shift", "--lr", "1e-3",
             "--updates-per-epoch", "1"]
    two = torchrun(tmp_path / "two", *flags, "--output-dir", tmp_path / "run2")
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "tests.dist_worker", str(tmp_path / "two"), *flags, "--output-dir",
                          str(tmp_path / "run1")], cwd=ROOT, env={**ENV, "RANK": "9"}, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]  # RANK=9 names its dump only: without WORLD_SIZE it runs alone
    ranks, alone = load(tmp_path / "two" / "rank0.pt"), load(tmp_path / "two" / "rank9.pt")
    for key in ("n_female", "n_male", "n_none", "female_ratio", "underrepresented"):
        assert ranks["metrics"][0][key] == alone["metrics"][0][key], key
    assert torch.allclose(torch.tensor(ranks["advantages"]), torch.tensor(alone["advantages"]), atol=1e-5)
    base = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").state_dict()
    step = lambda w: torch.cat([(w[k] - base[k]).flatten() for k in sorted(w)])  # the update's change of θ
    assert step(alone["weights"]).norm() > 1e-3  # it did move
    assert (step(ranks["weights"]) - step(alone["weights"])).norm() < 1e-3 * step(alone["weights"]).norm()


def test_a_killed_rank_stops_the_other_and_resume_continues(tiny_sd, tiny_classifier, tmp_path):
    out = tmp_path / "run"
    flags = ["--model", tiny_sd, "--classifier", tiny_classifier, "--batch-size", "4", "--num-steps", "3",
             "--mixed-precision", "no", "--lr", "1e-3", "--reward", "shift", "--save-every", "1"]
    log = tmp_path / "first"
    rank0, rank1 = ranks_by_hand(log, *flags, "--epochs", "500", "--output-dir", out)
    wait_for(lambda: (out / "checkpoint.pt").exists() or rank0.poll() is not None)
    assert rank0.poll() is None, open(f"{log}.0").read()[-3000:]
    rank1.send_signal(signal.SIGKILL)
    start = time.time()
    rank0.wait(timeout=120)  # not a hang: the dead peer's closed connection fails the next collective
    stderr = open(f"{log}.0").read()
    assert rank0.returncode == 1 and time.time() - start < 60, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "rank 0" in errors[0] and "--resume" in errors[0] and "Traceback" not in stderr
    rank1.wait()
    done = len(read_metrics(out))
    checkpoint_epoch = load(out / "checkpoint.pt")["epoch"]
    resumed = ranks_by_hand(tmp_path / "resumed", "--resume", out, "--epochs", checkpoint_epoch + 3)
    assert [r.wait(timeout=300) for r in resumed] == [0, 0], open(f"{tmp_path / 'resumed'}.0").read()[-3000:]
    assert [m["epoch"] for m in read_metrics(out)] == list(range(checkpoint_epoch + 3)) and done >= 1
    assert json.loads((out / "config.json").read_text())["epochs"] == checkpoint_epoch + 3


def test_sigterm_on_one_rank_stops_both_after_the_same_epoch(tiny_sd, tiny_classifier, tmp_path):
    """SIGTERM to rank 1 alone: both ranks finish that epoch, rank 0 saves the checkpoint, both exit with 143."""
    out = tmp_path / "run"
    ranks = ranks_by_hand(tmp_path / "log", "--model", tiny_sd, "--classifier", tiny_classifier, "--batch-size", "4",
                          "--num-steps", "3", "--mixed-precision", "no", "--epochs", "500", "--save-every", "1000",
                          "--output-dir", out)
    wait_for(lambda: (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size > 0)
    ranks[1].send_signal(signal.SIGTERM)
    assert [r.wait(timeout=120) for r in ranks] == [143, 143], open(f"{tmp_path / 'log'}.0").read()[-3000:]
    saved = load(out / "checkpoint.pt")  # only a signal saves before epoch 1000
    assert saved["epoch"] + 1 == len(read_metrics(out)) < 500
