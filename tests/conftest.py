"""Fixtures shared by the stage tests: scikit-learn's digits and a small model trained on it."""
import pytest
import torch

from deepcompress.models import digits_mlp
from deepcompress.tasks import load_task
from deepcompress.train import TrainConfig, fit


@pytest.fixture(scope="module")
def task():
    """The digits task (bundled with scikit-learn)."""
    return load_task("digits")


@pytest.fixture(scope="module")
def trained(task):
    """LeNet-300-100 for 8x8 digits after 4 epochs (one per test module, so tests may change it)."""
    torch.manual_seed(0)
    model = digits_mlp()
    fit(model, task, TrainConfig(epochs=4, lr=0.05, quiet=True))
    return model
