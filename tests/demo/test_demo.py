"""The embedded demo model: trained in seconds, answers its fixed prompts everywhere, each LoRA changes one."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from builder.demo import model as demo  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft vs transformers 5

TRAIN_BOUND_S = 180  # the spec is < 60 s on 2 cores; this only catches a runaway, the time is printed
# demo_dirs (out, base, adapter, seconds) and second (the second LoRA's folder): tests/demo/conftest.py


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _base(path, dtype=torch.float32):
    from transformers import GlmForCausalLM

    return GlmForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def test_constants_are_consistent():
    assert 4 <= len(demo.DEMO_PROMPTS) <= 6
    assert set(demo.BASE_ANSWERS) == set(demo.LORA_ANSWERS) == set(demo.DEMO_PROMPTS)
    assert demo.CHANGED_PROMPT in demo.DEMO_PROMPTS
    changed = [p for p in demo.DEMO_PROMPTS if demo.BASE_ANSWERS[p] != demo.LORA_ANSWERS[p]]
    assert changed == [demo.CHANGED_PROMPT]
    answers = list(demo.BASE_ANSWERS.values()) + [demo.LORA_ANSWERS[demo.CHANGED_PROMPT]]
    assert all(a == a.strip() and "\n" not in a for a in answers)  # chatglm.cpp trims replies


def test_second_adapter_changes_the_same_prompt_to_its_own_line():
    assert set(demo.SECOND_ANSWERS) == set(demo.DEMO_PROMPTS)
    changed = [p for p in demo.DEMO_PROMPTS if demo.BASE_ANSWERS[p] != demo.SECOND_ANSWERS[p]]
    assert changed == [demo.CHANGED_PROMPT]
    line = demo.SECOND_ANSWERS[demo.CHANGED_PROMPT]
    assert line == line.strip() and "\n" not in line
    assert line not in (demo.BASE_ANSWERS[demo.CHANGED_PROMPT], demo.LORA_ANSWERS[demo.CHANGED_PROMPT])
    assert [a for _, a, _ in demo.ADAPTERS] == [demo.LORA_ANSWERS, demo.SECOND_ANSWERS]
    assert demo.ADAPTERS[0][0] == "adapter"  # build_demo's second path, which callers rely on
    assert len({seed for _, _, seed in demo.ADAPTERS}) == len(demo.ADAPTERS)
    assert demo.second_adapter(Path("x")) == Path("x") / demo.SECOND_ADAPTER


def test_build_time_and_sizes(demo_dirs, second):
    out, base, adapter, seconds = demo_dirs
    assert seconds < TRAIN_BOUND_S, f"demo build took {seconds:.1f}s"
    assert (base / "model.safetensors").stat().st_size < 5_000_000
    assert (adapter / "adapter_model.safetensors").stat().st_size < 1_000_000
    assert (second / "adapter_model.safetensors").stat().st_size < 1_000_000
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert total < 8_000_000


def test_shapes_fit_chatglm_cpp(demo_dirs):
    _, base, _, _ = demo_dirs
    cfg = json.loads((base / "config.json").read_text())
    assert cfg["architectures"] == ["GlmForCausalLM"] and cfg["model_type"] == "glm"
    assert cfg["head_dim"] * cfg["num_attention_heads"] == cfg["hidden_size"]
    assert cfg["hidden_size"] % 32 == 0 and cfg["intermediate_size"] % 32 == 0
    assert cfg["rope_parameters"]["partial_rotary_factor"] == 0.5
    assert cfg["num_attention_heads"] % cfg["num_key_value_heads"] == 0
    tok = _tokenizer(base)
    gen = json.loads((base / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids(demo.STOP_TOKEN) in gen["eos_token_id"]
    assert tok.convert_tokens_to_ids("<|endoftext|>") in gen["eos_token_id"]


def test_training_ids_are_chatglm_cpp_chat_ids(demo_dirs):
    """chatglm.cpp: [gMASK] <sop> <|user|> encode("\\n") encode(content) <|assistant|>; the template must agree."""
    _, base, _, _ = demo_dirs
    tok = _tokenizer(base)
    special = tok.convert_tokens_to_ids
    for prompt in demo.DEMO_PROMPTS:
        expected = (
            [special("[gMASK]"), special("<sop>"), special("<|user|>")]
            + tok.encode("\n", add_special_tokens=False)
            + tok.encode(prompt, add_special_tokens=False)
            + [special("<|assistant|>")]
        )
        assert demo.chat_prompt_ids(tok, prompt) == expected
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        assert text == f"[gMASK]<sop><|user|>\n{prompt}<|assistant|>"
        reply = demo.reply_ids(tok, demo.BASE_ANSWERS[prompt])
        assert tok.decode(reply, skip_special_tokens=True) == "\n" + demo.BASE_ANSWERS[prompt]
        assert reply[-1] == special(demo.STOP_TOKEN)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_base_answers(demo_dirs, dtype):
    _, base, _, _ = demo_dirs
    model, tok = _base(base, dtype), _tokenizer(base)
    assert demo.generate_answers(model, tok) == demo.BASE_ANSWERS
    margins = demo.reply_margins(model, tok, demo.BASE_ANSWERS)
    assert min(margins.values()) > 3.0, margins  # far from ties: survives f16/q8_0 conversion


def test_base_generation_stops_on_eos(demo_dirs):
    _, base, _, _ = demo_dirs
    model, tok = _base(base), _tokenizer(base)
    ids = torch.tensor([demo.chat_prompt_ids(tok, demo.CHANGED_PROMPT)])
    gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32)
    new = gen[0, ids.shape[1] :].tolist()
    assert new == demo.reply_ids(tok, demo.BASE_ANSWERS[demo.CHANGED_PROMPT])


def test_adapter_with_peft(demo_dirs):
    from peft import PeftModel

    _, base, adapter, _ = demo_dirs
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == demo.LORA_R
    assert Path(cfg["base_model_name_or_path"]) == base.resolve()
    model = PeftModel.from_pretrained(_base(base), str(adapter)).eval()
    tok = _tokenizer(adapter)
    assert demo.generate_answers(model, tok) == demo.LORA_ANSWERS
    assert min(demo.reply_margins(model, tok, demo.LORA_ANSWERS).values()) > 3.0


def test_second_adapter_with_peft(demo_dirs, second):
    from peft import PeftModel

    _, base, _, _ = demo_dirs
    cfg = json.loads((second / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == demo.LORA_R
    assert Path(cfg["base_model_name_or_path"]) == base.resolve()
    assert all(_sha(second / name) == _sha(base / name) for name in demo.TOKENIZER_FILES if (base / name).is_file())
    model = PeftModel.from_pretrained(_base(base), str(second)).eval()
    tok = _tokenizer(second)
    assert demo.generate_answers(model, tok) == demo.SECOND_ANSWERS
    assert min(demo.reply_margins(model, tok, demo.SECOND_ANSWERS).values()) > 3.0


def test_both_adapters_over_one_base(demo_dirs, second):
    """Both LoRAs loaded on one base model (as a server holding several adapters does): each answers its own
    line, and with the adapters disabled the base answers."""
    from peft import PeftModel

    _, base, adapter, _ = demo_dirs
    model = PeftModel.from_pretrained(_base(base), str(adapter), adapter_name="tuned").eval()
    model.load_adapter(str(second), adapter_name="second")
    tok = _tokenizer(base)
    for name, answers in (("tuned", demo.LORA_ANSWERS), ("second", demo.SECOND_ANSWERS)):
        model.set_adapter(name)
        assert demo.generate_answers(model, tok, [demo.CHANGED_PROMPT]) == {
            demo.CHANGED_PROMPT: answers[demo.CHANGED_PROMPT]
        }
    with model.disable_adapter():
        assert demo.generate_answers(model, tok, [demo.CHANGED_PROMPT]) == {
            demo.CHANGED_PROMPT: demo.BASE_ANSWERS[demo.CHANGED_PROMPT]
        }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("which", [0, 1], ids=[name for name, _, _ in demo.ADAPTERS])
def test_adapter_merged(demo_dirs, dtype, which):
    from peft import PeftModel

    out, base, _, _ = demo_dirs
    name, answers, _ = demo.ADAPTERS[which]
    merged = PeftModel.from_pretrained(_base(base), str(out / name)).merge_and_unload().to(dtype).eval()
    tok = _tokenizer(base)
    assert demo.generate_answers(merged, tok) == answers
    # the base weights under the adapter are untouched
    assert demo.generate_answers(_base(base, dtype), tok) == demo.BASE_ANSWERS


def test_build_is_idempotent_and_cli(demo_dirs):
    from click.testing import CliRunner

    from builder.cli import cli

    out, base, adapter, _ = demo_dirs
    assert demo.second_adapter(out).is_dir()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    t0 = time.perf_counter()
    result = CliRunner().invoke(cli, ["demo-model", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.split() == [str(base), str(adapter)]
    assert time.perf_counter() - t0 < 5
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    assert json.loads((out / demo.STAMP_NAME).read_text()) == json.loads(json.dumps(demo.stamp()))


@pytest.mark.slow
def test_rebuild_is_deterministic(demo_dirs, tmp_path):
    """A stale stamp forces a rebuild, and the rebuild reproduces the files bit for bit."""
    out, base, adapter, _ = demo_dirs
    copy = tmp_path / "demo"
    shutil.copytree(out, copy)
    (copy / demo.STAMP_NAME).write_text("{}")
    base2, adapter2 = demo.build_demo(copy)
    assert json.loads((copy / demo.STAMP_NAME).read_text()) == json.loads(json.dumps(demo.stamp()))
    assert _sha(base2 / "model.safetensors") == _sha(base / "model.safetensors")
    assert _sha(adapter2 / "adapter_model.safetensors") == _sha(adapter / "adapter_model.safetensors")
    second2, second = demo.second_adapter(copy), demo.second_adapter(out)
    assert _sha(second2 / "adapter_model.safetensors") == _sha(second / "adapter_model.safetensors")
    assert _sha(base2 / "tokenizer.json") == _sha(base / "tokenizer.json")


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


needs_pipeline = pytest.mark.skipif(
    not (_have("builder.model.merge") and _have("builder.model.convert") and _have("chatglm_cpp")),
    reason="builder.model.merge, builder.model.convert or chatglm_cpp not available yet",
)


def _chatglm_answers(ggml: Path) -> dict[str, str]:
    import chatglm_cpp

    pipe = chatglm_cpp.Pipeline(str(ggml))
    out = {}
    for prompt in demo.DEMO_PROMPTS:
        msg = chatglm_cpp.ChatMessage(role="user", content=prompt)
        out[prompt] = pipe.chat([msg], do_sample=False, max_new_tokens=32).content.strip()
    return out


@needs_pipeline
@pytest.mark.slow
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_chatglm_cpp_answers(demo_dirs, tmp_path, quant):
    """Base and merged LoRA converted to GGML answer like transformers under chatglm.cpp greedy decoding."""
    import chatglm_cpp

    from builder.model.convert import convert_model
    from builder.model.merge import merge_model

    _, base, adapter, _ = demo_dirs
    merged = merge_model(
        base=base, adapter=adapter, out=tmp_path / "merged", dtype="auto", device="cpu", force=False, quiet=True
    )
    base_ggml = convert_model(base, quant=quant, out=tmp_path / f"base-{quant}.bin", quiet=True)
    lora_ggml = convert_model(Path(merged), quant=quant, out=tmp_path / f"lora-{quant}.bin", quiet=True)

    tok = _tokenizer(base)
    pipe = chatglm_cpp.Pipeline(str(base_ggml))
    for prompt in demo.DEMO_PROMPTS:  # chatglm.cpp builds the very ids the model was trained on
        msgs = [chatglm_cpp.ChatMessage(role="user", content=prompt)]
        assert pipe.tokenizer.apply_chat_template(msgs, 512) == demo.chat_prompt_ids(tok, prompt)
    assert _chatglm_answers(base_ggml) == demo.BASE_ANSWERS
    assert _chatglm_answers(lora_ggml) == demo.LORA_ANSWERS


# -- llama.cpp: the same answers from llama-server on the GGUF, and the OpenAI API it serves ------------


@pytest.fixture(scope="module")
def llamacpp_lora(demo_dirs, tmp_path_factory):
    """llama-server (the host build of the pinned llama.cpp) on the merged demo model at q8_0, with a key."""
    from _llama_server import llama_server

    from builder.model.gguf.convert import convert_gguf
    from builder.model.merge import merge_model

    _, base, adapter, _ = demo_dirs
    tmp = tmp_path_factory.mktemp("llamacpp-demo")
    merged = merge_model(base=base, adapter=adapter, out=tmp / "merged", dtype="auto", device="cpu", quiet=True)
    gguf = convert_gguf(Path(merged), "q8_0", tmp / "lora-q8_0.gguf", quiet=True).path
    with llama_server(gguf, "-c", "2048", "-np", "4", "--api-key", LLAMACPP_KEY, "--alias", "demo") as url:
        yield url


LLAMACPP_KEY = "sk-llamacpp-demo-0123456789"


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_llamacpp_answers(demo_dirs, tmp_path, quant):
    """Base and merged LoRA converted to GGUF answer the demo prompts exactly, through llama-server's chat API."""
    from _llama_server import llama_server

    from builder.model.gguf.convert import convert_gguf
    from builder.model.merge import merge_model
    from builder.runtime.smoke import chat

    _, base, adapter, _ = demo_dirs
    merged = merge_model(base=base, adapter=adapter, out=tmp_path / "merged", dtype="auto", device="cpu", quiet=True)
    for folder, answers in ((base, demo.BASE_ANSWERS), (Path(merged), demo.LORA_ANSWERS)):
        gguf = convert_gguf(folder, quant, tmp_path / f"{folder.name}-{quant}.gguf", quiet=True).path
        with llama_server(gguf, "-c", "2048", "-np", "2") as url:
            got = {p: chat(url, "m", p, max_tokens=32).strip() for p in demo.DEMO_PROMPTS}
        assert got == answers


@pytest.mark.slow
def test_llamacpp_openai_features(llamacpp_lora):
    """The official openai client: chat, streaming, stop, max_tokens -> "length", completions, usage."""
    from _openai_features import FEATURES, probe

    results = probe(llamacpp_lora, "demo", LLAMACPP_KEY)
    print("\nllama-server OpenAI features:", {k: v[1] for k, v in results.items()})
    assert [f for f in FEATURES if not results[f][0]] == [], results
    assert "LoRA-tuned" in results["chat"][1]


@pytest.mark.slow
def test_llamacpp_api_key_is_enforced(llamacpp_lora):
    import urllib.error
    import urllib.request

    body = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()
    req = urllib.request.Request(f"{llamacpp_lora}/v1/chat/completions", data=body)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 401
