"""Vision-language checkpoints through the streaming merge and the backend selection: every tensor torch.equal
to peft's merge_and_unload, no base tensor lost (tower and projector included), in both transformers key
layouts; adapters classified by the parts they change; backends without image input never chosen."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from builder.demo.tiny_vision import make_random_qwen2_vl
from builder.errors import BuilderError
from builder.model.adapter import read_adapter, vllm_problems
from builder.model.merge import merge_model
from builder.model.vision import PROJECTOR, TOWER, canonical, part, vllm_misplaced, vllm_module
from builder.selection import select_backends
from builder.spec import BuildSpec

LM = ["q_proj", "k_proj", "v_proj", "o_proj"]
TOWER_TOO = [*LM, "qkv", "fc1", "mlp.0", "mlp.2"]


def new_layout(folder):
    """Rewrite the checkpoint's keys in transformers' >= 4.52 layout (model.language_model.*, model.visual.*)."""
    path = folder / "model.safetensors"
    save_file({canonical(k): v.contiguous() for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_random_qwen2_vl(tmp_path_factory.mktemp("qwen2-vl"), version="2")


def _adapter(base, path, targets, layout):
    """A real peft LoRA on the loaded model, saved; `layout` "old" renames its keys as an adapter trained with
    transformers < 4.52 names them."""
    from _tiny_hf import randomize_adapter
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(base), dtype=torch.float32)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    randomize_adapter(pm, 3)
    pm.save_pretrained(path)
    if layout == "old":
        f = path / "adapter_model.safetensors"
        old = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
               for k, v in load_file(f).items()}  # fmt: skip
        save_file(old, f)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    merged = pm.merge_and_unload()
    return path, {canonical(k): v for k, v in merged.state_dict().items()}


@pytest.mark.parametrize("base_layout", ["old", "new"])
@pytest.mark.parametrize("adapter_layout", ["old", "new"])
def test_merge_equals_peft_in_both_key_layouts(base, tmp_path, base_layout, adapter_layout):
    folder = tmp_path / "base"
    folder.mkdir()
    for f in base.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    if base_layout == "new":
        new_layout(folder)
    adapter, want = _adapter(base, tmp_path / "adapter", TOWER_TOO, adapter_layout)
    out = merge_model(folder, adapter, tmp_path / "merged", dtype="float32", quiet=True)
    got = load_file(out / "model.safetensors")
    base_keys = set(load_file(folder / "model.safetensors"))
    assert set(got) == base_keys, "the merge lost or renamed base tensors"
    assert {part(k) for k in got} == {"language model", TOWER, PROJECTOR}
    changed = 0
    for k, v in got.items():
        assert torch.equal(v, want[canonical(k)]), k
        changed += not torch.equal(v, load_file(folder / "model.safetensors")[k])
    assert changed == 2 * 4 + 3 * 2 + 2, "the LoRA deltas were not applied"  # LM, tower blocks, projector


def test_adapter_parts_and_what_each_backend_does(base, tmp_path):
    lm, _ = _adapter(base, tmp_path / "lm", LM, "new")
    tower, _ = _adapter(base, tmp_path / "tower", TOWER_TOO, "old")
    assert list(read_adapter(lm, base).parts) == ["language model"]
    assert read_adapter(tower, base).vision_parts == (TOWER, PROJECTOR)
    config = json.loads((base / "config.json").read_text())

    sel = select_backends(BuildSpec(model=str(base), adapter=str(lm)), config)
    assert "llamacpp" in sel.backends and sel.lora["llamacpp"].mode == "serve"
    assert "xinference" in sel.skipped and "chatglmcpp" in sel.skipped
    assert any(line.startswith("IMAGES on llamacpp: text GGUF") for line in sel.vision_lines())

    sel = select_backends(BuildSpec(model=str(base), adapter=str(tower)), config)
    assert sel.lora["llamacpp"].mode == "merge" and "vision tower and projector" in sel.lora["llamacpp"].reason
    assert sel.lora["vllm"].mode == "merge"
    with pytest.raises(BuilderError, match="LORA=serve"):
        select_backends(
            BuildSpec(model=str(base), adapter=str(tower), lora_mode="serve", backends=["llamacpp"]), config
        )
    with pytest.raises(BuilderError, match="text LLM"):
        select_backends(BuildSpec(model=str(base), backends=["xinference"]), config)


def _rename_keys(adapter, rename):
    f = adapter / "adapter_model.safetensors"
    save_file({rename(k): v for k, v in load_file(f).items()}, f)
    return adapter


def test_vllm_serves_a_language_model_lora_unmerged_in_every_key_layout(base, tmp_path):
    config = json.loads((base / "config.json").read_text())
    new, _ = _adapter(base, tmp_path / "new", LM, "new")
    old, _ = _adapter(base, tmp_path / "old", LM, "old")
    swift = _rename_keys(_adapter(base, tmp_path / "swift", LM, "old")[0],
                         lambda k: k.replace("base_model.model.model.", "base_model.model.language_model.model."))  # fmt: skip
    for adapter in (new, old, swift):
        facts = read_adapter(adapter, base)
        assert facts.file_modules and vllm_misplaced(facts.file_modules) == []
        sel = select_backends(BuildSpec(model=str(base), adapter=str(adapter), backends=["vllm"]), config)
        assert sel.lora["vllm"].mode == "serve", (adapter.name, sel.lora["vllm"].reason)


def test_vllm_merges_an_adapter_it_would_load_and_never_apply(base, tmp_path):
    """Keys one level too deep (an adapter saved from a model wrapped twice): vLLM checks the last name only
    (q_proj), loads them, applies them nowhere and answers as the base."""
    config = json.loads((base / "config.json").read_text())
    lm, _ = _adapter(base, tmp_path / "lm", LM, "new")
    facts = read_adapter(lm, base)
    deep = [m.replace("base_model.model.model.language_model.", "base_model.model.language_model.") for m in
            facts.file_modules]  # fmt: skip
    assert vllm_misplaced(deep) == sorted(deep)
    assert vllm_module(deep[0]).startswith("language_model.layers.")  # not vLLM's language_model.model.layers
    assert (
        vllm_misplaced(["base_model.model.visual.blocks.0.attn.qkv", "base_model.model.model.visual.merger.mlp.0"])
        == []
    )
    misplaced = replace(facts, file_modules=tuple(deep))
    assert any("answer as the base does" in p for p in vllm_problems(misplaced))
    assert not any("answer as the base does" in p for p in vllm_problems(facts))
    assert (
        select_backends(BuildSpec(model=str(base), adapter=str(lm), backends=["vllm"]), config).lora["vllm"].mode
        == "serve"
    )


def test_make_spec_says_what_the_adapter_touches_and_what_each_backend_does(base, tmp_path):
    from click.testing import CliRunner

    from builder.cli import cli

    tower, _ = _adapter(base, tmp_path / "tower", TOWER_TOO, "old")
    lm, _ = _adapter(base, tmp_path / "lm", LM, "new")
    runner = CliRunner()
    out = runner.invoke(cli, ["spec", "--model", str(base), "--adapter", f"tower={tower}"])
    assert out.exit_code == 0, out.output
    text = out.output
    assert "# VISION: Qwen2VLForConditionalGeneration" in text
    assert "# ADAPTER tower changes: language model: LoRA on 8 module(s); vision tower: LoRA on 6 module(s); " \
           "projector: LoRA on 2 module(s)" in text  # fmt: skip
    assert "# BACKEND=auto skips chatglmcpp:" in text
    assert "# BACKEND=auto skips xinference:" in text and "text LLM" in text
    assert "# IMAGES on llamacpp: text GGUF" in text
    lora_lines = [line for line in text.splitlines() if "merge" in line and "vision tower and projector" in line]
    assert any("llamacpp" in line for line in lora_lines) and any("vllm" in line for line in lora_lines), text
    out = runner.invoke(cli, ["spec", "--model", str(base), "--adapter", f"lm={lm}"])
    assert out.exit_code == 0, out.output
    assert "# ADAPTER lm changes: language model: LoRA on 8 module(s)\n" in out.output
    assert "vision tower" not in out.output.split("# ADAPTER lm changes:")[1].splitlines()[0]
