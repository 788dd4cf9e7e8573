"""GGML conversion for chatglm.cpp: no remote code, no model instantiation, one tensor in memory at a time.

chatglm.cpp's own converter classes write the file (its header layout, quantizers and tensor order);
we only feed them light adapters (see layouts.py, vocab.py). Its convert.py is loaded from a file path,
never through the `chatglm_cpp` package, so the compiled runtime extension is not needed here.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from builder.errors import BuilderError
from builder.files import atomic_file

# The GGML types chatglm.cpp's converter writes.
QUANTS = ("f32", "f16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
# The default GGML type (QUANT unset): chatglm.cpp has no K-quants, and the same kernels on GGUF measured
# q4_0 at KL 0.378 / top-1 0.67 against q8_0's 0.005 / 0.955 (docs/quality.md).
DEFAULT_QUANT = "q8_0"
SUPPORTED = (
    "ChatGLM2-6B, ChatGLM3-6B, GLM-4-9B-Chat (original THUDM layout, model_type 'chatglm') and "
    "transformers-native GLM (GlmForCausalLM, model_type 'glm', e.g. glm-4-9b-chat-hf)"
)
OTHER_BACKENDS = (
    "serve it with the llama.cpp, vLLM or Xinference backend instead (chatglm.cpp 0.4 dropped Baichuan and InternLM)"
)

__all__ = ["DEFAULT_QUANT", "QUANTS", "check_supported", "convert_model", "load_chatglm_convert"]


# --------------------------------------------------------------------------------------------------
# chatglm.cpp's convert.py, without its package __init__ (which loads the compiled _C extension)
# --------------------------------------------------------------------------------------------------


def _convert_py_path() -> Path:
    env = os.environ.get("CHATGLM_CPP_CONVERT_PY")
    if env:
        p = Path(env)
        if not p.is_file():
            raise BuilderError(f"CHATGLM_CPP_CONVERT_PY={env} does not exist; point it at chatglm_cpp/convert.py.")
        return p
    spec = importlib.util.find_spec("chatglm_cpp")  # finds the package without importing it
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / "convert.py"
        if p.is_file():
            return p
    raise BuilderError(
        "chatglm.cpp's convert.py was not found: pip install chatglm-cpp==0.4.2, or set "
        "CHATGLM_CPP_CONVERT_PY to a convert.py extracted from its wheel."
    )


@functools.cache
def load_chatglm_convert():
    """Import chatglm_cpp/convert.py as a standalone module (needs torch, transformers, tabulate, tqdm)."""
    path = _convert_py_path()
    spec = importlib.util.spec_from_file_location("_builder_chatglm_cpp_convert", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as e:
        raise BuilderError(f"cannot load {path}: {e}. Install torch, transformers, tabulate and tqdm.") from e
    return module


# --------------------------------------------------------------------------------------------------
# What chatglm.cpp can run
# --------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """A folder's normalized shape and the chatglm.cpp layout it maps onto."""

    family: str  # "chatglm" (original THUDM) or "glm" (transformers-native)
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    ffn: int
    vocab: int
    eps: float
    rope_ratio: float
    seq_length: int
    eos: int | None
    pad: int | None
    pre_seq_len: int = 0
    tied: bool = False
    notes: list[str] = field(default_factory=list)


def _unsupported(what: str) -> BuilderError:
    return BuilderError(f"{what}. chatglm.cpp supports {SUPPORTED}; {OTHER_BACKENDS}.")


def _first_int(v):
    if isinstance(v, (list, tuple)):
        return int(v[0]) if v else None
    return None if v is None else int(v)


