"""The readings behind tests/test_learning.py's bars once the referee corrects its paintings' colours through the VAE:
../refined/learning_bars.py's runs (test_learning's commands on seeds 0-4, read by the world's referee over their
last 4 and last 2 epochs) with R_balance under Truly PPO added, since by this referee R_balance's runs and their lr-0
controls overlap, and the test compares each run with the same seed's control. Writes OUT/learning_bars.json. From
the repository's root:

    python docs/benchmarks/2026-12-05-referee/colours/learning_bars.py OUT
"""
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("refined", os.path.join(HERE, "..", "refined", "learning_bars.py"))
refined = importlib.util.module_from_spec(spec)
spec.loader.exec_module(refined)
refined.learning_bars.READ = {"balance-truly": "female", **refined.learning_bars.READ}

if __name__ == "__main__":
    refined.learning_bars.main(sys.argv[1])
