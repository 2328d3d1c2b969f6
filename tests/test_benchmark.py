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
    summary = benchmark(out, tiny_pipeline, "--only", "defaults,auto,resume", "--budget", "200")
    assert summary["model_was"] == "reused" and summary["environment"]["torch"] and summary["environment"]["diffusers"]
    assert sorted(os.listdir(out)) == ["runs.tar.gz", "summary.json"]  # few files come back from a lent machine
    defaults, resume = summary["configurations"]["defaults"], summary["configurations"]["resume"]
    for row in (defaults, resume):
        assert row["returncode"] == 0 and row["ended"] == "finished" and row["epochs_done"] == 3, row
        assert row["sample_seconds"] > 0 and row["train_seconds"] > 0 and row["sample_tflops"] > 0
        assert row["updated_epochs"] == 3 and row["train_tflops"] > 0  # every epoch's update ran: it is measured
        assert abs(row["epoch_seconds"] - row["sample_seconds"] - row["reward_seconds"] - row["train_seconds"]) < 1e-9
    # fp32 on the CPU: the first update is on-policy, so log r is 0 up to fp32 rounding (exactly 0 where a micro-batch
    # holds the sampling batch's rows; a few ulps where its shape differs, by CPU) and nothing is clipped at ε
    assert defaults["onpolicy_log_ratio_rms"][0] < 1e-6 and defaults["onpolicy_clipfrac"][0] == 0.0
    assert defaults["clip_range"] == pytest.approx(1e-4 * 128 / 16) and defaults["mixed_precision"] == "no"
    assert 1 <= resume["killed_after_epochs"] <= 3
    # auto on the CPU's free memory: the tiny model's 2 images x 2 trained steps of an update, all in one call
    auto = summary["configurations"]["auto"]
    assert auto["returncode"] == 0 and auto["train_batch_size"] == 4 and auto["updated_epochs"] == 3
    assert defaults["old_log_probs"] == "sampler" and defaults["sampler_log_ratio_rms"][0] < 1e-6
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


def test_debias_bench_counts_the_epoch_q_balances_by_hand():
    """q pooled over 2 epochs (f, m counts): windows end at epochs 1..5 with q 0.1, 0.25, 0.45, 0.65, 0.55: first
    within 0.1 of 0.5 at epoch 3, and every later window within 0.2; a later excursion past 0.2 moves it on."""
    from tests.debias_bench import balanced_at, summarise
    counts = [(1, 19), (3, 17), (7, 13), (11, 9), (15, 5), (7, 13)]
    metrics = [{"n_female": f, "n_male": m, "n_none": 0, "female_ratio": f / (f + m), "sample_seconds": 1.0,
                "reward_seconds": 0.5, "train_seconds": 2.0} for f, m in counts]
    assert balanced_at(metrics) == 3
    assert summarise(metrics)["seconds_to_balance"] == 4 * 3.5 and summarise(metrics)["worst_none_rate"] == 0
    metrics[2]["n_none"], metrics[3]["n_none"] = 10, 2  # pooled none 0/40, 10/50, 12/52, 2/42, 0/40
    assert summarise(metrics)["worst_pooled_none_rate"] == 12 / 52 and summarise(metrics)["worst_none_rate"] == 10 / 30
    metrics[4]["n_female"], metrics[4]["n_male"] = 19, 1  # windows 4 and 5 now past 0.7: no lasting balance yet
    assert balanced_at(metrics) is None
    for m, (f, male, none) in zip(metrics, [(1, 19, 4), (3, 17, 0), (9, 11, 0), (11, 9, 2), (10, 10, 0), (9, 11, 2)]):
        m["independent"] = {"n_female": f, "n_male": male, "n_none": none}  # the referee's reading
    fresh, base = {"female": 0.3, "male": 0.6, "none": 0.1, "background": [0.5, 0.6, 0.7]}, {"background": [0.5, 0.5, 0.8]}
    row = summarise(metrics, fresh, base)  # referee windows 0.1, 0.3, 0.5, 0.525, 0.475: balanced at epoch 3
    assert row["referee_balanced_at"] == 3 and row["referee_none_last_4"] == 4 / 84
    assert row["referee_final_q"] == pytest.approx(1 / 3) and row["background_drift"] == pytest.approx(0.1)


def test_debias_bench_runs_and_writes_its_table(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tests.debias_bench", str(tmp_path / "b"), "--configs",
                             "today,half-steps", "--seeds", "0", "--epochs", "2", "--clip-i", "--fresh", "32"], cwd=ROOT,
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    bench = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert set(bench["results"]) == {"today", "half-steps"} and (tmp_path / "b" / "bench.txt").exists()
    today, half = bench["results"]["today"], bench["results"]["half-steps"]
    assert today["train_seconds"] > half["train_seconds"] > 0  # 2 of 3 steps trained: a cheaper update
    assert (tmp_path / "b" / "runs" / "today-seed0" / "metrics.jsonl").exists()
    clip_i = [today["seeds"]["0"]["clip_i"], half["seeds"]["0"]["clip_i"]]
    assert all(0 < c < 1 for c in clip_i) and today["median_clip_i"] == clip_i[0], clip_i  # trained: not the base
    assert (tmp_path / "b" / "eval" / "base" / "eval.json").exists()
    assert bench["fresh"] == 32 and 0 <= today["referee_median_final_q"] <= 1 and today["referee_balanced"] == "0/1"


