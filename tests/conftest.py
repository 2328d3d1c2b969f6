"""Session fixtures: tiny pipelines and classifiers built once per test session, fully offline."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach a hub, also in the CLI subprocesses (they inherit it)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest

from tests.fixtures import make_tiny_classifier, make_tiny_clip, make_tiny_sd


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_sd(models_dir):
    return str(make_tiny_sd(models_dir / "tiny-sd"))


@pytest.fixture(scope="session")
def tiny_classifier(models_dir):
    return str(make_tiny_classifier(models_dir / "tiny-classifier"))


@pytest.fixture(scope="session")
def tiny_clip(models_dir):
    return str(make_tiny_clip(models_dir / "tiny-clip"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_sd, tiny_classifier):
    """A finished run of the tiny models (tests.test_cli.TINY: 2 epochs), for tests that resume or inspect one."""
    import ddpo_debias
    from tests.test_cli import TINY
    out = tmp_path_factory.mktemp("finished") / "run"
    assert ddpo_debias.main(["--model", tiny_sd, "--classifier", tiny_classifier, *TINY, "--output-dir", str(out)]) == 0
    return out
