"""How the referee's reading was chosen once each painting's colours are corrected through the VAE
(tests/referee.py, COLOUR_ROUNDS): ../refined/choose.py's faces and attacks, on a wider grid (at the first grid the
choice lay on its edge: FIT_RMS 0.04 and LEGIBLE 0.05, the least of each), by a rule with a margin: the bar of at
most 10% of each classifier's attacks read "female" must hold on attack sets the choice never saw, so the 95% Wilson
upper bound of each set's share (100 attacks: at most 4 read "female") is at most 10%. Among those settings, the
highest accuracy on the worse class, as before. Writes OUT.json. From the repository's root:

    python docs/benchmarks/2026-12-05-referee/colours/choose.py OUT.json
"""
import importlib.util
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("choose", os.path.join(HERE, "..", "refined", "choose.py"))
choose = importlib.util.module_from_spec(spec)
spec.loader.exec_module(choose)
choose.BANDS = dict(short=(0.35, 0.4, 0.45), long=(0.5, 0.55, 0.6, 0.65))
choose.FIT_RMS = (0.025, 0.03, 0.035, 0.04, 0.045, 0.05)
choose.LEGIBLE = (0.01, 0.02, 0.05, 0.1, 0.2)


def wilson_upper(share, n=100, z=1.96):
    """The upper end of the 95% Wilson score interval of a share of n."""
    centre, spread = share + z * z / (2 * n), z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    return (centre + spread) / (1 + z * z / n)


choose.allowed = lambda row: max(wilson_upper(v) for v in row["attacks_read_female"].values()) <= 0.10

if __name__ == "__main__":
    choose.main(sys.argv[1])
