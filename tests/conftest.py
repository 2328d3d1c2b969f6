"""Session fixtures: tiny pipelines and classifiers built once per test session, fully offline."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach a hub, also in the CLI subprocesses (they inherit it)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest

from tests.fixtures import make_tiny_classifier, make_tiny_sd


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_sd(models_dir):
    return str(make_tiny_sd(models_dir / "tiny-sd"))


@pytest.fixture(scope="session")
def tiny_classifier(models_dir):
    return str(make_tiny_classifier(models_dir / "tiny-classifier"))