def test_the_sdxl_configuration_runs_on_its_own_pipeline(tiny_pipeline, tmp_path):
    """--only sdxl-low-memory: no SD 1.5 folder is needed; the SDXL one (tiny here) is built in --sdxl-model, and every
    epoch samples and updates (gradient checkpointing through SDXL's added conditions) with --profile's counts. The
    plain sdxl configuration differs only by that flag."""
    out = tmp_path / "bench"
    summary = benchmark(out, tmp_path / "no-sd15", "--only", "sdxl-low-memory", "--sdxl-model", tmp_path / "tiny-sdxl",
                        "--epochs", "2", "--budget", "200")
    assert summary["sdxl_model_was"] == "built" and "model_was" not in summary
    assert not os.path.exists(tmp_path / "no-sd15")
    row = summary["configurations"]["sdxl-low-memory"]
    assert row["returncode"] == 0 and row["epochs_done"] == 2 and row["updated_epochs"] == 2, row
    assert row["sample_tflops"] > 0 and row["train_tflops"] > 0 and "--low-memory" in row["flags"]
    with open(tmp_path / "tiny-sdxl" / "model_index.json") as f:
        assert json.load(f)["_class_name"] == "StableDiffusionXLPipeline"


def test_the_sd35_configuration_runs_on_its_own_pipeline(tmp_path):
    """--only sd35-auto: SD 3's pipeline (tiny here) built in --sd35-model; every epoch samples and updates through
    the flow step, with --train-batch-size auto's choice recorded."""
    out = tmp_path / "bench"
    summary = benchmark(out, tmp_path / "no-sd15", "--only", "sd35-auto", "--sd35-model", tmp_path / "tiny-sd3",
                        "--epochs", "2", "--budget", "200")
    assert summary["sd35_model_was"] == "built" and "model_was" not in summary and "sdxl_model" not in summary
    row = summary["configurations"]["sd35-auto"]
    assert row["returncode"] == 0 and row["epochs_done"] == 2 and row["updated_epochs"] == 2, row
    assert row["train_batch_size"] == 16 and row["sample_tflops"] > 0  # 2 images x their 8 trained steps (T = 10)
    with open(tmp_path / "tiny-sd3" / "model_index.json") as f:
        assert json.load(f)["_class_name"] == "StableDiffusion3Pipeline"


@pytest.mark.parametrize("configs, message", [("today,today", "names a configuration twice"),
                                               ("", "unknown empty name"), ("today, nope", "unknown nope")])
def test_debias_bench_refuses_bad_configurations_before_it_runs(tmp_path, configs, message):
    result = subprocess.run([sys.executable, "-m", "tests.debias_bench", str(tmp_path / "b"), "--configs", configs],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "b").exists()


def test_debias_bench_stopped_leaves_no_run_behind(tmp_path):
    """SIGTERM to the benchmark: it stops its runs (no child outlives it) and says where the finished ones are."""
    import signal
    import time
    proc = subprocess.Popen([sys.executable, "-m", "tests.debias_bench", str(tmp_path / "b"), "--configs", "today",
                             "--seeds", "0", "--epochs", "16", "--fresh", "32"],  # the base's reading comes first
                            cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list((tmp_path / "b" / "runs").glob("today-seed0/config.json")):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "--summarise reads them" in err and "Traceback" not in err, err
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "b")], capture_output=True, text=True).stdout.split()
    assert not left, left


def test_the_gpu_benchmark_refuses_a_machine_without_one(tmp_path, monkeypatch, capsys):
    """Without --tiny it needs a GPU: on a CPU it says so in one line (exit 2) and builds nothing."""
    import torch
    from tests import benchmark as gpu_benchmark
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stopped:
        gpu_benchmark.main([str(tmp_path / "b")])
    assert stopped.value.code == 2 and "no GPU here" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_the_gpu_benchmark_stopped_by_ctrl_c_leaves_no_run_behind(tiny_pipeline, tmp_path):
    import signal
    import time
    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "tests.benchmark", str(out), "--tiny", "--model", str(tiny_pipeline),
                             "--only", "defaults", "--epochs", "100000"], cwd=ROOT, env=ENV, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "runs" / "defaults" / "config.json").exists():
        time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "stopped by SIGINT" in err and "Traceback" not in err, err
    left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert not left, left
