"""A newcomer's first minute (issue 23): --help, flags given where they do nothing, folders that are not runs,
failed starts that leave nothing behind, an offline hub, errors that name the right flag, and the pictures."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

import ddpo_debias as dd
import rewards
from tests.test_cli import ROOT, TINY, read_metrics, run_cli
from tests.test_edges import ENV, one_error_line, run_main


def test_help_lists_every_flag_and_exits_0():
    result = run_cli("--help")
    assert result.returncode == 0 and result.stderr == "", result.stderr[-2000:]
    for f in dataclasses.fields(dd.Config):
        assert dd.flag_of(f.name) in result.stdout, f.name


def test_help_survives_any_docstring(monkeypatch, capsys):
    """A percent sign in a field's docstring or default ("95%") is text, not an argparse format."""
    monkeypatch.setattr(dd, "field_docs", lambda: {"lr": "100% of %(prog)s %s %d", "prompt": "50%"})
    monkeypatch.setattr(dd.Config.__dataclass_fields__["judge_criterion"], "default", "a 100% match")
    with pytest.raises(SystemExit) as exit:
        dd.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    assert exit.value.code == 0 and "100% of %(prog)s %s %d" in out and "50%" in out and "a 100% match" in out


def eval_report(path, prompts, **settings):
    """A hand-written eval.json: what --compare reads of a base report."""
    row = {"n_female": 1, "n_male": 1, "n_none": 0, "n_images": 2, "shares": {"female": 0.5, "male": 0.5},
           "female_ratio": 0.5, "female_ratio_95": [0.1, 0.9], "bias": 0.0, "kl_to_target": 0.0, "none_rate": 0.0}
    report = {"images_per_prompt": 2, "seed": 0, "num_steps": 2, "guidance_scale": 5.0, **settings,
              "quality_model": dd.Config.clip_model, "prompts": [{"prompt": p, **row} for p in prompts]}
    path.write_text(json.dumps(report))
    torch.save({"embeddings": torch.zeros(len(prompts), 2, 4)}, dd.embeddings_path(str(path)))
    return path


@pytest.mark.parametrize("change, words", [({"seed": 7}, "seed (7, here 0)"), ({"num_steps": 3}, "num_steps"),
                                           ({"images_per_prompt": 4}, "images_per_prompt"),
                                           ({"guidance_scale": 7.5}, "guidance_scale"), ("prompts", "other prompts")])
def test_unpaired_compare_is_refused_before_any_model_loads(tmp_path, monkeypatch, capsys, change, words):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("photo of the face of a nurse\nphoto of the face of a pilot\n")
    listed = ["photo of the face of a nurse", "photo of the face of a pilot"]
    base = eval_report(tmp_path / "base.json", listed[::-1] if change == "prompts" else listed,
                       **({} if change == "prompts" else change))
    monkeypatch.setattr(dd, "load_models", lambda *a: pytest.fail("models loaded before the pairing check"))
    result = run_main(capsys, "--evaluate", "--eval-prompts", prompts, "--eval-images", "2", "--num-steps", "2",
                      "--compare", base, "--output-dir", tmp_path / "run")
    assert one_error_line(result, "--compare") and words in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()
    paired = eval_report(tmp_path / "paired.json", listed)  # the same settings pass the check
    dd.validate(dd.Config(evaluate=True, eval_prompts=str(prompts), eval_images=2, num_steps=2, compare=str(paired)))


def test_a_prompt_that_names_a_file_gets_a_warning(tiny_sd, tiny_classifier, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("photo of the face of a nurse\n")
    result = run_main(capsys, "--model", tiny_sd, "--classifier", tiny_classifier, "--prompt", prompts, "--epochs",
                      "1", "--batch-size", "2", "--num-steps", "3", "--output-dir", tmp_path / "run")
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: --prompt:")]
    assert result.returncode == 0 and len(warnings) == 1 and "--prompts" in warnings[0], result.stderr
    quiet = run_main(capsys, "--model", tiny_sd, "--classifier", tiny_classifier, "--epochs", "1", "--batch-size",
                     "2", "--num-steps", "3", "--output-dir", tmp_path / "run2")
    assert quiet.returncode == 0 and "warning: --prompt" not in quiet.stderr


def test_a_folder_of_other_files_is_refused_and_left_as_it_was(tiny_sd, tiny_classifier, tmp_path, capsys):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "essay.txt").write_text("my essay")
    result = run_main(capsys, "--model", tiny_sd, "--classifier", tiny_classifier, *TINY, "--output-dir", out)
    assert one_error_line(result, "--output-dir") and "essay.txt" in result.stderr, result.stderr
    assert os.listdir(out) == ["essay.txt"] and (out / "essay.txt").read_text() == "my essay"


