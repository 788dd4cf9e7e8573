"""GGUF conversion with llama.cpp's own converter and quantizer: llama-server's greedy ids equal
transformers' for native GLM, Llama, Qwen2 and a GLM-4 original folder; quantized types load and answer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from _chatglm_original import REMOTE_CODE, make_glm4_original  # noqa: E402
from _llama_server import llama_server, post  # noqa: E402
from _tiny_hf import PROMPTS  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from builder.demo.tiny import make_random_glm, make_random_llama, make_random_qwen2  # noqa: E402
from builder.errors import BuilderError  # noqa: E402
from builder.model.gguf import llamacpp  # noqa: E402
from builder.model.gguf.convert import (  # noqa: E402
    QUANTS,
    architectures,
    check_supported,
    convert_gguf,
    read_gguf,
    source_dir,
)

REPO = Path(__file__).resolve().parents[2]
N_NEW = 16


def hf_greedy(model, ids: list[int], n: int, banned: list[int] = ()) -> list[int]:
    """Exactly n greedy tokens, one full forward per token, never one of `banned`."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            logits[list(banned)] = float("-inf")
            nxt = int(logits.argmax())
            ids.append(nxt)
            out.append(nxt)
    return out


def server_greedy(url: str, ids: list[int], n: int, banned: list[int] = ()) -> list[int]:
    body = {
        "prompt": ids,
        "n_predict": n,
        "temperature": 0,
        "top_k": 1,
        "ignore_eos": True,
        "logit_bias": [[i, False] for i in banned],
        "return_tokens": True,
        "cache_prompt": False,
    }
    return post(url + "/completion", body)["tokens"]


def special_ids(tok) -> list[int]:
    """Every added/special token: llama.cpp's ignore_eos bans its end-of-generation tokens (a set that need
    not match transformers' eos list), so both sides are kept to the regular vocabulary instead."""
    return sorted(set(tok.all_special_ids) | set(tok.added_tokens_decoder))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-models")
    glm = make_random_glm(root / "glm")
    glm_model = AutoModelForCausalLM.from_pretrained(glm, dtype=torch.float32).eval()
    folders = {
        "glm": glm,
        "llama": make_random_llama(root / "llama"),
        "qwen2": make_random_qwen2(root / "qwen2"),
        "glm4-original": make_glm4_original(glm, glm_model, root / "glm4-original"),
    }
    return {"root": root, "folders": folders, "glm_model": glm_model}


@pytest.fixture(scope="module")
def converted(models):
    """convert_gguf(folder, quant) once per module: the greedy, prefix, metadata and truncation tests read
    the same files (each conversion is a converter process)."""
    cache: dict[tuple[str, str], Path] = {}

    def get(name: str, quant: str) -> Path:
        if (name, quant) not in cache:
            out = models["root"] / f"{name}-{quant}.gguf"
            cache[name, quant] = convert_gguf(models["folders"][name], quant, out, quiet=True).path
        return cache[name, quant]

    return get


def _reference(models, name: str):
    """transformers model + tokenizer for a folder (the GLM-4 original is the native GLM's weights)."""
    if name == "glm4-original":
        return models["glm_model"], AutoTokenizer.from_pretrained(models["folders"]["glm"])
    d = models["folders"][name]
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(d)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["glm", "llama", "qwen2", "glm4-original"])
@pytest.mark.parametrize("quant", ["f32", "f16"])
def test_greedy_ids_equal_transformers(models, converted, name, quant):
    out = converted(name, quant)
    info = read_gguf(out)
    assert info.file_type == {"f32": "ALL_F32", "f16": "MOSTLY_F16"}[quant]
    model, tok = _reference(models, name)
    with llama_server(out, "-c", "512", "-np", "1") as url:
        for prompt in PROMPTS[:10]:
            # Same text -> same ids (special tokens aside: see test_glm_completion_prompt_prefix).
            plain = tok(prompt, add_special_tokens=False).input_ids
            assert post(url + "/tokenize", {"content": prompt, "add_special": False})["tokens"] == plain, prompt
            # Same ids -> same 16 greedy tokens.
            ids = tok(prompt).input_ids
            banned = special_ids(tok)
            assert server_greedy(url, ids, N_NEW, banned) == hf_greedy(model, ids, N_NEW, banned), (name, quant, prompt)


def test_glm_completion_prompt_prefix(models, converted):
    """A documented difference: for a raw completion prompt, llama.cpp adds GLM's BOS ([gMASK]) but not
    the <sop> that transformers' GLM tokenizer also adds; chat prompts come out the same (the chat
    template writes both, and llama.cpp drops its own BOS from the rendered template)."""
    out = converted("glm", "f16")
    tok = AutoTokenizer.from_pretrained(models["folders"]["glm"])
    gmask, sop = tok.convert_tokens_to_ids(["[gMASK]", "<sop>"])
    messages = [{"role": "user", "content": "Who are you?"}]
    chat_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    with llama_server(out, "-c", "512", "-np", "1") as url:
        raw = post(url + "/tokenize", {"content": "Hello world", "add_special": True})["tokens"]
        assert raw[:2] == [gmask, raw[1]] and raw[1] != sop
        assert tok("Hello world").input_ids[:2] == [gmask, sop]
        rendered = post(url + "/apply-template", {"messages": messages})["prompt"]
        served = post(url + "/tokenize", {"content": rendered, "add_special": True, "parse_special": True})
        assert served["tokens"] == list(chat_ids), rendered


