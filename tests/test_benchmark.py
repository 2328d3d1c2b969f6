"""tests/benchmark.py on the tiny models on the CPU: the summary and the packed files it writes, a kill and its
--resume, and a configuration stopped by its time budget."""
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

from tests.test_cli import ROOT

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory, tiny_sd, tiny_classifier):
    """The layout the benchmark builds: a pipeline folder with its classifier in classifier/."""
    path = tmp_path_factory.mktemp("bench") / "model"
    shutil.copytree(tiny_sd, path)
    shutil.copytree(tiny_classifier, path / "classifier")
    return path


def benchmark(out, model, *args):
    result = subprocess.run([sys.executable, "-m", "tests.benchmark", str(out), "--tiny", "--model", str(model),
                             *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "summary.json") as f:
        return json.load(f)


def test_summary_and_packed_runs(tiny_pipeline, tmp_path):
    out = tmp_path / "bench"
    summary = benchmark(out, tiny_pipeline, "--only", "defaults,resume", "--budget", "200")
    assert summary["model_was"] == "reused" and summary["environment"]["torch"] and summary["environment"]["diffusers"]
    assert sorted(os.listdir(out)) == ["runs.tar.gz", "summary.json"]  # few files come back from a lent machine
    defaults, resume = summary["configurations"]["defaults"], summary["configurations"]["resume"]
    for row in (defaults, resume):
        assert row["returncode"] == 0 and row["ended"] == "finished" and row["epochs_done"] == 3, row
        assert row["sample_seconds"] > 0 and row["train_seconds"] > 0 and row["sample_tflops"] > 0
        assert abs(row["epoch_seconds"] - row["sample_seconds"] - row["reward_seconds"] - row["train_seconds"]) < 1e-9
    # fp32 on the CPU: the first update is on-policy to the bit, so log r is exactly 0 and nothing is clipped
    assert defaults["onpolicy_log_ratio_rms"][0] == 0.0 and defaults["onpolicy_clipfrac"][0] == 0.0
    assert defaults["clip_range"] == pytest.approx(1e-4 * 128 / 16) and defaults["mixed_precision"] == "no"
    assert 1 <= resume["killed_after_epochs"] <= 3
    with tarfile.open(out / "runs.tar.gz") as tar:
        names = set(tar.getnames())
        metrics = tar.extractfile("runs/defaults/metrics.jsonl").read().decode().splitlines()
    for name in ("defaults", "resume"):
        assert {f"runs/{name}/metrics.jsonl", f"runs/{name}/config.json", f"runs/{name}.stderr.txt"} <= names
    assert "runs/resume-resumed.stdout.txt" in names and not any(n.endswith((".pt", ".safetensors")) for n in names)
    assert len(metrics) == 3 and "epoch_seconds" not in metrics[0]  # the run's own file, untouched


def test_a_configuration_is_stopped_by_its_budget_and_keeps_what_it_logged(tiny_pipeline, tmp_path):
    out = tmp_path / "bench"
    summary = benchmark(out, tiny_pipeline, "--only", "defaults", "--epochs", "100000", "--budget", "12")
    row = summary["configurations"]["defaults"]
    assert row["ended"] == "budget" and row["returncode"] == 143, row  # SIGTERM: the epoch finished, then saved
    assert 1 <= row["epochs_done"] < 100000 and summary["total_seconds"] < 60


def test_unknown_configuration_is_refused(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tests.benchmark", str(tmp_path / "b"), "--only", "fast"],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--only" in result.stderr and "defaults" in result.stderr
    assert not (tmp_path / "b").exists()
