"""GGML conversion for chatglm.cpp: ids equal transformers' after conversion, for every input layout."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
chatglm_cpp = pytest.importorskip("chatglm_cpp")

from _chatglm_original import (  # noqa: E402
    REMOTE_CODE,
    _chatglm_config,
    _chatglm_state,
    _random_glm,
    make_glm4_original,
)
from _tiny_hf import PROMPTS  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GlmConfig, GlmForCausalLM  # noqa: E402

from builder.demo.tiny import DEFAULT_CORPUS, make_random_glm  # noqa: E402
from builder.errors import BuilderError  # noqa: E402
from builder.model.convert import check_supported, convert_model, describe  # noqa: E402
from builder.model.convert.inspect import read_ggml  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

TEXTS = PROMPTS + [
    "a  b   c\td",
    "tabs\t\tand\nnewlines\r\n\n done",
    "It's, we'll; THEY'VE I'd you'RE",
    "数字 3.14159 和 1e-9 以及 100000000",
    "👍🏽 ❤️ 🇨🇳 — “quotes” ‘single’ …",
    "    indented code line\n        deeper",
    "",
]


def pipeline(path: Path):
    return chatglm_cpp.Pipeline(str(path), max_length=512)


def cpp_greedy(pipe, ids: list[int], n: int) -> list[int]:
    gc = chatglm_cpp._C.GenerationConfig(max_length=512, max_new_tokens=n, do_sample=False)
    return pipe._sync_generate_ids(ids, None, gc)


def cpp_greedy_no_stop(pipe, ids: list[int], n: int) -> list[int]:
    """Exactly n greedy tokens from chatglm.cpp, not stopping at eos (a random model may emit it early)."""
    gc = chatglm_cpp._C.GenerationConfig(max_length=512, max_new_tokens=n, do_sample=False)
    ids, out, n_past, n_ctx = list(ids), [], 0, len(ids)
    for _ in range(n):
        nxt = pipe.model.generate_next_token(ids, None, gc, n_past, n_ctx)
        n_past = pipe.model.count_tokens(ids, None)
        ids.append(nxt)
        out.append(nxt)
    return out


def hf_greedy(model, ids: list[int], n: int, eos: list[int] | None) -> list[int]:
    x = torch.tensor([ids])
    kw = {"eos_token_id": eos, "pad_token_id": eos[0]} if eos else {"eos_token_id": None, "min_length": 0}
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, **kw)
    return out[0, len(ids) :].tolist()


def stop_ids(pipe) -> list[int]:
    return [pipe.model.config.eos_token_id, *pipe.model.config.extra_eos_token_ids]


# --------------------------------------------------------------------------------------------------
# transformers-native GLM
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    model_dir = make_random_glm(root / "glm")
    files = {q: convert_model(model_dir, quant=q, out=root / f"glm-{q}.bin", quiet=True) for q in ("f32", "f16")}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    return {"root": root, "dir": model_dir, "files": files, "model": model, "tok": tok}


@pytest.mark.parametrize("quant", ["f32", "f16"])
def test_native_greedy_ids_equal_transformers(native, quant):
    pipe = pipeline(native["files"][quant])
    assert pipe.model.config.model_type_name == "ChatGLM4"
    eos = stop_ids(pipe)
    assert sorted(eos) == sorted(native["model"].generation_config.eos_token_id)
    for k, prompt in enumerate(PROMPTS[:10]):
        ids = native["tok"](prompt).input_ids
        assert ids == pipe.tokenizer.encode(prompt, 512)
        want = hf_greedy(native["model"], ids, 16, None)
        assert len(want) == 16
        assert cpp_greedy_no_stop(pipe, ids, 16) == want, prompt
        if k < 3:  # and the stopping rule agrees: both stop at the same eos
            assert cpp_greedy(pipe, ids, 16) == hf_greedy(native["model"], ids, 16, eos)


def test_native_tokenizer_ids_equal(native):
    pipe = pipeline(native["files"]["f32"])
    tok = native["tok"]
    for text in TEXTS:
        assert pipe.tokenizer.encode(text, 4096) == tok(text).input_ids, repr(text)
    msgs = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "你好 👋 what is 2+2?"},
        {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "def f(x):\n    return x"},
    ]
    want = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    want_ids = tok(want, add_special_tokens=False).input_ids
    cpp_ids = pipe.tokenizer.apply_chat_template([chatglm_cpp.ChatMessage(**m) for m in msgs], 4096)
    assert cpp_ids == want_ids


@pytest.mark.parametrize("quant", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_native_quantized_load_inspect_generate(native, quant):
    out = convert_model(native["dir"], quant=quant, out=native["root"] / f"glm-{quant}.bin", quiet=True)
    info = read_ggml(out)
    assert info.model_type == "ChatGLM4" and info.config["dtype"] == quant.upper()
    types = {t.name: t.ggml_type for t in info.tensors}
    assert types["transformer.output_layer.weight"] == quant.upper()
    assert types["transformer.encoder.final_layernorm.weight"] == "F32"
    assert out.stat().st_size < native["files"]["f16"].stat().st_size
    pipe = pipeline(out)
    ids = native["tok"]("Hello world").input_ids
    got = cpp_greedy_no_stop(pipe, ids, 4)
    assert all(0 <= i < info.config["vocab_size"] for i in got)
    if quant == "q8_0":  # close to f32: its first greedy token is (near-)top in transformers' logits
        with torch.no_grad():
            logits = native["model"](torch.tensor([ids])).logits[0, -1]
        assert logits.max() - logits[got[0]] < 0.1


def test_native_variants_tied_no_bias_bf16(tmp_path):
    """tie_word_embeddings and attention_bias=False (zero qkv bias fed) and bf16 weights all convert exactly."""
    src = make_random_glm(tmp_path / "base", hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=96)
    tok = AutoTokenizer.from_pretrained(src)
    cfg = GlmConfig.from_pretrained(src)
    cfg.tie_word_embeddings, cfg.attention_bias = True, False
    torch.manual_seed(1)
    model = GlmForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08)
    model = model.to(torch.bfloat16).eval()
    var = tmp_path / "var"
    model.save_pretrained(var)
    tok.save_pretrained(var)
    out = convert_model(var, quant="f32", out=tmp_path / "var.bin", quiet=True)
    pipe = pipeline(out)
    ref = model.float()
    for prompt in PROMPTS[:3]:
        ids = tok(prompt).input_ids
        assert cpp_greedy_no_stop(pipe, ids, 8) == hf_greedy(ref, ids, 8, None)


def test_no_model_instantiation_and_no_runtime_import(native, tmp_path):
    """The converter never builds a model and never imports the compiled chatglm_cpp package."""
    code = f"""
