"""Learning, not just running: on the toy world (tests/toyworld.py), a model that learnt its 15% "female" skew from
data, R_balance brings the female ratio q to 0.5 and keeps it there, and R_shift with U = female takes it past 0.8,
with both trust regions, while the faces stay faces. On the two-prompt world, q per prompt balances both prompts
where the paper's q over the batch keeps them skewed in opposite directions (docs/many-prompts.md).

Every run is the real CLI on the shipped world, checked against the same run at --lr 0 (same seed, so the same
noise): that control must fail each check, so each check is a test. Each check is read by the reward's classifier
and, for the shares moving, by the world's referee too (tests/referee.py, --independent-classifier
tests.referee:Referee), which reads the hair from the world's own painter and never rewards; it reads a run's last
READ_LAST epochs, the most any check reads (`stages`: the run resumed, bit for bit). At lr 0 the weights never
change, so one control serves every reward and trust region: its images and labels are the same for all of them.
The two-prompt check's control is the batch's q, which must fail it.

Settings (toyworld.SETTINGS, shared with the demo; docs/toy-world.md has the runs behind them, on seeds 0-2):
B = 64 images of T = 5 DDIM steps, seed 0, ε and δ derived from the 4x8x8 latent as on SD, the last two steps not
trained (the default --skip-final-steps 2; training them, no setting tried learnt in under 10 epochs on every seed).
- R_balance: 4 updates of 16 images an epoch at lr 5e-4. Its standardised advantages push as hard at q = 0.45 as
  at 0.15, and q moves fastest near 0.5, so it overshoots: 2 updates at lr 1e-3 to 2e-3 reached 0.5 sooner but
  swung to 0.70-0.79 on some seeds (the check allows 0.7). At 16 epochs every seed reached 0.5 by epoch 9.
- R_shift (toyworld.SHIFT_SETTINGS): q only has to rise, so 2 updates of 32 at lr 1.5e-3. It passed 0.8 by epochs
  9-13 on seeds 0-2.
- The three-class world (docs/classes.md), R_balance at toyworld.THREE_SETTINGS (lr 1e-3): every class came within
  0.1 of 1/3 (2-epoch windows) by epochs 4-7 on 4 of seeds 0-4 and by 16-17 on seed 2, and stayed within 0.2.
The ten runs (152 epochs) go two at a time; docs/tests.md has the suite's time.
"""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests import toyworld

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS, TWO_EPOCHS = 16, 12
READ_LAST = 4  # the referee reads the last 4 epochs of a run (stages): the most any check reads
# Every run is also read by the world's referee (the hair, read by fitting the world's own painter; no weights,
# never rewarding): a learning test reads the shares move by it too, so a run that only fools its reward cannot pass.
JUDGE = ["--independent-classifier=tests.referee:Referee"]
SHIFT = ["--reward", "shift", "--underrepresented", "female", *JUDGE]
THREE = [*toyworld.THREE_FLAGS, "--reward", "balance", *JUDGE]  # the three-class world
RUNS = {  # name: (settings, flags) of a run of ddpo_debias.py on the world
    "balance-clip": (toyworld.SETTINGS, ["--reward", "balance", "--trust-region", "clip", *JUDGE]),
    "balance-truly": (toyworld.SETTINGS, ["--reward", "balance", "--trust-region", "truly", *JUDGE]),
    "balance-purify": (toyworld.SETTINGS, ["--reward", "balance", "--purify", "300", *JUDGE]),
    "shift-clip": (toyworld.SHIFT_SETTINGS, SHIFT + ["--trust-region", "clip"]),
    "shift-truly": (toyworld.SHIFT_SETTINGS, SHIFT + ["--trust-region", "truly"]),
    "control": (toyworld.SHIFT_SETTINGS, SHIFT + ["--lr", "0"]),
    "three": (toyworld.THREE_SETTINGS, THREE),
    "three-control": (toyworld.THREE_SETTINGS, THREE + ["--lr", "0"]),
}
TWO = ("two-prompt", "two-batch")  # the two-prompt world with q per prompt, and with the paper's q over the batch


def command(name, out):
    """The argv (after `python`) of run `name`, writing its run folder to `out`."""
    if name in TWO:  # toyworld.two: the CLI on both prompts, at SETTINGS
        return ["-m", "tests.toyworld", "two", out, "--scope", name[4:], "--epochs", str(TWO_EPOCHS)]
    settings, flags = RUNS[name]
    return [os.path.join(ROOT, "ddpo_debias.py"), *toyworld.cli_flags(settings), "--seed", "0", "--epochs",
            str(EPOCHS), *flags, "--output-dir", out]


