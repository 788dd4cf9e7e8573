"""builder.model.merge: streamed LoRA merge, bit-equal to peft's merge_and_unload, and its failure modes.

Tiny random Llama/GLM/GPT-2 models and real peft adapters (random LoRA weights so every delta is
non-zero) are generated per test; each merged tensor must be torch.equal (same dtype) to what
transformers + PeftModel.from_pretrained + merge_and_unload gives, and the merged folder must load
with transformers and give the same logits.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from _tiny_hf import load_folder_tensors, make_adapter, make_model, peft_merged, save_base  # noqa: E402

from builder import __version__  # noqa: E402
from builder.errors import BuilderError  # noqa: E402
from builder.model.merge import merge_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DT = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ALL_LINEAR = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "glm": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"],
}

pytestmark = pytest.mark.filterwarnings("ignore")


def _assert_same_as_peft(out: Path, base: Path, adapter: Path, dtype, vocab: int | None = None) -> None:
    ref_model = peft_merged(base, adapter, dtype, vocab=vocab)
    ref = ref_model.state_dict()
    got = load_folder_tensors(out)
    tied = {"lm_head.weight"} if ref_model.config.tie_word_embeddings else set()
    assert set(ref) - tied <= set(got), set(ref) - tied - set(got)
    changed = 0
    for name, want in ref.items():
        if name in tied:
            continue
        have = got[name]
        assert have.dtype == want.dtype, (name, have.dtype, want.dtype)
        assert torch.equal(have, want), f"{name} differs from peft merge_and_unload"
    base_sd = load_folder_tensors(base) if any(base.glob("*.safetensors")) else {}
    for name, t in base_sd.items():
        changed += name in got and (got[name].shape != t.shape or not torch.equal(got[name], t.to(got[name].dtype)))
    if base_sd:
        assert changed, "the adapter changed nothing: the test adapter is not random"

    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
    ids = torch.arange(12).reshape(2, 6) % merged.config.vocab_size
    with torch.no_grad():
        assert torch.equal(merged(ids).logits, ref_model(ids).logits)


# (id, arch, dtype, lora kwargs, base kwargs)
CASES = [
    ("plain-bf16", "llama", "bfloat16", {}, {}),
    ("plain-fp16", "llama", "float16", {"target_modules": ALL_LINEAR["llama"]}, {}),
    ("plain-fp32", "llama", "float32", {}, {}),
    ("rslora", "llama", "bfloat16", {"use_rslora": True, "r": 8, "lora_alpha": 16}, {}),
    ("patterns", "llama", "float16",
     {"rank_pattern": {"layers.1.self_attn.q_proj": 8, "v_proj": 2}, "alpha_pattern": {"o_proj": 3, "layers.0.self_attn.k_proj": 32}}, {}),
    ("dora", "llama", "bfloat16", {"use_dora": True, "target_modules": ALL_LINEAR["llama"]}, {}),
    ("dora-fp32", "llama", "float32", {"use_dora": True}, {}),
    ("embedding-lora+modules_to_save", "llama", "bfloat16",
     {"target_modules": ["embed_tokens", "q_proj", "v_proj"], "modules_to_save": ["lm_head"]}, {}),
    ("dora-embedding", "llama", "float16", {"target_modules": ["embed_tokens", "q_proj"], "use_dora": True}, {}),
    ("glm-lora-bias", "glm", "bfloat16", {"lora_bias": True, "target_modules": ["q_proj", "k_proj", "v_proj"]}, {}),
    ("glm-all-linear-fp16", "glm", "float16", {"target_modules": ALL_LINEAR["glm"], "use_rslora": True}, {}),
    ("glm-dora", "glm", "bfloat16", {"use_dora": True, "target_modules": ALL_LINEAR["glm"]}, {}),
    ("multi-shard", "llama", "bfloat16", {"target_modules": ALL_LINEAR["llama"]}, {"max_shard_size": "40KB"}),
    ("bin-shards", "glm", "float16", {"target_modules": ALL_LINEAR["glm"]}, {"max_shard_size": "40KB", "safe": False}),
    ("fan_in_fan_out-gpt2", "gpt2", "bfloat16", {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True}, {}),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bit_equal_to_peft(tmp_path, case, monkeypatch):
    case_id, arch, dtype, lora_kw, base_kw = case
    if case_id != "plain-bf16":  # the others merge 3 rows at a time (uneven last block), as big models do
        monkeypatch.setattr("builder.model.merge.peft_math.MERGE_BLOCK_BYTES", 1000)
    base = save_base(make_model(arch, dtype=DT[dtype]), tmp_path / "base", **base_kw)
    if base_kw.get("max_shard_size"):
        assert len(list(base.glob("model-*"))) > 2
    adapter = make_adapter(make_model(arch, dtype=DT[dtype]), tmp_path / "adapter", base_path=str(base), **lora_kw)
    out = merge_model(adapter=adapter, quiet=True)  # --base from adapter_config.json, --out default
    assert out == tmp_path / "adapter-merged"
    _assert_same_as_peft(out, base, adapter, DT[dtype])

    n_base = len(list(base.glob("*.safetensors"))) + len(list(base.glob("*.bin")))
    assert len(list(out.glob("*.safetensors"))) == n_base
    if n_base > 1:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(load_folder_tensors(out))
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja", "configuration_custom.py", "merge_provenance.json"):  # fmt: skip
        if (base / name).exists() or name == "merge_provenance.json":
            assert (out / name).is_file(), name
    assert not list(out.glob("*.bin")) and not (out / "adapter_config.json").exists()
    prov = json.loads((out / "merge_provenance.json").read_text())
    assert prov["builder_version"] == __version__
    assert set(prov["base"]["sha256"]) == {p.name for p in base.iterdir() if p.suffix in (".safetensors", ".bin")}
    assert "adapter_model.safetensors" in prov["adapter"]["sha256"]
    scales = {m["scale"] for m in prov["modules"].values()}
    assert scales and all(s > 0 for s in scales)
    if lora_kw.get("use_rslora"):
        assert scales == {lora_kw.get("lora_alpha", 8) / lora_kw.get("r", 4) ** 0.5}


def test_dtype_conversion_and_bin_adapter(tmp_path):
    base = save_base(make_model("llama", dtype=torch.float32), tmp_path / "base")
    adapter = make_adapter(make_model("llama", dtype=torch.float32), tmp_path / "ad", safe=False, use_dora=True)
    assert (adapter / "adapter_model.bin").is_file()
    out = merge_model(base=base, adapter=adapter, out=tmp_path / "m", dtype="bfloat16", quiet=True)
    _assert_same_as_peft(out, base, adapter, torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_swift_checkpoint_layout(tmp_path):
    """SWIFT: output/vX/checkpoint-N/ with adapter files + args.json; base path only in args.json."""
    base = save_base(make_model("glm", dtype=torch.bfloat16), tmp_path / "models" / "glm-tiny")
    run = tmp_path / "output" / "v0-2024"
    ckpt = make_adapter(make_model("glm", dtype=torch.bfloat16), run / "checkpoint-20", base_path="THUDM/glm-4-9b-chat")
    (ckpt / "args.json").write_text(json.dumps({"model": "THUDM/glm-4-9b-chat", "model_id_or_path": str(base)}))
    for junk in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"):
        (ckpt / junk).write_bytes(b"x")
    (ckpt / "global_step20").mkdir()
    out = merge_model(adapter=ckpt, quiet=True)
    assert out == run / "checkpoint-20-merged"
    _assert_same_as_peft(out, base, ckpt, torch.bfloat16)
    assert not {"optimizer.pt", "trainer_state.json", "args.json", "global_step20"} & {p.name for p in out.iterdir()}

    # older SWIFT: sft_args.json with model_dir, in the run folder above the checkpoint
    (ckpt / "args.json").unlink()
    (run / "sft_args.json").write_text(json.dumps({"model_type": "glm4-9b-chat", "model_dir": str(base)}))
    out2 = merge_model(adapter=ckpt, out=tmp_path / "m2", quiet=True)
    assert torch.equal(load_folder_tensors(out2)["model.layers.0.self_attn.q_proj.weight"],
                       load_folder_tensors(out)["model.layers.0.self_attn.q_proj.weight"])  # fmt: skip

    with pytest.raises(BuilderError, match="checkpoint-20"):
        merge_model(adapter=run, out=tmp_path / "m3", quiet=True)


def test_added_tokens_resized_vocab(tmp_path):
    base = save_base(make_model("llama", dtype=torch.bfloat16), tmp_path / "base")
    model = make_model("llama", dtype=torch.bfloat16)
    model.resize_token_embeddings(260)
    adapter = make_adapter(model, tmp_path / "ad", modules_to_save=["embed_tokens", "lm_head"], base_path=str(base))
    (adapter / "tokenizer_config.json").write_text(json.dumps({"origin": "adapter", "added": ["<x1>", "<x2>"]}))
    out = merge_model(adapter=adapter, quiet=True)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 260
    assert json.loads((out / "tokenizer_config.json").read_text())["origin"] == "adapter"
    assert (out / "chat_template.jinja").is_file()  # the base's, the adapter has none
    _assert_same_as_peft(out, base, adapter, torch.bfloat16, vocab=260)
    assert json.loads((out / "merge_provenance.json").read_text())["vocab_size"] == 260


def test_full_checkpoint_passthrough(tmp_path):
    ckpt = save_base(
        make_model("llama", dtype=torch.bfloat16), tmp_path / "run" / "checkpoint-5", max_shard_size="40KB"
    )
    for junk in ("optimizer.pt", "scheduler.pt", "rng_state_0.pth", "trainer_state.json", "training_args.bin"):
        (ckpt / junk).write_bytes(b"x")
    (ckpt / "global_step5").mkdir()
    (ckpt / "global_step5" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    out = merge_model(adapter=ckpt, quiet=True)
    assert out == tmp_path / "run" / "checkpoint-5-merged"
    src, got = load_folder_tensors(ckpt), load_folder_tensors(out)
    assert src.keys() == got.keys() and all(torch.equal(src[k], got[k]) for k in src)
    names = {p.name for p in out.iterdir()}
    assert not names & {
        "optimizer.pt",
        "scheduler.pt",
        "rng_state_0.pth",
        "trainer_state.json",
        "training_args.bin",
        "global_step5",
    }
    assert {"config.json", "tokenizer_config.json", "model.safetensors.index.json", "merge_provenance.json"} <= names
    # --base alone also passes through
    out2 = merge_model(base=ckpt, out=tmp_path / "p2", quiet=True)
    assert all(torch.equal(src[k], v) for k, v in load_folder_tensors(out2).items())


def test_force_and_existing_out(tmp_path):
    base = save_base(make_model("llama"), tmp_path / "base")
    adapter = make_adapter(make_model("llama"), tmp_path / "ad", base_path=str(base))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(BuilderError, match="--force"):
        merge_model(adapter=adapter, out=out, quiet=True)
    assert (out / "keep.txt").read_text() == "old"
    merge_model(adapter=adapter, out=out, force=True, quiet=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(BuilderError, match="overlaps"):
        merge_model(adapter=adapter, out=base, force=True, quiet=True)


def test_adapter_read_without_merging(tmp_path, llama_pair):
    """The adapter reading the merge uses, on its own (to serve an adapter unmerged): its config, its tensors
    (read on demand, equal to the saved ones), and the base it was trained on, SWIFT checkpoints included."""
    from safetensors.torch import load_file

    from builder.model.merge import read_adapter, resolve_base

    base, adapter = llama_pair
    loaded = read_adapter(adapter)
    raw = json.loads((adapter / "adapter_config.json").read_text())
    assert (loaded.spec.r, loaded.spec.lora_alpha, loaded.spec.use_dora) == (raw["r"], raw["lora_alpha"], False)
    assert loaded.weights_file == adapter / "adapter_model.safetensors"
    saved = load_file(loaded.weights_file)
    assert saved.keys() == loaded.tensors.keys()
    for name, t in loaded.tensors.items():
        assert t.shape == tuple(saved[name].shape) and torch.equal(t.load(), saved[name])
    assert resolve_base(adapter) == base

    run = tmp_path / "output" / "v0"
    ckpt = shutil.copytree(adapter, run / "checkpoint-3")
    (ckpt / "adapter_config.json").write_text(json.dumps({**raw, "base_model_name_or_path": "org/not-here"}))
    with pytest.raises(BuilderError, match="org/not-here.*pass --base"):
        resolve_base(ckpt)
    (run / "sft_args.json").write_text(json.dumps({"model_dir": str(base)}))
    assert resolve_base(ckpt) == base
    (ckpt / "adapter_config.json").write_text(json.dumps({**raw, "peft_type": "IA3"}))
    with pytest.raises(BuilderError, match="IA3 adapter"):
        read_adapter(ckpt)


# ---- bad input: a clear BuilderError before anything is written


@pytest.fixture
def llama_pair(tmp_path):
    base = save_base(make_model("llama"), tmp_path / "base", max_shard_size="40KB")
    adapter = make_adapter(
        make_model("llama"), tmp_path / "ad", base_path=str(base), target_modules=ALL_LINEAR["llama"]
    )
    return base, adapter


def _fails(tmp_path, match, **kw):
    out = tmp_path / "out"
    with pytest.raises(BuilderError, match=match) as e:
        merge_model(out=out, quiet=True, **kw)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out")]
    return str(e.value)


def test_bad_adapter_for_other_model(tmp_path, llama_pair):
    base, _ = llama_pair
    glm_adapter = make_adapter(make_model("glm"), tmp_path / "glm-ad", target_modules=ALL_LINEAR["glm"])
    _fails(tmp_path, "does not have.*gate_up_proj.*--base", base=base, adapter=glm_adapter)
    wide = make_adapter(make_model("llama", hidden=32), tmp_path / "wide-ad")
    _fails(tmp_path, "shape mismatch.*another base", base=base, adapter=wide)
    deep = make_adapter(make_model("llama", layers=3), tmp_path / "deep-ad")
    _fails(tmp_path, "does not have.*layers.2", base=base, adapter=deep)


@pytest.mark.parametrize("peft_type", ["ADALORA", "VERA", "IA3", "PROMPT_TUNING", "LOHA"])
def test_bad_peft_type(tmp_path, llama_pair, peft_type):
    base, adapter = llama_pair
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["peft_type"] = peft_type
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    _fails(tmp_path, f"{peft_type} adapter.*only LoRA", base=base, adapter=adapter)


def test_real_ia3_adapter(tmp_path, llama_pair):
    from peft import IA3Config, get_peft_model

    base, _ = llama_pair
    get_peft_model(
        make_model("llama"), IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    ).save_pretrained(tmp_path / "ia3")
    _fails(tmp_path, "IA3 adapter", base=base, adapter=tmp_path / "ia3")


def test_bad_missing_and_corrupt_shards(tmp_path, llama_pair):
    base, adapter = llama_pair
    shards = sorted(base.glob("model-*.safetensors"))
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    (broken / shards[1].name).unlink()
    _fails(tmp_path, f"missing shard.*{shards[1].name}", base=broken, adapter=adapter)
    shutil.copy(shards[1], broken / shards[1].name)
    with open(broken / shards[1].name, "r+b") as f:
        f.truncate(shards[1].stat().st_size - 100)
    _fails(tmp_path, "truncated or corrupt", base=broken, adapter=adapter)
    (broken / shards[1].name).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    _fails(tmp_path, "not a valid safetensors", base=broken, adapter=adapter)
    (broken / "model.safetensors.index.json").unlink()
    for s in broken.glob("model-*"):
        s.unlink()
    _fails(tmp_path, "no model.safetensors", base=broken, adapter=adapter)


def test_bad_truncated_adapter(tmp_path, llama_pair):
    """Adapter tensors are read lazily, so a cut-off adapter file must still fail before anything is written."""
    base, adapter = llama_pair
    weights = adapter / "adapter_model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 100)
    _fails(tmp_path, "adapter_model.safetensors.*truncated or corrupt.*re-save the adapter", base=base, adapter=adapter)


def test_bad_quantized_base(tmp_path, llama_pair):
    base, adapter = llama_pair
    for method in ("gptq", "awq", "bitsandbytes"):
        cfg = json.loads((base / "config.json").read_text())
        cfg["quantization_config"] = {"quant_method": method, "bits": 4}
        (base / "config.json").write_text(json.dumps(cfg))
        _fails(tmp_path, f"quantized model \\({method}\\)", base=base, adapter=adapter)


def test_bad_base_unknown(tmp_path, llama_pair):
    _, adapter = llama_pair
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-2-7b-hf"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    msg = _fails(tmp_path, "pass --base", adapter=adapter)
    assert "meta-llama/Llama-2-7b-hf" in msg


def test_failure_midway_leaves_nothing(tmp_path, llama_pair, monkeypatch):
    import builder.model.merge.stream as m

    base, adapter = llama_pair
    calls = {"n": 0}
    real = m.merge_weight

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(m, "merge_weight", flaky)
    with pytest.raises(KeyboardInterrupt):
        merge_model(base=base, adapter=adapter, out=tmp_path / "out", quiet=True)
    assert calls["n"] == 9
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli(tmp_path, llama_pair):
    base, adapter = llama_pair
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "builder", "merge", "--base", str(base), "--adapter", str(adapter)]
    res = subprocess.run(cmd + ["--out", str(tmp_path / "cli-out")], cwd=ROOT, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == str(tmp_path / "cli-out")
    assert "1/" in res.stderr  # the per-shard progress bar
    res = subprocess.run(
        cmd + ["--out", str(tmp_path / "cli-out"), "-q"], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert res.returncode == 2 and "already exists" in res.stderr and "--force" in res.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu(tmp_path, llama_pair):
    base, adapter = llama_pair
    _fails(tmp_path, "no CUDA GPU.*--device cpu", base=base, adapter=adapter, device="cuda")


def test_benchmark_script_runs_and_agrees_with_peft(tmp_path):
    """bench/merge.py --quick: both sides run in their own processes and the outputs are bit-equal."""
    cmd = [sys.executable, "bench/merge.py", "--quick", "--repeat", "1", "--verify", "--layers-multiplier", "1",
           "--workdir", str(tmp_path / "bench")]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert re.search(r"bit-equal check: all \d+ tensors torch.equal", res.stdout), res.stdout
    assert "ratio ours/peft: RSS" in res.stdout and not (tmp_path / "bench").exists()