def test_train_batch_size_larger_than_an_update_is_recorded_as_used(tiny_sd, tiny_classifier, tmp_path, capsys):
    """B = 4 in 2 updates: 2 images an update, so --train-batch-size 4 (the default) runs as 2, and says so."""
    out = tmp_path / "run"
    result = run_main(capsys, "--model", tiny_sd, "--classifier", tiny_classifier, *TINY, "--output-dir", out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["train_batch_size"] == 2
    smaller = run_main(capsys, "--model", tiny_sd, "--classifier", tiny_classifier, *TINY, "--train-batch-size", "1",
                       "--output-dir", tmp_path / "run1")
    assert smaller.returncode == 0 and json.loads((tmp_path / "run1" / "config.json").read_text())["train_batch_size"] == 1


@pytest.mark.parametrize("args, flag", [(["--num-steps", "2000"], "--num-steps"), (["--unet", "/no/unet"], "--unet"),
                                        (["--classifier", "/no/classifier"], "--classifier")])
def test_a_failed_start_leaves_no_folder(tiny_sd, tiny_classifier, tmp_path, capsys, args, flag):
    out = tmp_path / "new" / "run"
    result = run_main(capsys, "--model", tiny_sd, "--classifier", tiny_classifier, *TINY, "--output-dir", out, *args)
    assert one_error_line(result, flag), result.stderr
    assert not out.exists() and (tmp_path / "new").exists()  # the folder it made, not the parents it made
    made = tmp_path / "made"
    made.mkdir()  # a folder the user made stays, empty
    result = run_main(capsys, "--model", tiny_sd, "--classifier", tiny_classifier, *TINY, "--output-dir", made, *args)
    assert result.returncode == 2 and made.exists() and os.listdir(made) == []


def test_a_judge_that_is_not_running_leaves_no_folder(tiny_sd, tmp_path, capsys):
    out = tmp_path / "run"
    result = run_main(capsys, "--model", tiny_sd, "--labeller", "judge", "--judge-url", "http://127.0.0.1:9/v1",
                      "--judge-model", "m", *TINY, "--output-dir", out)
    assert one_error_line(result, "--judge-url"), result.stderr
    assert not out.exists()


def test_a_finished_run_removes_its_lock_file(finished_run):
    assert not (finished_run / ".lock").exists() and (finished_run / "unet").exists()


def test_removing_the_lock_file_opens_no_race(tmp_path, monkeypatch):
    """A start opens .lock just before the running run ends and removes it, then gets the flock on the removed
    file: it must notice, and lock the file at the path, so that a third start is refused while it runs."""
    config = lambda: dd.Config(output_dir=str(tmp_path / "run"))
    first = dd.prepare_run_dir(config())
    with pytest.raises(dd.UsageError, match="in use"):
        dd.prepare_run_dir(config())
    real_flock, calls = dd.fcntl.flock, []

    def first_ends_between_open_and_flock(file, operation):
        if not calls:
            first.release()  # removes the path of the file the second start has open
        calls.append(os.path.exists(tmp_path / "run" / ".lock"))
        return real_flock(file, operation)

    monkeypatch.setattr(dd.fcntl, "flock", first_ends_between_open_and_flock)
    second = dd.prepare_run_dir(config())
    monkeypatch.setattr(dd.fcntl, "flock", real_flock)
    assert calls == [False, True]  # it locked the removed file, saw that, and locked the file at the path
    assert os.fstat(second.lock.fileno()).st_ino == os.stat(tmp_path / "run" / ".lock").st_ino
    with pytest.raises(dd.UsageError, match="in use"):
        dd.prepare_run_dir(config())
    second.release()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, flag", [(["--eval-images", "4"], "--eval-images"),
                                        (["--eval-prompts", "prompts.txt"], "--eval-prompts"),
                                        (["--compare", "eval.json"], "--compare"),
                                        (["--clip-model", "some/clip"], "--clip-model")])
def test_evaluation_flags_without_evaluate_are_refused(tmp_path, capsys, args, flag):
    result = run_main(capsys, *args, "--output-dir", tmp_path / "run")
    assert one_error_line(result, flag) and "only used with --evaluate" in result.stderr, result.stderr


def test_offline_hub_is_one_line_at_once(tiny_sd, tmp_path):
    """No --classifier, so the hub id; the hub cannot be reached (a closed local port) and the cache is empty."""
    env = {k: v for k, v in ENV.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf-home"))
    start = time.time()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "ddpo_debias.py"), "--model", tiny_sd, *TINY,
                             "--output-dir", str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-3000:]
    assert "--classifier" in result.stderr and "cache" in result.stderr and time.time() - start < 30
    assert not (tmp_path / "run").exists()