def _plan(config: dict) -> Plan:
    mt = config.get("model_type")
    arch = ", ".join(config.get("architectures") or []) or "?"
    if mt == "chatglm":
        if "multi_query_attention" not in config:
            raise _unsupported("ChatGLM-6B (v1) checkpoints are not supported by this converter")
        if config.get("vision_config"):
            raise _unsupported("GLM-4V (vision) checkpoints are not supported by this converter")
        expect = {
            "add_bias_linear": False,
            "add_qkv_bias": True,
            "apply_residual_connection_post_layernorm": False,
            "multi_query_attention": True,
            "original_rope": True,
            "post_layer_norm": True,
            "rmsnorm": True,
        }
        defaults = {"original_rope": True, "post_layer_norm": True, "rmsnorm": True}  # ChatGLMConfig defaults
        for key, want in expect.items():
            got = config.get(key, defaults.get(key, False))
            if got is not want:
                raise _unsupported(f"this ChatGLM config has {key}={got!r}, chatglm.cpp needs {want!r}")
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        head_dim = int(config.get("kv_channels") or hidden // heads)
        pre = config.get("pre_seq_len") or 0
        if pre and config.get("prefix_projection"):
            raise _unsupported("P-tuning v2 with prefix_projection=true cannot be exported")
        return Plan(
            family="chatglm",
            hidden=hidden,
            heads=heads,
            kv_heads=int(config.get("multi_query_group_num") or 1),
            head_dim=head_dim,
            layers=int(config["num_layers"]),
            ffn=int(config["ffn_hidden_size"]),
            vocab=int(config.get("padded_vocab_size") or config.get("vocab_size")),
            eps=float(config.get("layernorm_epsilon", 1e-5)),
            rope_ratio=float(config.get("rope_ratio", 1) or 1),
            seq_length=int(config.get("seq_length", 2048)),
            eos=_first_int(config.get("eos_token_id")),
            pad=_first_int(config.get("pad_token_id")),
            pre_seq_len=int(pre),
        )
    if mt == "glm":
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        rope = config.get("rope_parameters") or {}
        scaling = config.get("rope_scaling") or {}
        rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        if rope_type != "default":
            raise _unsupported(f"rope type {rope_type!r} (RoPE scaling) is not implemented by chatglm.cpp")
        theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
        partial = float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.5)))
        if abs(partial - 0.5) > 1e-9:
            raise _unsupported(f"partial_rotary_factor={partial}; chatglm.cpp rotates exactly half of each head (0.5)")
        act = config.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise _unsupported(f"hidden_act={act!r}; chatglm.cpp uses SwiGLU (silu)")
        return Plan(
            family="glm",
            hidden=hidden,
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            layers=int(config["num_hidden_layers"]),
            ffn=int(config["intermediate_size"]),
            vocab=int(config["vocab_size"]),
            eps=float(config.get("rms_norm_eps", 1e-5)),
            rope_ratio=theta / 10000.0,
            seq_length=int(config.get("max_position_embeddings", 8192)),
            eos=_first_int(config.get("eos_token_id")),
            pad=_first_int(config.get("pad_token_id")),
            tied=bool(config.get("tie_word_embeddings", False)),
        )
    if mt == "glm4":
        raise _unsupported(
            f"GLM-4-0414 style checkpoints (model_type 'glm4', {arch}) have extra norms chatglm.cpp lacks"
        )
    raise _unsupported(f"model_type {mt!r} ({arch}) cannot be converted for chatglm.cpp")


def check_supported(config: dict, quant: str) -> None:
    """Raise BuilderError unless chatglm.cpp can run a model with this config.json dict at this quant type."""
    if quant not in QUANTS:
        raise BuilderError(f"unknown quant type {quant!r}; choose one of {', '.join(QUANTS)}.")
    plan = _plan(config)
    if plan.head_dim * plan.heads != plan.hidden:
        raise _unsupported(
            f"head_dim {plan.head_dim} x {plan.heads} heads != hidden_size {plan.hidden}; chatglm.cpp needs them equal"
        )
    if plan.kv_heads <= 0 or plan.heads % plan.kv_heads:
        raise _unsupported(f"{plan.heads} attention heads are not a multiple of {plan.kv_heads} key/value heads")
    if plan.head_dim % 4:
        raise _unsupported(f"head_dim {plan.head_dim} is not a multiple of 4 (half of it is rotated in pairs)")
    if quant not in ("f32", "f16"):
        bad = [f"{n}={v}" for n, v in (("hidden_size", plan.hidden), ("intermediate_size", plan.ffn)) if v % 32]
        if bad:
            raise BuilderError(
                f"{quant} quantizes blocks of 32 values but {', '.join(bad)} is not a multiple of 32; "
                "use --quant f16 or f32 for this model."
            )