def stages(name, out):
    """command(name, out) as the suite runs it. A run the referee reads trains its first EPOCHS - READ_LAST epochs
    without the referee, then goes on with --resume and the referee: the resume is the run uninterrupted, bit for bit
    (tests/test_cli.py), the referee never touches training, no check reads an earlier epoch's referee, and on a
    learnt run the referee takes longer than the epoch's sampling and update. -> the argvs, in order."""
    argv = command(name, out)
    if JUDGE[0] not in argv:
        return [argv]
    first = [arg for arg in argv if arg != JUDGE[0]]
    first[first.index("--epochs") + 1] = str(EPOCHS - READ_LAST)
    return [first, [argv[0], "--resume", out, "--epochs", str(EPOCHS), *JUDGE]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> that run's metrics. The ten runs go two at a time, the longest first, one thread each: a UNet
    this small keeps one core busy, so two runs side by side finish sooner than one after another on two threads
    (and sooner than nine at once, which fight over the caches)."""
    out = tmp_path_factory.mktemp("learning")

    def train(name):
        for argv in stages(name, str(out / name)):
            proc = subprocess.run([sys.executable, *argv], cwd=ROOT, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
            assert proc.returncode == 0, proc.stderr[-2000:]
        with open(out / name / "metrics.jsonl") as f:
            return [json.loads(line) for line in f]
    names = ["three", "three-control", *[n for n in RUNS if not n.startswith("three")], *TWO]  # longest first
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(names, pool.map(train, names)))


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


def independent_share(metrics, cls, last, classes=("female", "male")):
    """cls's share of the labelled images of the last `last` epochs, read by the world's referee."""
    return toyworld.pooled_shares([m["independent"] for m in metrics[-last:]], classes, last)[0][1][cls]


def labelled(metrics, last):
    """The share of the last `last` epochs' images that the world's referee labels (the rest: "none")."""
    return 1 - toyworld.pooled_shares([m["independent"] for m in metrics[-last:]], ("female", "male"), last)[0][2]


# Read by the referee, which never gave the reward, the shares move, though far less than the reward's reading says,
# and the referee refuses many of the learnt faces (docs/benchmarks.md: the reward's classifier is mostly fooled).
# Each bar is the midpoint between the lr-0 control's highest share and the learnt runs' lowest over seeds 0-4, by
# the referee, counting a seed only where the referee labels at least 5% of the images read (a share of fewer faces
# says nothing) (docs/benchmarks/2026-12-05-referee/colours/learning_bars.py and .json):
# - R_balance, female over the last 4 epochs: the control reads 0.07-0.17 and the learnt runs 0.18-0.52 (clip) and
#   0.13-0.44 (Truly PPO): they overlap, so the bar is on the difference from the same seed's control (the same
#   noise), whose own difference is 0: learnt 0.007-0.39 above it (least: Truly PPO on seed 3) -> 0.0035. A weak
#   bar, and the reading it rests on: at these settings R_balance hardly moves the real hair on some seeds.
# - --purify 300: control 0.07-0.17, learnt 0.23-0.47 -> 0.20.
# - R_shift, over the last 2 epochs: control 0.06-0.18; the referee labels 5% or more of the learnt faces only on
#   seeds 0 and 4 (1-8% elsewhere: R_shift breaks the faces it pays for), all long-haired -> 0.59; the test also
#   asks for that 5%.
# - The three-class world's rarest (tall), over the last 4: control 0.11-0.14, learnt 0.19-0.31 on seeds 0, 1, 3, 4
#   (on seed 2 the run breaks the faces: 98% "none") -> 0.167.
@pytest.mark.parametrize("trust_region", ["clip", "truly"])
def test_the_referee_sees_r_balance_raise_the_minority(runs, trust_region):
    learned = independent_share(runs[f"balance-{trust_region}"], "female", 4)
    control = independent_share(runs["control"], "female", 4)
    assert learned - control >= 0.0035, (learned, control)


@pytest.mark.parametrize("trust_region", ["clip", "truly"])
def test_the_referee_sees_r_shift_raise_u(runs, trust_region):
    learned = independent_share(runs[f"shift-{trust_region}"], "female", 2)
    control = independent_share(runs["control"], "female", 2)
    assert labelled(runs[f"shift-{trust_region}"], 2) >= 0.05 and learned >= 0.59 > control, (learned, control)


def test_the_referee_sees_r_balance_on_the_base_models_redraw_raise_the_minority(runs):
    """--purify 300 (the reward reads each image as the base model redraws it)."""
    learned = independent_share(runs["balance-purify"], "female", 4)
    control = independent_share(runs["control"], "female", 4)
    assert learned >= 0.20 > control, (learned, control)


def test_the_referee_sees_the_rarest_of_three_classes_rise(runs):
    classes = tuple(toyworld.THREE)
    learned = independent_share(runs["three"], "tall", 4, classes)
    control = independent_share(runs["three-control"], "tall", 4, classes)
    assert learned >= 0.167 > control, (learned, control)


@pytest.mark.parametrize("name", [*[n for n in RUNS if not n.startswith("three")], *TWO])
def test_the_faces_stay_faces(runs, name):
    """'None' (no label above 0.7) stays under 25% in every epoch: the method does not buy its reward with images
    the classifier cannot read, as R_shift at too high a learning rate did (docs/toy-world.md)."""
    nones = [m["n_none"] / m["n_images"] for m in runs[name]]
    assert max(nones) < 0.25, nones


@pytest.mark.parametrize("name", ["balance-truly", "shift-truly"])
def test_truly_ppo_rolls_back_but_never_in_the_first_update(runs, name):
    """The rollback acts, but not in an epoch's first update, which is on-policy (KL = 0 < δ): in no epoch on more
    than a share 1 - 1/updates_per_epoch of the steps."""
    updates = RUNS[name][0]["updates_per_epoch"]
    fractions = [m["rollback_frac"] for m in runs[name] if m["rollback_frac"] is not None]  # None: no update
    assert sum(fractions) > 0 and max(fractions) <= 1 - 1 / updates, fractions


def prompt_ratios(metrics, last):
    """Each prompt's female ratio over its images of the last `last` epochs (metrics' per-prompt counts)."""
    rows = [row for m in metrics[-last:] for row in m["per_prompt"]]
    counts = {p: [sum(r[k] for r in rows if r["prompt"] == p) for k in ("n_female", "n_male")]
              for p in toyworld.TWO_PROMPTS}
    return {p: f / (f + m) for p, (f, m) in counts.items()}


def test_q_per_prompt_balances_both_prompts_where_the_batch_q_keeps_them_apart(runs):
    """Issue 14's point, on the two-prompt world (nurses drawn 0.77 "female", engineers 0.10): R_balance with q per
    prompt brings both to within 0.1 of 0.5 (over each prompt's 192 images of the last 6 epochs); with the paper's
    q over the batch (0.44, so "female" is the minority for both) the nurses are pushed further from 0.5 and the
    prompts stay skewed in opposite directions, which fails the same check."""
    nurse, engineer = toyworld.TWO_PROMPTS
    per_prompt, batch = prompt_ratios(runs["two-prompt"], 6), prompt_ratios(runs["two-batch"], 6)
    assert all(abs(q - 0.5) <= 0.1 for q in per_prompt.values()), per_prompt
    assert not all(abs(q - 0.5) <= 0.1 for q in batch.values()), batch
    assert batch[nurse] >= 0.65 and batch[engineer] <= 0.35, batch


def thirds(metrics):
    """Every class's share, pooled over 2-epoch windows (128 images: one epoch's share of a class at 1/3 swings by
    ±0.06 at B = 64), comes within 0.1 of 1/3 and stays within 0.2 of it in every window after (at least 2)."""
    shares = [s for _, s, _ in toyworld.pooled_shares(metrics, list(toyworld.THREE), 2)]
    off = [max(abs(v - 1 / 3) for v in s.values()) if s else 1.0 for s in shares]  # the worst class per window
    near = [w for w, o in enumerate(off) if o <= 0.1]
    return bool(near) and len(off) - 1 - near[0] >= 2 and all(o <= 0.2 for o in off[near[0]:])


def test_r_balance_brings_three_classes_to_a_third_each(runs):
    """The three-class world (hair short/long/tall drawn about 70/20/10) with --classes short,long,tall: the
    generalised R_balance (t_c - p̂_c) brings every class to within 0.1 of 1/3 and keeps it within 0.2, and the
    same run at lr 0 fails the same check (docs/classes.md)."""
    assert thirds(runs["three"]), [m["shares"] for m in runs["three"]]
    none = {name: sum(m["n_none"] for m in runs[name]) / sum(m["n_images"] for m in runs[name]) for name in
            ("three", "three-control")}  # this world's classifier reads fewer samples than the two-class world's
    assert none["three"] <= none["three-control"] + 0.05, none  # faces as readable as the untrained world's
    assert not thirds(runs["three-control"]), [m["shares"] for m in runs["three-control"]]
    first = toyworld.pooled_shares(runs["three-control"], list(toyworld.THREE), len(runs["three-control"]))[0][1]
    assert first["short"] > 0.55 and first["tall"] < 0.2, first  # the world is skewed, and stays so at lr 0
