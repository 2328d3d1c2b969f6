"""ddpo_debias.py's CLI, run under torchrun (or alone) by tests/test_distributed.py, that also saves what this rank
computed: `python -m tests.dist_worker DUMP_DIR FLAGS...` writes DUMP_DIR/rank<R>.pt with the rank's metrics, the
advantages of every epoch, and its trained weights after the last epoch."""
import os
import sys

import torch

import ddpo_debias as dd

seen = {"advantages": [], "metrics": None, "weights": None}
compute_advantages, update, train = dd.compute_advantages, dd.update, dd.train


def record_advantages(*args, **kwargs):
    advantages = compute_advantages(*args, **kwargs)
    seen["advantages"].append(advantages.tolist())
    return advantages


def record_weights(unet, *args, **kwargs):
    result = update(unet, *args, **kwargs)
    seen["weights"] = dd.trained_weights(unet)
    return result


def record_metrics(config, classifier=None):
    seen["metrics"] = train(config, classifier)
    return seen["metrics"]


if __name__ == "__main__":
    dd.compute_advantages, dd.update, dd.train = record_advantages, record_weights, record_metrics
    dump, flags = sys.argv[1], sys.argv[2:]
    code = dd.main(flags)
    torch.save(seen, os.path.join(dump, f"rank{os.environ.get('RANK', 0)}.pt"))
    sys.exit(code)
