"""Adapters served unmerged: which backend serves them and why (selection), the llama.cpp image that serves
them (render: a pinned base GGUF layer, one layer per adapter, the router's preset) and the build context
that feeds it. Real tiny models and real peft adapters (no Docker)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from _tiny_hf import make_adapter  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from builder.cli import cli  # noqa: E402
from builder.demo.tiny import make_random_llama  # noqa: E402
from builder.errors import BuilderError  # noqa: E402
from builder.image.build import adapter_context, build_args, prepare_context  # noqa: E402
from builder.image.render import render_all, render_text  # noqa: E402
from builder.selection import select_backends  # noqa: E402
from builder.spec import BuildSpec, read_model_config  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random Llama and three adapters on it: two plain LoRAs and a DoRA (llama.cpp cannot apply DoRA)."""
    root = tmp_path_factory.mktemp("lora-image")
    base = make_random_llama(root / "base")
    found = {"base": base}
    for name, kw in {"sql": {"seed": 1}, "chat": {"seed": 2}, "dora": {"use_dora": True}}.items():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        found[name] = make_adapter(model, root / name, base_path=str(base), **kw)
    (found["chat"] / "optimizer.pt").write_bytes(b"trainer state, not needed to serve")
    return found


def _select(spec: BuildSpec):
    return select_backends(spec, read_model_config(spec))


def test_auto_serves_unmerged_on_llamacpp_and_vllm_and_merges_elsewhere(tiny):
    sel = _select(BuildSpec(model=str(tiny["base"]), adapter=tiny["sql"]))
    assert sel.backends == ["vllm", "llamacpp", "xinference"]
    assert {name: plan.mode for name, plan in sel.lora.items()} == {
        "vllm": "serve", "llamacpp": "serve", "xinference": "merge"
    }  # fmt: skip
    assert "merged weights only" in sel.lora["xinference"].reason
    assert sel.served_by("llamacpp") == sel.served_by("vllm") == {"base": tiny["sql"]}
    assert sel.served_by("xinference") == {}


def test_an_adapter_llamacpp_cannot_apply_is_merged_with_the_reason(tiny):
    sel = _select(BuildSpec(model=str(tiny["base"]), adapter=tiny["dora"], backends=["llamacpp"]))
    plan = sel.lora["llamacpp"]
    assert plan.mode == "merge" and "DoRA" in plan.reason and "LORA=merge" in plan.reason
    with pytest.raises(BuilderError, match="LORA=serve, but .*DoRA"):
        _select(BuildSpec(model=str(tiny["base"]), adapter=tiny["dora"], backends=["llamacpp"], lora_mode="serve"))
    merged = _select(BuildSpec(model=str(tiny["base"]), adapter=tiny["sql"], backends=["llamacpp"], lora_mode="merge"))
    assert merged.lora["llamacpp"].mode == "merge" and merged.served_by("llamacpp") == {}


def test_several_adapters_skip_or_refuse_the_merge_only_backends(tiny):
    adapters = {"sql": tiny["sql"], "chat": tiny["chat"]}
    sel = _select(BuildSpec(model=str(tiny["base"]), adapters=adapters))
    assert sel.backends == ["vllm", "llamacpp"]
    assert sel.served_by("llamacpp") == sel.served_by("vllm") == adapters
    assert "merges one adapter and 2 are given" in sel.skipped["xinference"]
    with pytest.raises(BuilderError, match="BACKEND=vllm,llamacpp can serve them"):
        _select(BuildSpec(model=str(tiny["base"]), adapters=adapters, backends=["xinference"]))
    with pytest.raises(BuilderError, match="no backend serves this model"):
        _select(BuildSpec(model=str(tiny["base"]), adapters={"sql": tiny["sql"], "dora": tiny["dora"]}))


def _runtime_copies(text: str) -> list[str]:
    runtime = text[text.index("AS runtime") :]
    return [line for line in runtime.splitlines() if line.startswith("COPY")]


