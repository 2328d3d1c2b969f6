"""The real CLI as a subprocess on the tiny local models: outputs, saved UNet, bad input, resume."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--epochs", "2", "--batch-size", "4", "--num-steps", "3", "--mixed-precision", "no"]


def run_cli(*args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "ddpo_debias.py"), *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def wait_for(predicate, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline and not predicate():
        time.sleep(0.05)


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_grad_norm_is_logged_before_clipping(tiny_sd, tiny_classifier, tmp_path):
    """The logged norm is the update's size before --max-grad-norm clips it: far above a tiny clip."""
    import ddpo_debias as dd
    code = dd.main(["--model", tiny_sd, "--classifier", tiny_classifier, "--reward", "shift", "--lr", "1e-3",
                    "--max-grad-norm", "1e-9", "--output-dir", str(tmp_path / "run"), *TINY])
    assert code == 0
    norms = [n for m in read_metrics(tmp_path / "run") for n in m["grad_norm"]]
    assert len(norms) == 4 and min(norms) > 1e-6, norms


@pytest.mark.parametrize("reward, trust_region", [("balance", "clip"), ("shift", "truly")])
def test_cli_end_to_end(tiny_sd, tiny_classifier, tmp_path, reward, trust_region):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    out = tmp_path / "run"
    result = run_cli("--model", tiny_sd, "--classifier", tiny_classifier, "--reward", reward, "--trust-region",
                     trust_region, "--output-dir", out, "--lr", "1e-3", "--profile", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(out)
    assert [m["epoch"] for m in metrics] == [0, 1]
    for key in ("reward_mean", "reward_std", "female_ratio", "n_female", "n_male", "n_none", "loss", "approx_kl",
                "clipfrac", "kl", "rollback_frac", "sample_seconds", "train_seconds", "train_tflops"):
        assert key in metrics[0], key
    assert metrics[0]["n_female"] + metrics[0]["n_male"] + metrics[0]["n_none"] == 4
    assert metrics[1]["kl"] > 0  # the second epoch's policy differs from the first
    for m in metrics:  # one gradient norm per optimizer step (2 a epoch by default), or none without an update;
        # the first update is on-policy (r = 1, nothing clipped), the second may have every sample clipped (norm 0)
        assert m["grad_norm"] is None if m["equal_rewards"] else (len(m["grad_norm"]) == 2 and m["grad_norm"][0] > 0
                                                                   and min(m["grad_norm"]) >= 0)
    if reward == "shift":
        assert metrics[0]["underrepresented"] in ("female", "male") and "under-represented" in result.stdout
    for name in ("samples_0000.png", "samples_0001.png", "plot.png", "config.json", "checkpoint.pt"):
        assert (out / name).exists(), name
    # the saved UNet loads, its attention weights changed and no other weight did
    before = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").state_dict()
    after = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    attention = {k for k in before if any(p in k for p in (".to_q.", ".to_k.", ".to_v.", ".to_out.0."))}
    assert changed and changed <= attention and len(changed) > len(attention) // 2
    # and it drops into a StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, unet=UNet2DConditionModel.from_pretrained(out / "unet"),
                                                   safety_checker=None, requires_safety_checker=False)
    image = pipe("a face", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 16, 16, 3)


@pytest.mark.parametrize("args, flag", [
    (["--prompt", " "], "--prompt"),
    (["--reward", "fairness"], "--reward"),
    (["--trust-region", "kl"], "--trust-region"),
    (["--underrepresented", "both"], "--underrepresented"),
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--num-steps", "0"], "--num-steps"),
    (["--eta", "0"], "--eta"),
    (["--lr", "-1"], "--lr"),
    (["--epochs", "two"], "--epochs"),
    (["--model", "/nonexistent/sd"], "--model"),
    (["--device", "cuda"], "--device"),
    (["--batch-size", "12", "--train-batch-size", "4"], "--train-batch-size"),  # 6 images per update: unequal
    (["--kl-threshold", "-1"], "--kl-threshold"),
    (["--truly-alpha", "0"], "--truly-alpha"),
    (["--truly-alpha", "-2"], "--truly-alpha"),
    (["--eta", "1.5"], "--eta"),
    (["--guidance-scale", "0"], "--guidance-scale"),
    (["--guidance-scale", "-3"], "--guidance-scale"),
    (["--clip-range", "1"], "--clip-range"),
    (["--adv-clip", "0"], "--adv-clip"),
    (["--lr", "inf"], "--lr"),
    (["--guidance-scale", "nan"], "--guidance-scale"),
    (["--underrepresented", "female", "--reward", "balance"], "--underrepresented"),
    (["--device", "banana"], "--device"),
    (["--device", "mps"], "--device"),
    (["--device", "cpu:1"], "--device"),
    (["--num-steps", "2000"], "--num-steps"),
    (["--mixed-precision", "fp8"], "--mixed-precision"),
    (["--compare", "eval.json"], "--compare"),  # only with --evaluate
    (["--skip-final-steps", "-1"], "--skip-final-steps"),
    (["--num-steps", "2"], "--skip-final-steps"),  # the default 2 would leave no step to train
])
def test_bad_input_one_line_exit_2(tiny_sd, tiny_classifier, tmp_path, capsys, args, flag):
    """In-process through main() (the CLI's own entry point), to keep the suite fast; one subprocess below."""
    import ddpo_debias
    if flag == "--device" and torch.cuda.is_available():
        pytest.skip("this check needs a machine without a GPU")  # never the case in CI
    base = ["--model", tiny_sd, "--classifier", tiny_classifier, "--output-dir", str(tmp_path / "run"), *TINY]
    try:
        code = ddpo_debias.main(base + args)
    except SystemExit as exit:  # argparse's own errors exit from inside parse_args
        code = exit.code
    stderr = capsys.readouterr().err
    assert code == 2, stderr[-2000:]
    lines = [l for l in stderr.splitlines() if "error" in l]
    assert len(lines) == 1 and flag in lines[0], stderr[-2000:]
    assert not (tmp_path / "run" / "config.json").exists()  # nothing was started


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    result = run_cli("--epochs", "0", "--output-dir", tmp_path / "run")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "--epochs" in result.stderr