import sys, transformers
def boom(*a, **k): raise AssertionError("model instantiated")
transformers.AutoModel.from_pretrained = boom
transformers.AutoModelForCausalLM.from_pretrained = boom
from builder.model.convert import convert_model
convert_model({str(native["dir"])!r}, quant="q4_0", out={str(tmp_path / "x.bin")!r}, quiet=True)
assert "chatglm_cpp" not in sys.modules and "chatglm_cpp._C" not in sys.modules, sorted(sys.modules)
print("OK")
"""
    src = Path(sys.modules["builder.model.convert"].__file__).parents[3]
    convert_py = Path(sys.modules["builder.model.convert"].load_chatglm_convert().__file__)
    copy = tmp_path / "convert.py"
    copy.write_bytes(convert_py.read_bytes())
    env = {**os.environ, "CHATGLM_CPP_CONVERT_PY": str(copy), "PYTHONPATH": str(src)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-2000:]
    assert read_ggml(tmp_path / "x.bin").config["dtype"] == "Q4_0"


def test_cli_convert_and_inspect(native, tmp_path):
    from click.testing import CliRunner

    from builder.cli import cli

    out = tmp_path / "cli.bin"
    r = CliRunner().invoke(cli, ["convert", "--model", str(native["dir"]), "--quant", "q8_0", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    assert str(out) in r.output and out.is_file()
    assert not list(tmp_path.glob(".*tmp*"))
    r = CliRunner().invoke(cli, ["inspect", str(out)])
    assert r.exit_code == 0 and "ChatGLM4" in r.output
    r = CliRunner().invoke(cli, ["convert", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "n.bin")])
    assert r.exit_code == 2 and "not a folder" in r.output


# --------------------------------------------------------------------------------------------------
# Unsupported inputs: clear errors, nothing written
# --------------------------------------------------------------------------------------------------


def _glm_cfg(**kw) -> dict:
    cfg = {
        "model_type": "glm",
        "architectures": ["GlmForCausalLM"],
        "hidden_size": 64,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "vocab_size": 614,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    }
    cfg.update(kw)
    return cfg


@pytest.mark.parametrize(
    "cfg, quant, needle",
    [
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "q4_0", "vLLM or Xinference"),
        ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, "f16", "ChatGLM2-6B"),
        ({"model_type": "baichuan", "architectures": ["BaichuanForCausalLM"]}, "f16", "Baichuan"),
        ({"model_type": "glm4", "architectures": ["Glm4ForCausalLM"]}, "f16", "glm4"),
        (_glm_cfg(head_dim=16), "f16", "head_dim 16 x 2 heads"),
        (_glm_cfg(rope_parameters={"rope_theta": 1e4, "partial_rotary_factor": 1.0}), "f16", "partial_rotary"),
        (_glm_cfg(hidden_size=80, head_dim=40), "q4_0", "multiple of 32"),
        (_glm_cfg(intermediate_size=100), "q8_0", "intermediate_size=100"),
        (_glm_cfg(), "q3_k", "unknown quant"),
        ({"model_type": "chatglm", "position_encoding_2d": True}, "f16", "v1"),
        ({"model_type": "chatglm", "multi_query_attention": True, "add_bias_linear": True}, "f16", "add_bias_linear"),
    ],
)
def test_check_supported_rejects(cfg, quant, needle):
    with pytest.raises(BuilderError) as e:
        check_supported(cfg, quant)
    assert needle in str(str(e.value))


def test_check_supported_accepts():
    check_supported(_glm_cfg(), "q4_0")
    check_supported(_glm_cfg(hidden_size=80, head_dim=40, intermediate_size=100), "f16")  # unquantized: any size


def test_unsupported_folder_writes_nothing(tmp_path):
    model = tmp_path / "llama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    out = tmp_path / "out" / "m.bin"
    with pytest.raises(BuilderError, match="Xinference"):
        convert_model(model, quant="q4_0", out=out, quiet=True)
    assert not out.exists() and not list(out.parent.glob("*"))


def test_missing_tensors_and_bad_tokenizer(native, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in native["dir"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    from safetensors.torch import load_file

    sd = load_file(bad / "model.safetensors")
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, bad / "model.safetensors")
    with pytest.raises(BuilderError, match="lacks tensors.*down_proj"):
        convert_model(bad, quant="f16", out=tmp_path / "bad.bin", quiet=True)
    (bad / "tokenizer.json").unlink()
    with pytest.raises(BuilderError, match="no GLM-4 tokenizer"):
        convert_model(bad, quant="f16", out=tmp_path / "bad.bin", quiet=True)
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob(".*"))


# --------------------------------------------------------------------------------------------------
# Original THUDM layouts (model_type "chatglm"), built in code from a native GLM's weights
# --------------------------------------------------------------------------------------------------


def _sp_model() -> bytes:
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(DEFAULT_CORPUS * 4),
        model_writer=buf,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.98,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return buf.getvalue()


@pytest.fixture(scope="module")
def originals(tmp_path_factory, native):
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("orig")
    proto = _sp_model()
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto)
    folders = {}
    vocab_sp = (sp.get_piece_size() + 9 + 31) // 32 * 32  # room for the 9 special tokens, padded like THUDM's
    for name, system in (("chatglm2", False), ("chatglm3", True)):
        model = _random_glm(vocab_sp, seed=2 if system else 3)
        d = root / name
        d.mkdir()
        (d / "tokenizer.model").write_bytes(proto)
        (d / "config.json").write_text(json.dumps(_chatglm_config(vocab_sp, 2)))
        (d / "modeling_chatglm.py").write_text(REMOTE_CODE)
        (d / "configuration_chatglm.py").write_text(REMOTE_CODE)
        specials = '["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"' + (', "<|system|>", "<|user|>"]' if system else "]")
        (d / "tokenization_chatglm.py").write_text(REMOTE_CODE + f"SPECIAL = {specials}\n")
        (d / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "ChatGLMTokenizer",
                    "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
                }
            )
        )
        sd = _chatglm_state(model)
        if system:  # sharded safetensors with an index
            keys = sorted(sd)
            half = len(keys) // 2
            shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
            for fname, ks in shards.items():
                save_file({k: sd[k].to(torch.bfloat16) for k in ks}, d / fname)
            index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
            (d / "model.safetensors.index.json").write_text(json.dumps(index))
            model = model.to(torch.bfloat16).float()
        else:  # a single PyTorch .bin
            torch.save(sd, d / "pytorch_model.bin")
        folders[name] = (d, model)

    # GLM-4 original: tiktoken tokenizer.model rebuilt from the tiny tokenizer, same weights as the native model
    nmodel = native["model"]
    d = make_glm4_original(native["dir"], nmodel, root / "glm4")
    folders["glm4"] = (d, nmodel)
    return {"root": root, "folders": folders, "sp": sp}


@pytest.mark.parametrize("name, kind", [("chatglm2", "ChatGLM2"), ("chatglm3", "ChatGLM3"), ("glm4", "ChatGLM4")])
def test_original_layouts_convert_detect_and_match(originals, native, name, kind):
    d, model = originals["folders"][name]
    assert describe(d) == kind
    out = convert_model(d, quant="f32", out=originals["root"] / f"{name}.bin", quiet=True)
    info = read_ggml(out)
    assert info.model_type == kind
    assert info.config["rope_theta"] == pytest.approx(20000.0 if name != "glm4" else 10000.0)
    pipe = pipeline(out)
    assert pipe.model.config.model_type_name == kind
    eos = stop_ids(pipe)
    for prompt in PROMPTS[1:5]:
        ids = pipe.tokenizer.encode(prompt, 512)
        if name == "glm4":
            assert ids == native["tok"](prompt).input_ids
        else:  # [gMASK] sop, then the sentencepiece pieces
            sp = originals["sp"]
            assert ids[2:] == sp.encode(prompt) and ids[:2] == [sp.get_piece_size() + 1, sp.get_piece_size() + 3]
        assert cpp_greedy(pipe, ids, 8) == hf_greedy(model, ids, 8, eos), prompt
    if name != "chatglm2":  # system prompts need ChatGLM3/4
        msgs = [chatglm_cpp.ChatMessage("system", "Be brief."), chatglm_cpp.ChatMessage("user", "hi")]
        assert len(pipe.tokenizer.apply_chat_template(msgs, 512)) > 4


def test_original_quantized(originals):
    d, _ = originals["folders"]["chatglm3"]
    out = convert_model(d, quant="q4_1", out=originals["root"] / "chatglm3-q4_1.bin", quiet=True)
    assert read_ggml(out).model_type == "ChatGLM3"
    pipe = pipeline(out)
    assert len(cpp_greedy_no_stop(pipe, pipe.tokenizer.encode("hello", 64), 2)) == 2


def test_cli_entry_point_runs(native, tmp_path):
    out = tmp_path / "m.bin"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "builder",
            "convert",
            "--model",
            str(native["dir"]),
            "--quant",
            "f16",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith(str(out))
    assert "Processing model states" in r.stderr  # progress (and table) on stderr, path on stdout
