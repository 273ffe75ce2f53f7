"""Fixtures shared by the glip tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def single_thread():
    """One intra-op thread: on the shared 2-core machine a second thread costs more than it gives (0.16 s vs
    0.41 s per tiny training step, measured under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
