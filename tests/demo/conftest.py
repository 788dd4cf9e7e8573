"""The demo model, trained once per pytest run for tests/demo (test_demo.py and test_quickstart.py)."""

from __future__ import annotations

import time

import pytest


@pytest.fixture(scope="session")
def demo_dirs(tmp_path_factory):
    """(out, base, adapter, seconds): build_demo's folder, its two returned paths and how long it took."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from builder.demo import model as demo

    out = tmp_path_factory.mktemp("demo")
    t0 = time.perf_counter()
    base, adapter = demo.build_demo(out, quiet=False)
    seconds = time.perf_counter() - t0
    print(f"\ndemo model built (tokenizer + base + two LoRAs' training + saving) in {seconds:.1f}s")
    return out, base, adapter, seconds


@pytest.fixture(scope="session")
def second(demo_dirs):
    """The second LoRA's folder."""
    from builder.demo import model as demo

    return demo.second_adapter(demo_dirs[0])
