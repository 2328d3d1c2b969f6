"""The refined referee's readings behind tests/test_learning.py's bars: ../learning_bars.py's runs (test_learning's
commands on seeds 0-4, each read by the world's referee over its last 4 and last 2 epochs: the minority's share,
female, or tall in the three-class world), with R_balance and R_balance with --purify 300 added. Writes
OUT/learning_bars.json. From the repository's root:

    python docs/benchmarks/2026-12-05-referee/refined/learning_bars.py OUT
"""
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("learning_bars", os.path.join(HERE, "..", "learning_bars.py"))
learning_bars = importlib.util.module_from_spec(spec)
spec.loader.exec_module(learning_bars)
learning_bars.READ = {"balance-clip": "female", "balance-purify": "female", **learning_bars.READ}

if __name__ == "__main__":
    learning_bars.main(sys.argv[1])