def test_model_folder_that_is_not_a_pipeline(tiny_classifier, tmp_path):
    result = run_cli("--model", tiny_classifier, "--output-dir", tmp_path / "run", *TINY)
    assert result.returncode == 2 and "--model" in result.stderr and "not a Stable Diffusion" in result.stderr


def test_hub_id_offline_gives_a_hint(tmp_path):
    result = run_cli("--model", "nobody/no-such-model", "--output-dir", tmp_path / "run", *TINY)
    assert result.returncode == 2 and "--model" in result.stderr and "HF_HUB_OFFLINE" in result.stderr
    assert "Traceback" not in result.stderr


def test_classifier_without_gender_labels(tiny_sd, models_dir, tmp_path):
    from tests.fixtures import make_tiny_classifier
    path = make_tiny_classifier(models_dir / "cli-catdog", labels=("cat", "dog"))
    result = run_cli("--model", tiny_sd, "--classifier", path, "--output-dir", tmp_path / "run", *TINY)
    assert result.returncode == 2 and "--classifier" in result.stderr and "cat, dog" in result.stderr


def test_unwritable_output_dir(tiny_sd, tiny_classifier, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run_cli("--model", tiny_sd, "--classifier", tiny_classifier, "--output-dir", blocker / "run", *TINY)
    assert result.returncode == 2 and "--output-dir" in result.stderr and "Traceback" not in result.stderr


def test_long_prompt_is_truncated_with_a_warning(tiny_sd, tiny_classifier, tmp_path):
    result = run_cli("--model", tiny_sd, "--classifier", tiny_classifier, "--output-dir", tmp_path / "run",
                     "--prompt", "face " * 100, "--epochs", "1", "--batch-size", "2", "--num-steps", "3",
                     "--mixed-precision", "no")
    assert result.returncode == 0 and "truncated" in result.stderr


def test_resume_after_sigkill_matches_uninterrupted_run(tiny_sd, tiny_classifier, tmp_path):
    args = ["--model", tiny_sd, "--classifier", tiny_classifier, "--epochs", "4", "--batch-size", "4",
            "--num-steps", "3", "--mixed-precision", "no", "--lr", "1e-3", "--reward", "shift", "--save-every", "1"]
    full = tmp_path / "full"
    assert run_cli(*args, "--output-dir", full).returncode == 0
    killed = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "ddpo_debias.py"), *args, "--output-dir", str(killed)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: (killed / "checkpoint.pt").exists())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = torch.load(killed / "checkpoint.pt", weights_only=False)["epoch"]
    assert done_before < 3, "the run finished before it could be killed"
    # without --resume the folder is refused; with it the run continues
    refused = run_cli(*args, "--output-dir", killed)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = run_cli("--resume", killed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(killed, full)


def assert_same_run(one, other):
    """Two run folders hold the same metrics (timings aside) and the same final UNet, to the bit."""
    timing = ("sample_seconds", "reward_seconds", "train_seconds", "images_per_second")
    strip = lambda ms: [{k: v for k, v in m.items() if k not in timing} for m in ms]
    assert strip(read_metrics(one)) == strip(read_metrics(other))
    from diffusers import UNet2DConditionModel
    a = UNet2DConditionModel.from_pretrained(other / "unet").state_dict()
    b = UNet2DConditionModel.from_pretrained(one / "unet").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigint_saves_a_checkpoint_and_resume_finishes(tiny_sd, tiny_classifier, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "ddpo_debias.py"), "--model", tiny_sd, "--classifier",
                             tiny_classifier, "--epochs", "50", "--batch-size", "4", "--num-steps", "3",
                             "--mixed-precision", "no", "--save-every", "100", "--output-dir", str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip())
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    state = torch.load(out / "checkpoint.pt", weights_only=False)  # save_every 100: only the Ctrl-C saved it
    assert state["epoch"] < 49 and len(state["metrics"]) == state["epoch"] + 1
    resumed = run_cli("--resume", out, "--epochs", str(state["epoch"] + 2))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(read_metrics(out)) == state["epoch"] + 2 and (out / "unet").exists()
