"""The llama.cpp image of a vision-language model: the mmproj is a layer of its own, the same one in the runtime
and in the weights image (so the registry stores it once and the model artifacts can copy it out)."""

from __future__ import annotations

import pytest


def _targets(dockerfile: str) -> dict[str, str]:
    """{stage name: its instructions} of a rendered Dockerfile."""
    stages = {}
    for block in dockerfile.split("\nFROM ")[1:]:
        header, _, body = block.partition("\n")
        stages[header.rsplit(" AS ", 1)[-1].strip()] = body
    return stages


def test_the_mmproj_layer_is_in_the_runtime_and_the_weights_image(tmp_path):
    pytest.importorskip("torch")
    from builder.demo.tiny_vision import make_random_qwen2_vl
    from builder.image.render import render_text
    from builder.selection import select_backends
    from builder.spec import load_spec, read_model_config

    folder = make_random_qwen2_vl(tmp_path / "vl")
    spec = load_spec({"model": str(folder), "backends": "llamacpp"})
    stages = _targets(render_text(spec, select_backends(spec, read_model_config(spec)))["Dockerfile.llamacpp"])
    copy = "COPY --from=mmproj /w/ /"
    assert copy in stages["runtime"] and copy in stages["weights"]
    assert stages["runtime"].index("COPY --from=gguf /w/ /") < stages["runtime"].index(copy)
    assert copy not in stages["engine"]  # model-independent: the mmproj comes with the mounted weights
    assert "LLAMA_ARG_MMPROJ=/models/mmproj.gguf" in stages["runtime"]
