import pytest
import torch

from hyq_tvm import zoo


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture
def proxy():
    """Name of the smallest embedded proxy checkpoint."""
    name = "mobilevit_xxs"
    assert zoo.proxy_checkpoint(name).is_file(), "the embedded proxy checkpoint is missing"
    return name
