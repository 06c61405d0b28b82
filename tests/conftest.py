import sys
from pathlib import Path

import pytest
import torch

# lets specs such as `toy_models:ResidualNet` name the small models in tests/toy_models.py
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (each rank of a 2-process test takes one core of a 2-core machine; tiny
    tensors only contend), the previous count restored after. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