def test_served_adapters_render_a_pinned_base_layer_and_one_layer_each(tiny):
    spec = BuildSpec(model=str(tiny["base"]), adapters={"sql": tiny["sql"], "chat": tiny["chat"]})
    text = render_text(spec, _select(spec))["Dockerfile.llamacpp"]
    model_stage = text[text.index("AS model") : text.index("AS llamacpp-src")]
    assert "/ctx/adapter" not in model_stage  # the base stays unmerged (and cached whatever the adapters)
    gguf_stage = text[text.index("AS gguf") : text.index("AS lora-0")]
    assert "--out /w/models/model.gguf" in gguf_stage
    assert "find /w -exec touch -h -d @0 {} +" in gguf_stage and "chown -R 0:0 /w" in gguf_stage
    for i, name in enumerate(["sql", "chat"]):
        stage = text[text.index(f"AS lora-{i}") :].split("\nFROM ")[0]
        assert f"source=adapters/{name},target=/in/adapter" in stage
        assert f"convert-lora --adapter /in/adapter --base /in/model --out /w/models/lora/{name}.gguf" in stage
        assert "touch -h -d @0" in stage
    copies = _runtime_copies(text)
    assert copies[-4:] == [
        "COPY --from=gguf /w/ /",
        "COPY --from=lora-0 /w/ /",
        "COPY --from=lora-1 /w/ /",
        "COPY llamacpp/preset.ini /models/preset.ini",
    ]
    runtime = text[text.index("AS runtime") :]  # the engine stage above has its own ENV
    env = runtime[runtime.index("\nENV LLAMA_ARG") :].split("\n\n")[0]
    assert "LLAMA_ARG_MODELS_PRESET=/models/preset.ini" in env and "LLAMA_ARG_MODELS_MAX=3" in env
    assert "LLAMA_ARG_MODEL=" not in env and "LLAMA_ARG_ALIAS" not in env and "LLAMA_ARG_OFFLINE=1" in env


def test_merge_renders_as_without_adapters(tiny):
    """LORA=merge (and the merging backends under auto) render exactly the committed, adapter-free files."""
    default = render_text(BuildSpec())
    spec = BuildSpec(model=str(tiny["base"]), adapter=tiny["sql"], lora_mode="merge")
    assert render_text(spec, _select(spec)) == render_text(spec) == default
    auto = BuildSpec(model=str(tiny["base"]), adapter=tiny["sql"])
    rendered = render_text(auto, _select(auto))
    assert rendered["Dockerfile.xinference"] == default["Dockerfile.xinference"]
    assert rendered["Dockerfile.llamacpp"] != default["Dockerfile.llamacpp"]
    assert rendered["Dockerfile.vllm"] != default["Dockerfile.vllm"]


def test_served_render_is_hadolint_clean(tiny, tmp_path):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    spec = BuildSpec(model=str(tiny["base"]), adapters={"sql": tiny["sql"], "chat": tiny["chat"]})
    render_all(spec, tmp_path, _select(spec))
    for name in ("Dockerfile.llamacpp", "Dockerfile.vllm"):
        res = subprocess.run([hadolint, "--failure-threshold", "info", str(tmp_path / name)],
                             capture_output=True, text=True)  # fmt: skip
        assert res.returncode == 0, name + res.stdout + res.stderr


def test_context_holds_the_served_adapters_and_the_preset(tiny, tmp_path):
    spec = BuildSpec(model=str(tiny["base"]), adapters={"sql": tiny["sql"], "chat": tiny["chat"]})
    sel = _select(spec)
    served, files = adapter_context(spec, sel)
    ctx = prepare_context(spec, tmp_path, None, served, files)
    assert sorted(p.name for p in (ctx / "adapters").iterdir()) == ["chat", "sql"]
    assert (ctx / "adapters" / "sql" / "adapter_model.safetensors").is_file()
    assert not (ctx / "adapters" / "chat" / "optimizer.pt").exists()  # training state stays out
    preset = (ctx / "llamacpp" / "preset.ini").read_text()
    assert re.findall(r"^\[(.+)\]$", preset, re.M) == ["*", "base", "sql", "chat"]
    assert "lora = /models/lora/chat.gguf" in preset
    label = build_args(spec, "llamacpp", None, sel.served_by("llamacpp"))["ADAPTER_DIGEST"]
    assert re.fullmatch(r"sql=sha256:[0-9a-f]{64},chat=sha256:[0-9a-f]{64}", label)


def test_make_spec_prints_each_backends_lora_mode(tiny):
    res = CliRunner().invoke(cli, ["spec", "--model", str(tiny["base"]), "--adapter", str(tiny["sql"])])
    assert res.exit_code == 0, res.output
    assert "# LORA on llamacpp: serve base (1 adapter(s) unmerged over one base)" in res.output
    assert "# LORA on vllm: serve base (1 adapter(s) unmerged over one base)" in res.output
    assert re.search(r"# LORA on xinference: merge \(merged: Xinference serves merged weights only\)", res.output)