def test_resume_of_a_folder_in_use_names_resume(finished_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    held = dd.prepare_run_dir(dd.Config(output_dir=str(out), resume=str(out)))  # another run holds it
    result = run_main(capsys, "--resume", out, "--epochs", "3")
    held.release()
    assert one_error_line(result, "--resume") and "in use" in result.stderr, result.stderr


@pytest.mark.parametrize("epochs", ["1", "2"])
def test_resume_asks_for_more_epochs_than_finished(finished_run, tmp_path, capsys, epochs):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    result = run_main(capsys, "--resume", out, "--epochs", epochs)
    assert one_error_line(result, "--epochs") and "more than 2" in result.stderr, result.stderr
    assert len(read_metrics(out)) == 2


def test_profile_has_no_train_rate_for_an_epoch_without_update(tiny_sd, models_dir, tmp_path):
    """A classifier sure of nothing (P(female) = 0.5 for every image): every label is none, every reward equal,
    no update runs, and the update's TFLOP/s is null rather than its FLOPs over a few microseconds."""
    from transformers import ViTForImageClassification
    from tests.fixtures import make_tiny_classifier
    path = make_tiny_classifier(models_dir / "unsure")
    model = ViTForImageClassification.from_pretrained(path)
    with torch.no_grad():
        model.classifier.weight.zero_(), model.classifier.bias.zero_()
    model.save_pretrained(path)
    out = tmp_path / "run"
    result = run_cli("--model", tiny_sd, "--classifier", path, *TINY, "--profile", "--output-dir", out)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = read_metrics(out)
    assert all(m["equal_rewards"] and m["train_tflops"] is None and m["sample_tflops"] > 0 for m in metrics), metrics


def test_random_sd15_tiny_prints_no_torchvision_notice(tmp_path):
    env = {k: v for k, v in ENV.items() if k != "TRANSFORMERS_VERBOSITY"}  # conftest quietens the tests' own
    result = subprocess.run([sys.executable, "-m", "tests.random_sd15", str(tmp_path / "tiny"), "--tiny"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "torchvision" not in result.stderr, result.stderr[-2000:]


def test_plot_labels_ticks_and_legend(tmp_path):
    """Four epochs get ticks 0-3; two prompts whose lines end at the same q get labels apart and a legend."""
    from PIL import Image
    prompts = ["photo of the face of a nurse", "photo of the face of a software developer"]
    metrics = [{"epoch": e, "reward_mean": -0.1 * e, "shares": {"female": 0.5, "male": 0.5},
                "per_prompt": [{"prompt": p, "window_shares": {"female": 0.5, "male": 0.5}} for p in prompts]}
               for e in range(4)]
    rewards.save_plot(metrics, tmp_path / "plot.png")
    single = [{k: v for k, v in m.items() if k != "per_prompt"} for m in metrics]
    rewards.save_plot(single, tmp_path / "single.png")
    tall, short = Image.open(tmp_path / "plot.png"), Image.open(tmp_path / "single.png")
    assert tall.height == short.height + 14 * 2 + 6  # the legend's two lines
    legend = tall.crop((0, short.height, tall.width, tall.height)).convert("RGB")
    colours = {legend.getpixel((x, y)) for x in range(legend.width) for y in range(legend.height)}
    assert len(colours) > 2  # the prompts' colours, not only white and black


def test_prompt_labels_keep_the_occupation():
    label = rewards.shorten("photo of the face of a software developer")
    assert label.startswith("...") and label.endswith(" software developer") and len(label) <= 26, label
    assert rewards.shorten("a nurse") == "a nurse"
    assert len(rewards.shorten("x" * 40)) == 26


def test_comparison_has_an_overall_line_and_bar(tmp_path):
    listed = ["photo of the face of a nurse", "photo of the face of a pilot"]
    base = eval_report(tmp_path / "base.json", listed)
    report = json.loads(base.read_text())
    for row, bias in zip(report["prompts"], (0.5, None)):
        row["bias"], row["female_ratio"] = bias, None if bias is None else 0.25
        row["shares"] = None if bias is None else {"female": 0.25, "male": 0.75}
    report["overall"], report["classes"] = rewards.overall(report["prompts"]), ["female", "male"]  # as evaluate()
    report["threshold"] = 0.7
    table = rewards.compare_reports(str(base), report, str(tmp_path / "compare.png"))
    overall = table.splitlines()[-1]
    assert overall.startswith("overall") and " 0.00 -> 0.50 " in overall, table  # the mean bias, base -> this
    assert (tmp_path / "compare.png").exists()


def test_startup_line_names_the_threads_and_a_loaded_machine_gets_a_hint(monkeypatch, capsys):
    """The count is torch's own (never chosen from the load: it changes a CPU run's numbers); the hint comes only
    when other programs load the cores and the user has not set OMP_NUM_THREADS."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(dd.os, "getloadavg", lambda: (1.0, 1.0, 1.0))
    assert dd.cpu_threads("cpu") == " (2 threads)"
    assert "OMP_NUM_THREADS=1" in capsys.readouterr().err
    monkeypatch.setattr(dd.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert dd.cpu_threads("cpu") == " (2 threads)" and capsys.readouterr().err == ""
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(dd.os, "getloadavg", lambda: (1.0, 1.0, 1.0))
    assert dd.cpu_threads("cpu") == " (2 threads)" and capsys.readouterr().err == ""
    assert dd.cpu_threads("cuda:0") == ""


def test_random_sd15_tiny_sdxl_builds_the_tiny_sdxl(tmp_path):
    """--tiny --sdxl: the tests' tiny SDXL (two text encoders), not SDXL's full 5 GB shapes."""
    out = tmp_path / "tiny-xl"
    result = subprocess.run([sys.executable, "-m", "tests.random_sd15", str(out), "--tiny", "--sdxl"], cwd=ROOT,
                            env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "text_encoder_2").is_dir() and (out / "classifier" / "config.json").is_file()
    assert sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) < 50e6