# --------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------


def _read_config(model: Path) -> dict:
    if not model.is_dir():
        raise BuilderError(f"{model} is not a folder; --model takes a Hugging Face model folder.")
    cfg = model / "config.json"
    if not cfg.is_file():
        raise BuilderError(f"{model} has no config.json; point --model at a Hugging Face model folder.")
    try:
        return json.loads(cfg.read_text())
    except ValueError as e:
        raise BuilderError(f"{cfg} is not valid JSON ({e}).") from e


def _chatglm_config(plan: Plan, config: dict, eos: int | None) -> SimpleNamespace:
    """The attributes ChatGLM2Converter.dump_config reads, with the values chatglm.cpp needs."""
    return SimpleNamespace(
        add_bias_linear=False,
        add_qkv_bias=True,
        apply_residual_connection_post_layernorm=False,
        kv_channels=plan.head_dim,
        num_attention_heads=plan.heads,
        hidden_size=plan.hidden,
        multi_query_attention=True,
        original_rope=True,
        post_layer_norm=True,
        rmsnorm=True,
        padded_vocab_size=plan.vocab,
        multi_query_group_num=plan.kv_heads,
        num_layers=plan.layers,
        ffn_hidden_size=plan.ffn,
        layernorm_epsilon=plan.eps,
        pre_seq_len=plan.pre_seq_len or None,
        rope_ratio=plan.rope_ratio,
        seq_length=plan.seq_length,
        eos_token_id=eos,
        pad_token_id=plan.pad,
        quantization_bit=config.get("quantization_bit"),
    )


@dataclass
class Prepared:
    converter_name: str  # ChatGLM2Converter | ChatGLM3Converter | ChatGLM4Converter
    model: object
    tokenizer: object
    notes: list[str]


def _prepare(model: Path, quant: str, tmpdir: Path) -> Prepared:
    from builder.model.convert import layouts, vocab

    config = _read_config(model)
    check_supported(config, quant)
    plan = _plan(config)
    notes: list[str] = []

    tm = model / "tokenizer.model"
    if plan.family == "chatglm" and not (tm.is_file() and vocab.is_tiktoken_file(tm)):
        name = "ChatGLM3Converter" if vocab.has_system_role(model, config) else "ChatGLM2Converter"
        proto = vocab.sentencepiece_proto(model)
        tokenizer = SimpleNamespace(
            tokenizer=SimpleNamespace(sp_model=SimpleNamespace(serialized_model_proto=lambda: proto))
        )
        tok_size = None
        eos = plan.eos
    else:
        name = "ChatGLM4Converter"
        text, n, warns = vocab.glm4_vocab(model)
        notes += warns
        vocab_file = tmpdir / "glm4.tiktoken"
        vocab_file.write_bytes(text)
        tokenizer = SimpleNamespace(vocab_file=str(vocab_file))
        tok_size = n + len(vocab.GLM4_SPECIAL_TOKENS)
        eos = n  # <|endoftext|>; chatglm.cpp adds <|user|> and <|observation|> as extra stops
    if tok_size is not None and tok_size > plan.vocab:
        raise BuilderError(
            f"the tokenizer has {tok_size} tokens but the model only {plan.vocab} embeddings; "
            "the tokenizer files do not belong to this model."
        )

    tensors = layouts.LazyTensors(model)
    if plan.family == "glm":
        state = layouts.GlmToChatGLM(
            tensors,
            plan.layers,
            plan.tied,
            hidden_size=plan.heads * plan.head_dim,
            kv_dim=plan.kv_heads * plan.head_dim,
        )
        missing = state.missing()
    else:
        state = tensors
        missing = layouts.chatglm_missing(tensors, plan.layers, plan.pre_seq_len)
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise BuilderError(
            f"{model} lacks tensors chatglm.cpp needs: {', '.join(missing[:5])}{more}. "
            "Is this a LoRA adapter or a partial checkpoint? Merge it first (python -m builder merge)."
        )
    adapter = layouts.ModelAdapter(_chatglm_config(plan, config, eos), state)
    return Prepared(name, adapter, tokenizer, notes)


