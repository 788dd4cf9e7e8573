"""Run llama.cpp's own `convert_hf_to_gguf.py` (lazy mode) with three guards, in a child process.

`python -m builder.model.gguf.hf_to_gguf --llama-cpp SRC [--pre-tokenizer NAME] -- CONVERTER_ARGS...`

1. No code from the model folder runs: the converter asks transformers for tokenizers with
   `trust_remote_code=True`; here every remote-code hook refuses instead.
2. A BPE tokenizer whose pre-tokenizer hash the converter does not know (a retrained or trimmed
   tokenizer; the hash is over the tokens of a fixed text) is named from its tokenizer.json split
   regex when that regex is exactly one llama.cpp implements, or from --pre-tokenizer.
3. A Qwen2-VL / Qwen2.5-VL checkpoint in transformers' >= 4.52 key layout (`model.visual.*`) gets its
   vision encoder into the mmproj (`--mmproj`): the converter's vision class matches `visual.*` only.
4. transformers-native GLM (GlmForCausalLM) goes through the converter's ChatGLM class, which reads
   only the original THUDM config keys: its context, norm epsilon and RoPE base are taken from the
   HF keys (max_position_embeddings, rms_norm_eps, rope_theta) when the THUDM ones are absent, or the
   GGUF would carry hidden_size as its context and 1e-5 as its epsilon.
"""

from __future__ import annotations

import argparse
import json
import logging
import runpy
import sys
from pathlib import Path

# tokenizer.json Split regexes (as the HF tokenizers write them) -> llama.cpp pre-tokenizer, by family.
CL100K = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
GLM_ARCHS = {
    "GlmForCausalLM",
    "ChatGLMModel",
    "ChatGLMForConditionalGeneration",
    "Glm4ForCausalLM",
    "Glm4MoeForCausalLM",
}


class RemoteCodeRefused(RuntimeError):
    pass


def split_regex(model_dir: Path) -> str | None:
    """The one Split regex of a byte-level BPE tokenizer.json (GPT-2's for a plain ByteLevel), or None."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    pre = json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    items = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    splits = [i for i in items if i.get("type") == "Split"]
    if len(splits) == 1:
        return (splits[0].get("pattern") or {}).get("Regex")
    if len(items) == 1 and items[0].get("type") == "ByteLevel" and items[0].get("use_regex", True):
        return GPT2
    return None


def pre_tokenizer_from_regex(model_dir: Path, arch: str) -> str | None:
    regex = split_regex(model_dir)
    if regex == CL100K:
        return "glm4" if arch in GLM_ARCHS else "llama-bpe"
    if regex == QWEN2:
        return "qwen2"
    if regex == GPT2:
        return "gpt-2"
    return None


def _refuse(*_args, **_kwargs):
    raise RemoteCodeRefused(
        "the converter asked to run code from the model folder (auto_map); builder never does. "
        "The folder needs a tokenizer.json (a fast tokenizer) for the GGUF conversion."
    )


def forbid_remote_code() -> None:
    """Every transformers entry that would import code from the model folder raises instead."""
    import importlib

    import transformers.dynamic_module_utils as dmu

    dmu.get_class_from_dynamic_module = _refuse
    for name in (
        "transformers.models.auto.tokenization_auto",
        "transformers.models.auto.configuration_auto",
        "transformers.models.auto.auto_factory",
        "transformers.models.auto.modeling_auto",
    ):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "get_class_from_dynamic_module"):
            module.get_class_from_dynamic_module = _refuse
        if hasattr(module, "resolve_trust_remote_code"):
            module.resolve_trust_remote_code = lambda *a, **k: False


def patch_pre_tokenizer(forced: str | None) -> None:
    import conversion.base as base

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        if forced:
            return forced
        log = logging.getLogger("hf-to-gguf")
        level = log.level
        log.setLevel(logging.CRITICAL)  # its "not recognized" banner is handled below
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            arch = (self.hparams.get("architectures") or [""])[0]
            name = pre_tokenizer_from_regex(Path(self.dir_model), arch)
            if name is None:
                raise NotImplementedError(
                    "the tokenizer's pre-tokenizer is known neither by hash nor by its tokenizer.json split "
                    "regex; pass --pre-tokenizer NAME (a llama.cpp pre-tokenizer, e.g. llama-bpe, qwen2, glm4)"
                ) from None
            logging.getLogger("builder").warning("pre-tokenizer hash unknown; its split regex is llama.cpp's %r", name)
            return name
        finally:
            log.setLevel(level)

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre


def patch_glm_hparams() -> None:
    import conversion.chatglm as chatglm

    original = chatglm.ChatGLMModel.set_gguf_parameters

    def set_gguf_parameters(self) -> None:
        hp = self.hparams
        if "seq_length" not in hp and "max_position_embeddings" in hp:
            hp["seq_length"] = hp["max_position_embeddings"]
        if "layernorm_epsilon" not in hp and "rms_norm_eps" in hp:
            hp["layernorm_epsilon"] = hp["rms_norm_eps"]
        theta = (hp.get("rope_parameters") or {}).get("rope_theta", hp.get("rope_theta"))
        if "rope_ratio" not in hp and theta:
            hp["rope_ratio"] = float(theta) / 10000.0
        original(self)

    chatglm.ChatGLMModel.set_gguf_parameters = set_gguf_parameters


def patch_qwen2vl_vision_names() -> None:
    """The mmproj of a Qwen2-VL / Qwen2.5-VL checkpoint saved by transformers >= 4.52 (`model.visual.*`): the
    converter's vision class keeps only names that start with `visual.` (the older layout), so it would write
    an mmproj without its encoder. The newer names are handed over in the older spelling."""
    import conversion.qwenvl as qwenvl

    original = qwenvl.Qwen2VLVisionModel.filter_tensors.__func__

    def filter_tensors(cls, item):
        name, gen = item
        if name.startswith("model.visual."):
            name = name[len("model.") :]
        return original(cls, (name, gen))

    qwenvl.Qwen2VLVisionModel.filter_tensors = classmethod(filter_tensors)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(prog="python -m builder.model.gguf.hf_to_gguf")
    p.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source (convert_hf_to_gguf.py, gguf-py)")
    p.add_argument("--pre-tokenizer", help="llama.cpp pre-tokenizer name for an unknown BPE tokenizer")
    a = p.parse_args(argv[:split])
    patches = (lambda: patch_pre_tokenizer(a.pre_tokenizer), patch_glm_hparams, patch_qwen2vl_vision_names)
    return run_converter(a.llama_cpp, "convert_hf_to_gguf.py", argv[split + 1 :], patches)


def run_converter(llama_cpp: Path, script_name: str, args: list[str], patches=()) -> int:
    """Run one of llama.cpp's converter scripts in this process, its gguf-py first on sys.path, remote code
    refused, `patches` applied once gguf-py imports: 0, or 3 with the refusal printed."""
    src = llama_cpp.resolve()
    sys.path[:0] = [str(src), str(src / "gguf-py")]
    forbid_remote_code()
    for patch in patches:
        patch()
    script = src / script_name
    sys.argv = [str(script), *args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except RemoteCodeRefused as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
