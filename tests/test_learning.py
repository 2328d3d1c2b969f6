"""Learning, not just running: on the toy world (tests/toyworld.py), a model that learnt its 15% "female" skew from
data, R_balance brings the female ratio q to 0.5 and keeps it there, and R_shift with U = female takes it past 0.8,
with both trust regions, while the faces stay faces.

Every run is the real CLI on the shipped world, checked against the same run at --lr 0 (same seed, so the same
noise): that control must fail each check, so each check is a test. At lr 0 the weights never change, so one
control serves every reward and trust region: its images and labels are the same for all of them.

Settings (toyworld.SETTINGS, shared with the demo; README "The toy world" has the runs behind them): B = 64 images
of T = 5 DDIM steps, seed 0, ε and δ derived from the 4x8x8 latent as on SD, the last two steps not trained (the
default --skip-final-steps 2; with them no setting tried learnt in under 10 epochs on every seed).
- R_balance: 4 updates of 16 images an epoch at lr 5e-4. Its standardised advantages push as hard at q = 0.45 as
  at 0.15, and q moves fastest near 0.5, so it overshoots: 2 updates at lr 1e-3-2e-3 reached 0.5 sooner but
  overshot to 0.70-0.79 on some seeds (the check allows 0.7).
- R_shift (toyworld.SHIFT_SETTINGS): q only has to rise, so 2 updates of 32 at lr 1.5e-3. It passed 0.8 by epochs
  10-14 on seeds 0-2.
An epoch takes about 3.5 s at one thread; the five runs take about 2.5 minutes side by side on 2 cores.
"""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests import toyworld

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 16
SHIFT = ["--reward", "shift", "--underrepresented", "female"]
RUNS = {  # name: (settings, flags)
    "balance-clip": (toyworld.SETTINGS, ["--reward", "balance", "--trust-region", "clip"]),
    "balance-truly": (toyworld.SETTINGS, ["--reward", "balance", "--trust-region", "truly"]),
    "shift-clip": (toyworld.SHIFT_SETTINGS, SHIFT + ["--trust-region", "clip"]),
    "shift-truly": (toyworld.SHIFT_SETTINGS, SHIFT + ["--trust-region", "truly"]),
    "control": (toyworld.SHIFT_SETTINGS, SHIFT + ["--lr", "0"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> that run's metrics. The five runs go at once, one thread each: a UNet this small keeps one core
    busy, so runs side by side finish sooner than one after another on two threads."""
    out, world = tmp_path_factory.mktemp("learning"), toyworld.SHIPPED

    def train(name):
        settings, flags = RUNS[name]
        args = [*(f"--{k.replace('_', '-')}={v}" for k, v in settings.items()), "--model", world, "--classifier",
                os.path.join(world, "classifier"), "--seed", "0", "--epochs", str(EPOCHS), *flags,
                "--output-dir", str(out / name)]
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "ddpo_debias.py"), *args], cwd=ROOT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        with open(out / name / "metrics.jsonl") as f:
            return [json.loads(line) for line in f]
    with ThreadPoolExecutor(len(RUNS)) as pool:
        return dict(zip(RUNS, pool.map(train, RUNS)))


def ratios(metrics):
    return [m["female_ratio"] if m["female_ratio"] is not None else 0.0 for m in metrics]  # None: no F or M label


def balances(q, follow=3):
    """q comes within 0.1 of 0.5 and stays within 0.2 of it for every epoch after (at least `follow` of them)."""
    near = [e for e, value in enumerate(q) if abs(value - 0.5) <= 0.1]
    return bool(near) and len(q) - 1 - near[0] >= follow and all(abs(value - 0.5) <= 0.2 for value in q[near[0]:])


def shifted(q):
    """q is at least 0.8 over the last two epochs (128 images)."""
    return sum(q[-2:]) / 2 >= 0.8


@pytest.mark.parametrize("trust_region", ["clip", "truly"])
def test_r_balance_brings_the_female_ratio_to_half_and_keeps_it_there(runs, trust_region):
    learned, control = ratios(runs[f"balance-{trust_region}"]), ratios(runs["control"])
    assert balances(learned), learned
    assert not balances(control), control  # the same check fails when nothing is learnt
    assert sum(control) / len(control) < 0.3, control  # the world is biased, and stays so at lr 0


@pytest.mark.parametrize("trust_region", ["clip", "truly"])
def test_r_shift_takes_the_female_ratio_past_0_8(runs, trust_region):
    learned, control = ratios(runs[f"shift-{trust_region}"]), ratios(runs["control"])
    assert shifted(learned), learned
    assert not shifted(control), control


@pytest.mark.parametrize("name", list(RUNS))
def test_the_faces_stay_faces(runs, name):
    """'None' (no label above 0.7) stays under 25% in every epoch: the method does not buy its reward with images
    the classifier cannot read, as R_shift at too high a learning rate did (README "The toy world")."""
    nones = [m["n_none"] / (m["n_female"] + m["n_male"] + m["n_none"]) for m in runs[name]]
    assert max(nones) < 0.25, nones


@pytest.mark.parametrize("name", ["balance-truly", "shift-truly"])
def test_truly_ppo_rolls_back_but_never_in_the_first_update(runs, name):
    """The rollback acts, but not in an epoch's first update, which is on-policy (KL = 0 < δ): in no epoch on more
    than a share 1 - 1/updates_per_epoch of the steps."""
    updates = RUNS[name][0]["updates_per_epoch"]
    fractions = [m["rollback_frac"] for m in runs[name] if m["rollback_frac"] is not None]  # None: no update
    assert sum(fractions) > 0 and max(fractions) <= 1 - 1 / updates, fractions
