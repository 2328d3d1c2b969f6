"""What a new user hit on a busy machine (issue 33, items 5-13): threads, resume, tracebacks and litter, messages,
silently ignored flags, --help, --clip-model none, pictures and keys. Each through the CLI, as the user met it."""
import json
import os
import subprocess
import sys

import pytest
import torch

import ddpo_debias as dd
import rewards
from tests.fixtures import make_tiny_sd
from tests.test_cli import ROOT, TINY
from tests.test_edges import one_error_line, run_main


def toyworld_command(*args, env):
    return subprocess.run([sys.executable, "-m", "tests.toyworld", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


# ---------------------------------------------------------------------------------------------- 5. threads
def test_toy_world_commands_run_at_one_thread_unless_the_user_says_otherwise(tmp_path):
    """The startup line says the thread count: one by default, whatever the cores; OMP_NUM_THREADS wins."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    demo = toyworld_command("demo", tmp_path / "demo", "--epochs", "1", env=env)
    assert demo.returncode == 0 and "device cpu (1 thread)" in demo.stdout, demo.stdout + demo.stderr
    hardened = os.path.join("tests", "toyworld_three", "hardened")  # three --classifier: another reward classifier
    three = toyworld_command("three", tmp_path / "three", "--epochs", "1", "--classifier", hardened,
                             env={**env, "OMP_NUM_THREADS": "2"})
    assert three.returncode == 0 and "device cpu (2 threads)" in three.stdout, three.stdout + three.stderr
    assert json.loads((tmp_path / "three" / "config.json").read_text())["classifier"] == hardened
    missing = toyworld_command("three", tmp_path / "missing", "--classifier", tmp_path / "nothing", env=env)
    assert one_error_line(missing, "--classifier"), missing.stderr
    assert not (tmp_path / "missing").exists()


# ---------------------------------------------------------------------------------------------- 6. resume
@pytest.fixture
def small_run(tiny_sd, tiny_classifier, tmp_path):
    out = tmp_path / "run"
    assert dd.main(["--model", tiny_sd, "--classifier", tiny_classifier, *TINY, "--save-every", "1",
                    "--output-dir", str(out)]) == 0
    return out


def test_resume_with_another_model_is_refused_not_called_damaged(small_run, tmp_path, capsys):
    """A second random tiny SD of the same shapes: before, it was swapped in silently (exit 0)."""
    other = make_tiny_sd(tmp_path / "other-sd", seed=1)
    capsys.readouterr()
    for flag, value in (("--model", other), ("--unet", os.path.join(other, "unet")), ("--classifier", other)):
        result = run_main(capsys, "--resume", small_run, "--epochs", "3", flag, value)
        assert one_error_line(result, flag) and "the run was trained with" in result.stderr, result.stderr
        assert "damaged" not in result.stderr
    assert len((small_run / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_checkpoint_of_another_model_is_not_called_damaged(small_run, tmp_path, capsys):
    """The model folder itself changed under the run (other shapes): the checkpoint is intact, and said so."""
    import shutil
    from diffusers import UNet2DConditionModel
    config = json.loads((small_run / "config.json").read_text())
    moved = tmp_path / "sd-changed"
    shutil.copytree(config["model"], moved)
    unet = UNet2DConditionModel.from_pretrained(moved / "unet")
    bigger = UNet2DConditionModel.from_config({**unet.config, "cross_attention_dim": 48})
    shutil.rmtree(moved / "unet")
    bigger.save_pretrained(moved / "unet")
    (small_run / "config.json").write_text(json.dumps({**config, "model": str(moved)}))
    capsys.readouterr()
    result = run_main(capsys, "--resume", small_run, "--epochs", "3")
    assert one_error_line(result, "--resume") and "another model" in result.stderr, result.stderr
    assert "damaged" not in result.stderr


def test_resume_keeps_every_override_with_its_epoch(small_run):
    before = json.loads((small_run / "config.json").read_text())
    assert dd.main(["--resume", str(small_run), "--epochs", "3", "--lr", "1e-3"]) == 0
    assert dd.main(["--resume", str(small_run), "--epochs", "4", "--seed", "5"]) == 0
    lines = [json.loads(line) for line in (small_run / "overrides.jsonl").read_text().splitlines()]
    assert lines == [{"from_epoch": 2, "changed": {"epochs": [2, 3], "lr": [before["lr"], 1e-3]}},
                     {"from_epoch": 3, "changed": {"epochs": [3, 4], "seed": [0, 5]}}]
    after = json.loads((small_run / "config.json").read_text())
    assert after["lr"] == 1e-3 and after["seed"] == 5  # config.json: as run now


def test_a_prompts_run_resumes_after_its_prompts_file_moved(tiny_sd, tiny_classifier, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("photo of the face of a nurse\nphoto of the face of a pilot\n")
    out = tmp_path / "run"
    assert dd.main(["--model", tiny_sd, "--classifier", tiny_classifier, *TINY, "--save-every", "1",
                    "--prompts", str(prompts), "--output-dir", str(out)]) == 0
    prompts.rename(tmp_path / "elsewhere.txt")
    assert dd.main(["--resume", str(out), "--epochs", "3"]) == 0
    assert (out / "prompts.txt").read_text() == (tmp_path / "elsewhere.txt").read_text()


# ---------------------------------------------------------------------------------------------- 7. tracebacks, litter
def test_unet_pointing_at_a_vae_folder_is_one_line_and_leaves_no_folder(tiny_sd, tiny_classifier, tmp_path, capsys):
    out = tmp_path / "run"
    result = run_main(capsys, "--model", tiny_sd, "--classifier", tiny_classifier, *TINY, "--unet",
                      os.path.join(tiny_sd, "vae"), "--output-dir", out)
    assert one_error_line(result, "--unet") and "AutoencoderKL" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_a_start_that_fails_after_writing_config_leaves_no_folder(tiny_sd, tiny_classifier, tmp_path, capsys,
                                                                  monkeypatch):
    """A crash before the first epoch finished: config.json and an empty metrics.jsonl were litter."""
    def broken(*args, **kwargs):
        raise dd.RunError("the sampler broke")
    monkeypatch.setattr(dd, "sample", broken)
    out = tmp_path / "run"
    assert dd.main(["--model", tiny_sd, "--classifier", tiny_classifier, *TINY, "--output-dir", str(out)]) == 1
    assert not out.exists()


def test_a_config_json_value_of_the_wrong_type_is_damaged(small_run, capsys):
    config = json.loads((small_run / "config.json").read_text())
    (small_run / "config.json").write_text(json.dumps({**config, "batch_size": "sixteen"}))
    result = run_main(capsys, "--resume", small_run, "--epochs", "3")
    assert one_error_line(result, "--resume") and "batch_size is 'sixteen', expected a value of type int" in result.stderr


def test_the_bench_refuses_bad_seeds_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tests.debias_bench", str(tmp_path / "b"), "--seeds", "a"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "--seeds" in result.stderr
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------------------- 8. messages
def test_offline_without_the_model_cached_does_not_ask_to_set_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    result = run_main(capsys, "--output-dir", tmp_path / "run")
    assert one_error_line(result, "--model") and "HF_HUB_OFFLINE is set" in result.stderr, result.stderr
    assert "HF_HUB_OFFLINE=1" not in result.stderr and not (tmp_path / "run").exists()


def test_a_typo_in_classes_is_reported_under_classes(tiny_sd, tiny_classifier, tmp_path, capsys):
    result = run_main(capsys, "--model", tiny_sd, "--classifier", tiny_classifier, *TINY, "--classes", "femal,male",
                      "--output-dir", tmp_path / "run")
    assert one_error_line(result, "--classes:") and "no label 'femal'" in result.stderr, result.stderr
    assert "--classifier:" not in result.stderr


def test_an_evaluation_folder_is_not_offered_to_resume(tiny_sd, tiny_classifier, tmp_path, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "eval.json").write_text("{}")
    result = run_main(capsys, "--model", tiny_sd, "--classifier", tiny_classifier, *TINY, "--output-dir", out)
    assert one_error_line(result, "--output-dir") and "an evaluation" in result.stderr
    assert "--resume" not in result.stderr


@pytest.mark.parametrize("args, expected", [
    (["--classes", "a,b,c", "--target", "0.333,0.333,0.333"], "which sums to 0.999"),
    (["--target", "-0.5,1.5"], "needs 2 shares in (0, 1)"),
    (["--lr", "-1e-3"], "--lr: must be 0 or more"),
    (["--reward", "shift", "--target", "0.3,0.7"], "--target: only used with --reward balance or soft_balance"),
    (["--truly-alpha", "2"], "--truly-alpha: only used with --trust-region truly"),
    (["--kl-threshold", "1e-4"], "--kl-threshold: only used with --trust-region truly"),
    (["--judge-group", "3"], "--judge-group: only used with --reward rank"),
    (["--judge-image-size", "64"], "--judge-image-size: only used with --labeller judge or --reward rank"),
    (["--underrepresented", "female"], "--underrepresented: only used with --reward shift"),
    (["--eval-images", "4"], "--eval-images: only used with --evaluate"),
])
def test_bad_or_unused_values_are_one_line_naming_the_flag(tmp_path, capsys, args, expected):
    """9: one rule for every flag that some settings ignore: refused, never silently ignored."""
    result = run_main(capsys, *args, "--output-dir", tmp_path / "run")
    assert one_error_line(result, expected.split(":")[0] if ":" in expected else "--target"), result.stderr
    assert expected in result.stderr and "expected one argument" not in result.stderr


def test_a_resumed_run_is_not_refused_for_what_its_config_json_derived(small_run, capsys):
    """config.json holds the derived δ (kl_threshold) of a clip run: not a flag the user gave at --resume."""
    assert json.loads((small_run / "config.json").read_text())["kl_threshold"] > 0
    assert dd.main(["--resume", str(small_run), "--epochs", "3"]) == 0


def test_sigterm_is_not_told_to_press_ctrl_c_again(capsys):
    with dd.graceful_stop() as received:
        os.kill(os.getpid(), 15)
        assert received == [15]
    err = capsys.readouterr().err
    assert "SIGTERM again" in err and "Ctrl-C again" not in err


# ---------------------------------------------------------------------------------------------- 10. --help
def test_help_is_grouped_and_names_numbers_not_internals():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "ddpo_debias.py"), "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    text = result.stdout
    grouped = [name for names in dd.HELP_GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(f.name for f in dd.dataclasses.fields(dd.Config))  # each flag, once
    for title in dd.HELP_GROUPS:
        assert f"\n{title}:\n" in text
    import re
    internals = re.findall(r"\b[A-Z][A-Z_]*_[A-Z_]+\b|\b[A-Z][a-z]+[A-Z]\w+\b|\b[a-z]+_[a-z_]+\(|rewards\.\w+|derived_sizes",
                           text.replace("JUDGE_API_KEY", "").replace("OpenAI", "").replace("LoRA", ""))
    assert internals == [], internals
    words = " ".join(text.split())
    assert f"{dd.HELD_OUT_IMAGES} images of each of the first {dd.HELD_OUT_PROMPTS} --eval-prompts" in words
    assert f"{dd.CLIP_TIMES_SQRT_N:.3g}/√(C·H·W)".replace("0.0128", "1.28e-2") in words
    assert len(text.splitlines()) < 200


# ---------------------------------------------------------------------------------------------- 11. --clip-model none
def test_evaluate_with_clip_model_none_gives_bias_only(tiny_sd, tiny_classifier, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("photo of the face of a nurse\nphoto of the face of a pilot\n")
    common = ["--evaluate", "--model", tiny_sd, "--classifier", tiny_classifier, "--eval-prompts", prompts,
              "--eval-images", "3", "--num-steps", "2", "--mixed-precision", "no", "--clip-model", "none"]
    assert run_main(capsys, *common, "--output-dir", tmp_path / "base").returncode == 0
    report = json.loads((tmp_path / "base" / "eval.json").read_text())
    assert report["overall"]["mean_clip_t"] is None and report["overall"]["mean_clip_i"] is None
    assert all(r["clip_t"] is None and r["n_images"] == 3 for r in report["prompts"])
    assert not (tmp_path / "base" / "eval_embeddings.pt").exists()
    again = run_main(capsys, *common, "--compare", tmp_path / "base" / "eval.json", "--output-dir", tmp_path / "again")
    assert again.returncode == 0, again.stderr


def test_eval_every_with_clip_model_none(tiny_sd, tiny_classifier, tmp_path):
    assert dd.main(["--model", tiny_sd, "--classifier", tiny_classifier, *TINY, "--eval-every", "1",
                    "--clip-model", "none", "--output-dir", str(tmp_path / "run")]) == 0
    held_out = [json.loads(line)["held_out"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(h["mean_clip_i"] is None and h["mean_clip_t"] is None and 0 <= h["none_rate"] <= 1 for h in held_out)


def test_a_cosine_is_never_above_one():
    """A self-comparison's CLIP-I printed 1.0000000298: the cosine of unit vectors, rounded past 1."""
    torch.manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(64, 16), dim=-1)
    report = rewards.quality_report(embeddings, embeddings[0], embeddings)
    assert max(report["clip_i_images"]) <= 1.0 and max(report["clip_t_images"]) <= 1.0
    assert report["clip_i"] == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------- 13. pictures, keys
def test_plot_labels_are_whole_and_inside_the_picture(tmp_path, monkeypatch):
    from PIL import ImageDraw
    drawn = []
    real = ImageDraw.ImageDraw.text

    def text(self, xy, message, *args, **kwargs):
        drawn.append((xy[0] + self.textlength(message), message, self.im.size[0]))
        return real(self, xy, message, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", text)
    held_out = {"mean_bias": 0.5, "none_rate": 0.1, "mean_clip_t": 0.3, "mean_clip_i": 0.9}
    metrics = [{"epoch": e, "reward_mean": -0.1, "shares": {"female": 0.2, "male": 0.8}, "held_out": held_out}
               for e in range(3)]
    rewards.save_plot(metrics, str(tmp_path / "plot.png"))
    labels = {message for _, message, _ in drawn}
    assert {"female", "male", "CLIP-T", "CLIP-I", "bias", "none"} <= labels
    assert all(right <= width for right, _, width in drawn), [d for d in drawn if d[0] > d[2]]


def test_metric_keys_do_not_follow_the_flags_spelling(tiny_sd, tmp_path):
    from tests.fixtures import make_tiny_classifier
    styles = str(make_tiny_classifier(tmp_path / "styles", labels=("Long", "Short")))
    assert dd.main(["--model", tiny_sd, "--classifier", styles, *TINY, "--classes", "LONG,Short",
                    "--output-dir", str(tmp_path / "run")]) == 0
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert "n_long" in first and "n_short" in first and "n_LONG" not in first
