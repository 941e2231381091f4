import pytest
import torch

from resinspect.data import load_data


@pytest.fixture(scope="session")
def digits():
    return load_data("digits")


@pytest.fixture(scope="session")
def digits8():
    """8×8 digits: the fastest real dataset, for tests that only need something to train on."""
    return load_data("digits", size=8)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
