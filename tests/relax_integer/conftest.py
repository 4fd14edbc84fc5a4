import zlib

import numpy as np
import pytest

from . import qdq


@pytest.fixture(autouse=True)
def _seeded(request):
    """Every test draws its own random data, the same whichever tests run before it."""
    qdq.RNG.bit_generator.state = np.random.default_rng(zlib.crc32(request.node.name.encode())).bit_generator.state