def describe(model: Path) -> str:
    """The chatglm.cpp model type a folder converts to (e.g. 'ChatGLM4'), without converting it."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return _prepare(Path(model), "f16", Path(tmp)).converter_name.removesuffix("Converter")


def convert_model(model: Path, quant: str, out: Path, quiet: bool = False) -> Path:
    """Convert a model folder to a chatglm.cpp GGML file at `out` (written to a temp file, then renamed)."""
    import tempfile

    model, out = Path(model), Path(out)
    if out.is_dir():
        raise BuilderError(f"--out {out} is a folder; give a file name such as {out / 'model-ggml.bin'}.")
    out.parent.mkdir(parents=True, exist_ok=True)
    cc = load_chatglm_convert()
    ggml_type = cc.GGMLType[quant.upper()] if quant in QUANTS else None
    with tempfile.TemporaryDirectory(prefix="builder-convert-") as tmpdir:
        prep = _prepare(model, quant, Path(tmpdir))
        converter = getattr(cc, prep.converter_name)
        log = sys.stderr if not quiet else io.StringIO()
        for note in prep.notes:
            print(f"warning: {note}", file=sys.stderr)
        if not quiet:
            print(f"converting {model} -> {out} ({prep.converter_name.removesuffix('Converter')}, {quant})", file=log)

        from tqdm import tqdm as _tqdm

        saved = {name: getattr(cc, name) for name in ["tqdm", *_QUANTIZERS]}
        cc.tqdm = functools.partial(_tqdm, disable=quiet, file=sys.stderr, unit="tensor")
        for name in _QUANTIZERS:
            setattr(cc, name, _row_chunked(saved[name]))
        try:
            with atomic_file(out) as tmp:
                with open(tmp, "wb") as f, contextlib.redirect_stdout(log):  # its tensor table goes to stderr
                    converter.convert(f, prep.model, prep.tokenizer, ggml_type)
                from builder.model.convert.inspect import read_ggml

                read_ggml(tmp)  # walks every record to the end of the file, or raises
        finally:
            for name, fn in saved.items():
                setattr(cc, name, fn)
    return out


_QUANTIZERS = ["quantize_q8_0", "quantize_q4_0", "quantize_q4_1", "quantize_q5_0", "quantize_q5_1"]
_CHUNK_VALUES = 1 << 22  # 4M values: 16 MB of float32 per quantizer call


def _row_chunked(quantize):
    """chatglm.cpp's quantizer applied to row chunks upcast to float32, one chunk at a time.

    Blocks of 32 never cross rows, so the bytes equal quantizing the whole float32 tensor at once
    (what chatglm.cpp's own convert does) while peak memory stays a chunk, not a tensor, of temporaries.
    """

    def run(tensor):
        import torch

        rows = max(1, _CHUNK_VALUES // max(1, tensor.shape[-1]))
        if tensor.shape[0] <= rows:
            return quantize(tensor.float())
        parts = [quantize(chunk.float()) for chunk in tensor.split(rows, dim=0)]
        return torch.cat(parts, dim=0)

    return run
