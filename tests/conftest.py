"""Settings for every test process, and the order the tests run in.

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


def pytest_collection_modifyitems(items):
    """Files with slow tests run first. `make test` hands whole files to its processes in collection order, so
    the long files (Xinference boots, model training) start at once instead of one of them running alone at
    the end while the other process idles. Stable: the order inside each file, and of the rest, stays."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    yield
