"""Settings for every test process.

One torch intra-op thread: the tests' models are a few hundred kilobytes, where a second thread gains
nothing, and its OpenMP workers spin-wait for each other between calls. On a shared 2-core machine
that spinning stalls whenever another process holds a core: the greedy-id comparisons of
tests/model/test_gguf.py took minutes instead of seconds that way. Set only where a test module has
imported torch already (importing it here would slow every test and hide an unwanted import), and
for this process only: the tools the tests start choose their own threads (tests/_llama_server.py
starts llama-server with one).
"""

from __future__ import annotations

import sys

import pytest


@pytest.fixture(autouse=True)
def _one_torch_thread():
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    yield
