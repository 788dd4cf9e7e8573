"""The llama.cpp image of a vision-language model: the mmproj is a layer of its own, the same one in the runtime
and in the weights image (so the registry stores it once and the model artifacts can copy it out)."""

from __future__ import annotations

import pytest
from test_build import _env, _stage


def test_the_mmproj_layer_is_in_the_runtime_and_the_weights_image(tmp_path):
    pytest.importorskip("torch")
    from builder.demo.tiny_vision import make_random_qwen2_vl
    from builder.image.render import render_text
    from builder.selection import select_backends
    from builder.spec import load_spec, read_model_config

    folder = make_random_qwen2_vl(tmp_path / "vl")
    spec = load_spec({"model": str(folder), "backends": "llamacpp"})
    text = render_text(spec, select_backends(spec, read_model_config(spec)))["Dockerfile.llamacpp"]
    runtime, engine, weights = _stage(text, "runtime"), _stage(text, "engine"), _stage(text, "weights")
    copy = "COPY --from=mmproj /w/ /"
    assert weights == ["COPY --from=gguf /w/ /", copy]
    assert runtime.index("COPY --from=gguf /w/ /") < runtime.index(copy)
    assert copy not in engine  # model-independent: the mmproj comes with the mounted weights
    assert "LLAMA_ARG_MMPROJ=/models/mmproj.gguf" in _env(runtime)
