"""builder.demo.tiny: GLM-4-layout tokenizer and random native GLM folders that others build tests on."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from builder.demo.tiny import GLM4_SPECIAL_TOKENS, build_glm_tokenizer, make_random_glm  # noqa: E402


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    return make_random_glm(tmp_path_factory.mktemp("tiny") / "glm")


def test_tokenizer_layout(tmp_path):
    tok = build_glm_tokenizer(tmp_path / "tok")
    data = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    n = len(vocab)
    assert n == 600 and sorted(vocab.values()) == list(range(n))  # regular ranks exactly 0..N-1
    assert [tok.convert_tokens_to_ids(t) for t in GLM4_SPECIAL_TOKENS] == list(range(n, n + 14))
    assert len(tok) == n + 14
    assert len(data["model"]["merges"]) > 300  # it learned merges
    ids = tok("Hello 你好 def f(): 😀").input_ids
    assert ids[:2] == [n + 2, n + 4]  # [gMASK] <sop>, as chatglm.cpp's encode()
    assert tok.decode(ids, skip_special_tokens=True) == "Hello 你好 def f(): 😀"
    assert len(tok("the quick brown fox jumps").input_ids) < 2 + len("the quick brown fox jumps") * 2 // 3
    cfg = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert cfg["chat_template"].startswith("[gMASK]<sop>")


def test_chat_template_matches_glm4_format(glm):
    tok = AutoTokenizer.from_pretrained(glm)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == "[gMASK]<sop><|system|>\nS<|user|>\nU<|assistant|>\nA<|assistant|>"
    assert tok.apply_chat_template(msgs[:2], tokenize=False) == "[gMASK]<sop><|system|>\nS<|user|>\nU"


def test_random_glm_folder(glm):
    names = {p.name for p in glm.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= names
    assert sum(p.stat().st_size for p in glm.iterdir()) < 5 * 2**20
    cfg = json.loads((glm / "config.json").read_text())
    assert cfg["model_type"] == "glm" and cfg["architectures"] == ["GlmForCausalLM"]
    assert cfg["head_dim"] * cfg["num_attention_heads"] == cfg["hidden_size"]
    assert cfg["rope_parameters"]["partial_rotary_factor"] == 0.5
    assert cfg["hidden_size"] % 32 == 0 and cfg["intermediate_size"] % 32 == 0
    tok = AutoTokenizer.from_pretrained(glm)
    assert cfg["vocab_size"] == len(tok)
    gen = json.loads((glm / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.convert_tokens_to_ids(["<|endoftext|>", "<|user|>", "<|observation|>"])
    model = AutoModelForCausalLM.from_pretrained(glm).eval()
    ids = tok(["hello world"], return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] <= ids["input_ids"].shape[1] + 4


def test_seed_dtype_and_shared_tokenizer(glm, tmp_path):
    a = make_random_glm(tmp_path / "a", seed=1, tokenizer_dir=glm, dtype=torch.bfloat16)
    b = make_random_glm(tmp_path / "b", seed=1, tokenizer_dir=glm, dtype=torch.bfloat16)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_text() == (glm / "tokenizer.json").read_text()
    assert json.loads((a / "config.json").read_text())["dtype"] == "bfloat16"
    c = make_random_glm(tmp_path / "c", seed=2, tokenizer_dir=glm)
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    with pytest.raises(ValueError):
        make_random_glm(tmp_path / "bad", hidden_size=64, num_heads=3, tokenizer_dir=glm)
