"""The edges a new user hits: concurrent runs, dead folders, SIGTERM, damaged files, disk full, precision."""
import dataclasses
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import ddpo_debias as dd
from tests.test_cli import ROOT, TINY, read_metrics, run_cli, wait_for
from tests.fixtures import two_classes

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def start_cli(*args):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "ddpo_debias.py"), *map(str, args)], cwd=ROOT,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


class Result:
    """What a finished command left: its exit code and stderr."""

    def __init__(self, returncode, stderr):
        self.returncode, self.stderr = returncode, stderr


def run_main(capsys, *args):
    """The CLI's own entry point in this process: as run_cli, without 5 s of imports per call."""
    code = dd.main([str(a) for a in args])
    return Result(code, capsys.readouterr().err)


def one_error_line(result, flag):
    """Exit 2, and one error line naming the flag (loading bars may come before it), no traceback."""
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    return result.returncode == 2 and len(errors) == 1 and flag in errors[0] and "Traceback" not in result.stderr


def test_second_run_on_the_same_folder_is_refused_while_the_first_runs(tiny_sd, tiny_classifier, tmp_path):
    out = tmp_path / "run"
    first = start_cli("--model", tiny_sd, "--classifier", tiny_classifier, *TINY, "--epochs", "50",
                      "--output-dir", out)
    wait_for(lambda: (out / "config.json").exists())
    second = run_cli("--model", tiny_sd, "--classifier", tiny_classifier, *TINY, "--seed", "2", "--output-dir", out)
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
    assert one_error_line(second, "--output-dir") and "in use by another run" in second.stderr, second.stderr
    assert json.loads((out / "config.json").read_text())["seed"] == 0  # the first run's files only


def test_lock_of_a_killed_run_is_not_stale(tiny_sd, tiny_classifier, tmp_path):
    """kill -9 during model loading: the folder holds no epoch, so it can be reused at once, lock and all."""
    out = tmp_path / "run"
    proc = start_cli("--model", tiny_sd, "--classifier", tiny_classifier, *TINY, "--output-dir", out)
    wait_for(lambda: (out / ".lock").exists() and (out / ".lock").read_text().strip())
    proc.kill(), proc.wait()
    again = run_cli("--model", tiny_sd, "--classifier", tiny_classifier, *TINY, "--output-dir", out)
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(read_metrics(out)) == 2


