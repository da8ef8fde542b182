"""Shared fixtures: the embedded model is loaded once per test session.

HOGWILD_TEST_DEVICE=cuda runs the device-aware tests (attention, tiny architectures) on a GPU;
the default is the CPU, which is what CI uses.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: unknown ids must fail fast

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device(os.environ.get("HOGWILD_TEST_DEVICE", "cpu"))


@pytest.fixture(scope="session")
def model():
    from hogwild import load_model

    return load_model(None)


@pytest.fixture
def runner(model):
    from hogwild import Runner

    return Runner.for_model(model)
