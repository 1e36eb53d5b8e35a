"""Thread limits for tiny models."""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def one_thread():
    """Run the block on one intra-op thread: tiny models run several times faster so, because a second thread
    costs more in start-up and contention than it saves. The previous count comes back afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
