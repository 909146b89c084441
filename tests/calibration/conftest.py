"""Calibration tests run tiny models: one intra-op thread is faster than two here (the tensors are a few KB, and on
a 2-core machine shared with other processes two threads mostly wait for each other), so these tests pin one."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