def test_glm_hparams_reach_the_gguf(converted):
    """The HF GLM keys (context, epsilon, RoPE base) land in the GGUF, not the converter's defaults."""
    out = converted("glm", "f32")
    meta = read_gguf(out).metadata
    assert meta["chatglm.context_length"] == 2048
    assert meta["chatglm.attention.layer_norm_rms_epsilon"] == pytest.approx(1.5625e-07)
    assert meta["chatglm.rope.freq_base"] == pytest.approx(10000.0)
    assert "[gMASK]<sop>" in meta["tokenizer.chat_template"]


@pytest.mark.slow
@pytest.mark.parametrize("quant", [q for q in QUANTS if q not in ("f32", "f16")])
def test_quantized_types_convert_load_and_answer(models, quant):
    """hidden 256 so that K-quant blocks (256 values) fit whole rows."""
    big = models["root"] / "llama-h256"
    if not big.exists():
        make_random_llama(big, hidden_size=256, intermediate_size=512)
    out = convert_gguf(big, quant, models["root"] / f"llama-h256-{quant}.gguf", quiet=True).path
    info = read_gguf(out)
    assert info.file_type.endswith(quant.upper()), info.file_type
    assert any(t == quant.upper().removesuffix("_M") for _, _, t, _ in info.tensors) or quant == "bf16"
    tok = AutoTokenizer.from_pretrained(big)
    with llama_server(out, "-c", "256", "-np", "1") as url:
        tokens = server_greedy(url, tok("Hello world").input_ids, 8)
    assert len(tokens) == 8


def test_no_remote_code_runs(models, tmp_path):
    """auto_map + a tokenizer class that only the folder's code defines: refused, nothing executed."""
    d = tmp_path / "remote"
    d.mkdir()
    src = models["folders"]["llama"]
    for f in src.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / "tokenization_custom.py").write_text(REMOTE_CODE)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]}
    cfg["tokenizer_class"] = "CustomTokenizer"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "tokenizer.json").unlink()
    with pytest.raises(BuilderError) as err:
        convert_gguf(d, "f16", tmp_path / "x.gguf", quiet=True)
    assert "remote code from the model folder was executed" not in str(err.value)
    assert not (tmp_path / "x.gguf").exists()


def test_lazy_conversion_uses_less_memory_than_the_model(models, tmp_path):
    """Lazy (the default) streams tensors into the file; the converter's eager mode holds them all first."""
    big = tmp_path / "llama-big"
    make_random_llama(
        big, hidden_size=1024, intermediate_size=2816, num_layers=6, num_heads=8, num_kv_heads=8, dtype=torch.bfloat16
    )
    size_mb = sum(f.stat().st_size for f in big.glob("*.safetensors")) / 1e6
    lazy = convert_gguf(big, "f16", tmp_path / "lazy.gguf", quiet=True)
    eager = convert_gguf(big, "f16", tmp_path / "eager.gguf", quiet=True, eager=True)
    print(f"\n{size_mb:.0f} MB bf16 model to f16 GGUF, converter peak RSS: lazy {lazy.converter_peak_rss_mb:.0f} MB, "
          f"eager {eager.converter_peak_rss_mb:.0f} MB")  # fmt: skip
    assert size_mb > 150
    assert lazy.converter_peak_rss_mb + size_mb / 2 < eager.converter_peak_rss_mb
    assert (tmp_path / "lazy.gguf").read_bytes() == (tmp_path / "eager.gguf").read_bytes()


def test_unsupported_architecture_and_bad_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["NoSuchForCausalLM"]}))
    with pytest.raises(BuilderError, match="does not register NoSuchForCausalLM"):
        convert_gguf(tmp_path, "f16", tmp_path / "out.gguf")
    with pytest.raises(BuilderError, match="unknown GGUF type"):
        convert_gguf(tmp_path, "q3_k_s", tmp_path / "out.gguf")
    assert check_supported({"architectures": ["Qwen2ForCausalLM"]}) is None


def test_chatglm3_original_is_refused_with_a_remedy(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "chatglm", "architectures": ["ChatGLMModel"]}))
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x05hello not tiktoken")
    with pytest.raises(BuilderError, match="BACKEND=chatglmcpp"):
        convert_gguf(tmp_path, "f16", tmp_path / "out.gguf")


def test_committed_architecture_list_is_the_pinned_converters():
    assert sorted(architectures()) == llamacpp.registered_architectures(source_dir())
    assert {
        "GlmForCausalLM",
        "ChatGLMModel",
        "Glm4ForCausalLM",
        "LlamaForCausalLM",
        "Qwen2ForCausalLM",
    } <= architectures()


def test_truncated_gguf_is_refused(converted, tmp_path):
    out = converted("qwen2", "f16")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    with pytest.raises(BuilderError):
        read_gguf(cut)


def test_cli_convert_and_inspect(models, tmp_path):
    out = tmp_path / "m.gguf"
    r = subprocess.run(
        [sys.executable, "-m", "builder", "convert", "--format", "gguf", "--model", str(models["folders"]["qwen2"])]
        + ["--quant", "f16", "--out", str(out), "--quiet"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith(str(out))
    r = subprocess.run([sys.executable, "-m", "builder", "inspect", str(out)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "architecture qwen2" in r.stdout and "MOSTLY_F16" in r.stdout and "chat template: yes" in r.stdout