def test_sigterm_finishes_the_epoch_saves_and_exits_143(tiny_sd, tiny_classifier, tmp_path):
    out = tmp_path / "run"
    proc = start_cli("--model", tiny_sd, "--classifier", tiny_classifier, *TINY, "--epochs", "50",
                     "--save-every", "100", "--output-dir", out)
    wait_for(lambda: (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip())
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    assert "SIGTERM" in stderr and "--resume" in stderr and "Traceback" not in stderr
    state = torch.load(out / "checkpoint.pt", weights_only=False)  # save_every 100: only the SIGTERM saved it
    assert len(state["metrics"]) == state["epoch"] + 1 == len(read_metrics(out))


def test_sigterm_while_loading_stops_with_one_line_and_leaves_no_folder(tiny_sd, tiny_classifier, tmp_path, capsys,
                                                                       monkeypatch):
    """Before the loop's graceful stop (loading a model can take a minute): exit 143, no traceback, nothing left."""
    out, start_run, before = tmp_path / "run", dd.start_run, signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(dd, "start_run", lambda *a: (os.kill(os.getpid(), signal.SIGTERM), start_run(*a))[1])
    result = run_main(capsys, "--model", tiny_sd, "--classifier", tiny_classifier, *TINY, "--output-dir", out)
    assert result.returncode == 143 and "interrupted" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() and signal.getsignal(signal.SIGTERM) is before  # the handler is given back


def test_a_kill_during_the_final_save_leaves_no_half_written_unet(tiny_sd, tiny_classifier, tmp_path, capsys,
                                                                  monkeypatch):
    """A finished run is one with `unet/`: a save cut off (here by Ctrl-C inside it) must not leave one, and --resume
    then writes it."""
    from diffusers import UNet2DConditionModel
    out, save = tmp_path / "run", UNet2DConditionModel.save_pretrained

    def cut_off(self, path, **kwargs):
        os.makedirs(path), open(os.path.join(path, "config.json"), "w").close()
        raise KeyboardInterrupt
    monkeypatch.setattr(UNet2DConditionModel, "save_pretrained", cut_off)
    result = run_main(capsys, "--model", tiny_sd, "--classifier", tiny_classifier, *TINY, "--output-dir", out)
    assert result.returncode == 130 and not (out / "unet").exists()
    monkeypatch.setattr(UNet2DConditionModel, "save_pretrained", save)
    result = run_main(capsys, "--resume", out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert UNet2DConditionModel.from_pretrained(out / "unet") is not None and not (out / "unet.tmp").exists()


def test_run_that_died_in_epoch_0_is_resumable_and_reusable(tiny_sd, tiny_classifier, tmp_path, capsys):
    """config.json and an empty metrics.jsonl, no checkpoint: --resume starts it again; so does a fresh start."""
    args = ["--model", tiny_sd, "--classifier", tiny_classifier, *TINY]
    for out, second in ((tmp_path / "a", ["--resume", tmp_path / "a"]), (tmp_path / "b", [*args, "--output-dir", tmp_path / "b"])):
        out.mkdir()
        config = dd.Config(model=tiny_sd, classifier=tiny_classifier, epochs=2, batch_size=4, num_steps=3,
                           mixed_precision="no", output_dir=str(out))
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
        (out / "metrics.jsonl").write_text("")
        result = run_main(capsys, *second)
        assert result.returncode == 0, result.stderr[-2000:]
        assert [m["epoch"] for m in read_metrics(out)] == [0, 1] and (out / "checkpoint.pt").exists()


def test_resume_without_checkpoint_keeps_the_logged_epochs_aside(tiny_sd, tiny_classifier, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(capsys, "--model", tiny_sd, "--classifier", tiny_classifier, *TINY, "--output-dir", out).returncode == 0
    (out / "checkpoint.pt").unlink()  # as if killed before its first checkpoint, after two epochs
    logged = (out / "metrics.jsonl").read_text()
    result = run_main(capsys, "--resume", out)
    assert result.returncode == 0, result.stderr[-2000:]
    kept = [p for p in os.listdir(out) if p.startswith("metrics-unsaved-")]
    assert len(kept) == 1 and (out / kept[0]).read_text() == logged
    assert [m["epoch"] for m in read_metrics(out)] == [0, 1]


@pytest.mark.parametrize("damage, flag, words", [
    ("checkpoint-empty", "--resume", "checkpoint.pt is damaged"),
    ("checkpoint-truncated", "--resume", "checkpoint.pt is damaged"),
    ("checkpoint-garbage", "--resume", "checkpoint.pt is damaged"),
    ("config-malformed", "--resume", "config.json is damaged"),
    ("config-unknown-key", "--resume", "unknown keys: colour"),
    ("fewer-epochs", "--epochs", "already finished 2 epochs"),
    ("other-output-dir", "--output-dir", "cannot be combined with --resume"),
    ("missing-folder", "--resume", "does not exist"),
])
def test_resume_problems_are_one_line(finished_run, tmp_path, capsys, damage, flag, words):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    checkpoint, config = out / "checkpoint.pt", out / "config.json"
    extra = []
    if damage == "checkpoint-empty":
        checkpoint.write_bytes(b"")
    elif damage == "checkpoint-truncated":
        checkpoint.write_bytes(checkpoint.read_bytes()[:5000])
    elif damage == "checkpoint-garbage":
        checkpoint.write_bytes(os.urandom(4000))
    elif damage == "config-malformed":
        config.write_text(config.read_text()[:40])
    elif damage == "config-unknown-key":
        config.write_text(json.dumps({**json.loads(config.read_text()), "colour": "red"}))
    elif damage == "fewer-epochs":
        extra = ["--epochs", "1"]
    elif damage == "other-output-dir":
        extra = ["--output-dir", tmp_path / "elsewhere"]
    elif damage == "missing-folder":
        out = tmp_path / "nowhere"
    before = {p: (finished_run / p).read_bytes() for p in ("metrics.jsonl",)}
    result = run_main(capsys, "--resume", out, *extra)
    assert one_error_line(result, flag) and words in result.stderr, result.stderr
    if damage in ("fewer-epochs", "other-output-dir"):  # nothing of the finished run was rewritten
        assert (out / "metrics.jsonl").read_bytes() == before["metrics.jsonl"]
        assert json.loads(config.read_text())["epochs"] == 2
        assert not (tmp_path / "elsewhere").exists()


def test_damaged_model_and_classifier_files_are_one_line(tiny_sd, tiny_classifier, tmp_path, capsys):
    import shutil
    for flag, source, weights in (("--classifier", tiny_classifier, "model.safetensors"),
                                  ("--model", tiny_sd, os.path.join("unet", "diffusion_pytorch_model.safetensors"))):
        damaged = tmp_path / flag.strip("-")
        shutil.copytree(source, damaged)
        path = damaged / weights
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
        model = damaged if flag == "--model" else tiny_sd
        classifier = damaged if flag == "--classifier" else tiny_classifier
        result = run_main(capsys, "--model", model, "--classifier", classifier, *TINY, "--output-dir",
                          tmp_path / f"run-{flag}")
        assert one_error_line(result, flag) and "damaged or incomplete" in result.stderr, result.stderr
        assert "network" not in result.stderr  # a local folder gets no hint about hub ids
    missing = run_main(capsys, "--model", tiny_sd, "--classifier", tmp_path / "no-such-classifier", *TINY,
                      "--output-dir", tmp_path / "run-missing")
    assert one_error_line(missing, "--classifier") and "does not exist" in missing.stderr, missing.stderr


def test_disk_full_while_saving_is_one_line_and_leaves_no_temp_file(tiny_sd, tiny_classifier, tmp_path, monkeypatch,
                                                                     capsys):
    """The second save fails half-way, as a full disk makes it fail: the first checkpoint stays intact."""
    real_save, calls = torch.save, []

    def full_disk_save(obj, path):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed writing file")
        return real_save(obj, path)

    monkeypatch.setattr(torch, "save", full_disk_save)
    monkeypatch.setattr(dd.shutil, "disk_usage", lambda path: type("U", (), {"free": 0})())
    out = tmp_path / "run"
    code = dd.main(["--model", tiny_sd, "--classifier", tiny_classifier, "--output-dir", str(out), "--save-every",
                    "1", "--epochs", "3", "--batch-size", "4", "--num-steps", "3", "--reward", "shift"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 1 and len(errors) == 1 and "no space left on device while writing" in errors[0], errors
    assert not (out / "checkpoint.pt.tmp").exists()
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 0


def test_auto_precision_and_device_are_recorded(tiny_sd, tmp_path):
    config = dd.Config(model=tiny_sd, output_dir=str(tmp_path / "run"), epochs=1, batch_size=2, num_steps=3)
    dd.prepare_run_dir(config)
    dd.train(config, classifier=lambda images: two_classes(torch.rand(images.shape[0])))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["device"] == "cpu" and saved["mixed_precision"] == "no"  # fp32 on the CPU, not 'auto' or ''


def test_random_sd15_refuses_unknown_flags_and_leaves_no_scratch_folder(tmp_path):
    typo = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "random_sd15.py"), str(tmp_path / "a"),
                           "--tinyy"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=60)
    assert typo.returncode == 2 and "--tinyy" in typo.stderr and not (tmp_path / "a").exists()
    ok = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "random_sd15.py"), str(tmp_path / "b"),
                         "--tiny"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]  # from another folder than the repository root
    assert sorted(os.listdir(tmp_path / "b")) == ["classifier", "model_index.json", "scheduler", "text_encoder",
                                                 "tokenizer", "unet", "vae"]


def test_help_does_not_import_transformers():
    """Usage errors and --help come before the slow imports (transformers alone takes about 3 s)."""
    code = ("import sys, ddpo_debias\n"
            "assert 'transformers' not in sys.modules and 'diffusers' not in sys.modules, sorted(sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_ctrl_c_during_imports_quits_without_a_traceback(tmp_path):
    proc = start_cli("--epochs", "1", "--output-dir", tmp_path / "run")
    import time
    time.sleep(0.3)  # torch alone takes over a second to import
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode in (-signal.SIGINT, 130) and "Traceback" not in stderr, stderr[-2000:]


def test_resuming_a_run_from_before_skip_final_steps_trains_every_step_as_it_did(tmp_path):
    """A config.json without skip_final_steps is from a run that trained every step: --resume keeps it that way
    (0), so the resumed epochs continue the same method; a saved value, or one given with --resume, wins."""
    saved = dataclasses.asdict(dd.Config())
    del saved["skip_final_steps"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert dd.resolve_config({"resume": str(tmp_path)}).skip_final_steps == 0
    assert dd.resolve_config({"resume": str(tmp_path), "skip_final_steps": 2}).skip_final_steps == 2
    (tmp_path / "config.json").write_text(json.dumps({**saved, "skip_final_steps": 3}))
    assert dd.resolve_config({"resume": str(tmp_path)}).skip_final_steps == 3
