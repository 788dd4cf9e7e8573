"""A LoRA adapter as a GGUF LoRA for llama.cpp, made with the pinned source's own `convert_lora_to_gguf.py`.

`llamacpp_problems(facts)` says, before any heavy step, why llama.cpp cannot serve an adapter unmerged
(what the pinned converter refuses and what llama-server would silently get wrong), each with what to
do instead. `convert_lora` writes the GGUF LoRA (f16 by default; temp file, validated with gguf-py,
then renamed into place).

The scale: llama.cpp applies `adapter.lora.alpha / rank` to each module (rank = that module's lora_b
width: src/llama-adapter.h get_scale), the converter writes adapter_config.json's lora_alpha and reads
nothing else of the config (no use_rslora, rank_pattern, alpha_pattern). peft's scale is
alpha_m / r_m, or alpha_m / sqrt(r_m) with rsLoRA. So the alpha written is scale_m * r_m (alpha * sqrt(r)
for a plain rsLoRA), and where one alpha cannot give every module its scale (patterns), lora_B of the
odd modules is multiplied by the remaining factor in a temporary copy of the adapter.

The converter runs in a child (`python -m builder.model.gguf.lora --llama-cpp SRC -- ARGS`) with
hf_to_gguf's guard: it loads the base's config with transformers' AutoConfig (trust_remote_code=False,
falling back to config.json), and nothing from the model folder may run. It never sees the user's
adapter_config.json: only a copy holding the alpha, so its hub paths (base_model_name_or_path without
--base, the aLoRA tokenizer load by `_name_or_path`) are never taken; the hub is off in the child too.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from builder.errors import BuilderError
from builder.files import atomic_file
from builder.model.adapter import AdapterFacts, read_adapter

OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # the converter's --outtype choices (auto aside)
MERGE = "serve it merged: LORA=merge"


def llamacpp_problems(facts: AdapterFacts) -> list[str]:
    """Why llama.cpp cannot serve this adapter unmerged (empty: it can), each with what to do instead.

    Checked in the pinned source: convert_lora_to_gguf.py's get_tensors exits on any tensor that is not a
    lora_A/lora_B (DoRA magnitudes, LoRA biases, saved full modules) except norms and `.base_layer.weight`
    (the frozen copies peft saves beside an embedding / lm_head LoRA: skipped, which is right as long as
    they are the base's own: facts.frozen_copies), and llama.cpp then skips those norms at load
    (llama-adapter.cpp: "_norm.weight" -> continue), so a saved norm would be silently lost;
    modify_tensors raises for lm_head LoRA on a base whose lm_head is tied. LoRA on the embeddings
    (lora_embedding_A/B) and on an untied lm_head is served (tested against peft)."""
    from builder.model.gguf.convert import check_supported  # lazily: convert.py imports builder.backends

    out = []
    reason = check_supported({"architectures": [facts.architecture]} if facts.architecture else {})
    if reason:
        out.append(f"{reason}; choose another backend")
    if facts.use_dora:
        out.append(f"it is a DoRA adapter (a magnitude vector per module), which llama.cpp cannot apply; {MERGE}")
    if facts.lora_bias:
        out.append(f"it trains LoRA biases (lora_bias), which llama.cpp's converter refuses; {MERGE}")
    if facts.saved_tensors:
        out.append(
            f"it saves full modules ({', '.join(facts.modules_to_save)}), which a llama.cpp LoRA cannot replace; "
            f"{MERGE}"
        )
    if facts.fan_in_fan_out:
        out.append(f"its weights are fan_in_fan_out (Conv1D), untested with llama.cpp's converter; {MERGE}")
    if facts.lm_head_targeted and not facts.base_has_lm_head:
        out.append(f"it adapts lm_head, which this base ties to its embeddings (the converter refuses it); {MERGE}")
    out += [f"the adapter folder carries its own {c}: llama.cpp would serve the base's; {MERGE}"
            for c in facts.tokenizer_changes]  # fmt: skip
    if facts.vision_parts:
        out.append(
            f"it changes the {' and '.join(facts.vision_parts)}, and a llama.cpp LoRA (convert_lora_to_gguf.py) "
            f"carries the language model only: merged, the image gets an mmproj of its own; {MERGE}"
        )
    return out


def gguf_scale(facts: AdapterFacts) -> tuple[float, dict[str, float]]:
    """The adapter.lora.alpha to write, and the factor each module's lora_B needs on top (only the modules
    whose peft scale that one alpha cannot give)."""
    wanted = {m.name: m.scale * m.r for m in facts.modules}
    if not wanted:
        raise BuilderError(f"{facts.adapter} holds no LoRA weights; re-save the adapter")
    alpha = Counter(wanted.values()).most_common(1)[0][0]
    if alpha == 0:
        raise BuilderError(f"{facts.adapter}: lora_alpha is 0, so the adapter changes nothing; fix adapter_config.json")
    return alpha, {name: w / alpha for name, w in wanted.items() if w != alpha}


@dataclass
class ConvertedLora:
    path: Path
    alpha: float  # adapter.lora.alpha as written
    rescaled: dict[str, float]  # modules whose lora_B was multiplied, by factor
    tensors: int
    size: int


def convert_lora(
    adapter_dir: Path, base_dir: Path | None, out_file: Path, *, outtype: str = "f16", quiet: bool = False
) -> ConvertedLora:
    """Convert the peft / SWIFT LoRA in `adapter_dir` (on `base_dir`, default: the base it names, found as
    the merge finds it) to a GGUF LoRA at `out_file`. Refuses, before converting, what llama.cpp cannot
    serve unmerged (llamacpp_problems)."""
    from builder.model.gguf.convert import _run, read_gguf, source_dir

    if outtype not in OUTTYPES:
        raise BuilderError(f"unknown GGUF LoRA type {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    out_file = Path(out_file)
    if out_file.is_dir():
        raise BuilderError(f"--out {out_file} is a folder; give a file name such as {out_file / 'adapter.gguf'}")
    facts = read_adapter(Path(adapter_dir), Path(base_dir) if base_dir is not None else None)
    problems = llamacpp_problems(facts)
    if problems:
        raise BuilderError(f"llama.cpp cannot serve {facts.adapter} unmerged: " + "; ".join(problems))
    alpha, rescaled = gguf_scale(facts)
    src = source_dir()
    with tempfile.TemporaryDirectory(prefix="builder-lora-") as work, atomic_file(out_file) as tmp:
        staged = _stage_adapter(facts, alpha, rescaled, Path(work) / "adapter")
        cmd = [sys.executable, "-m", "builder.model.gguf.lora", "--llama-cpp", str(src), "--"]
        cmd += ["--base", str(facts.base), "--outfile", str(tmp), "--outtype", outtype, str(staged)]
        _run(cmd, quiet, "convert_lora_to_gguf.py")
        info = _check_lora_gguf(read_gguf(tmp), alpha, len(facts.modules))
    return ConvertedLora(out_file, alpha, rescaled, len(info.tensors), info.size)


def _stage_adapter(facts: AdapterFacts, alpha: float, rescaled: dict[str, float], folder: Path) -> Path:
    """What the converter reads: a config with only the alpha to write, and the adapter weights (linked;
    rewritten with lora_B scaled where `rescaled` says)."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": facts.r, "lora_alpha": alpha}))
    src = next(facts.adapter / n for n in ("adapter_model.safetensors", "adapter_model.bin")
               if (facts.adapter / n).is_file())  # fmt: skip
    if not rescaled:
        os.symlink(src.resolve(), folder / src.name)
        return folder
    import torch
    from safetensors.torch import save_file

    from builder.model.tensors import load_bin

    if src.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(src)
    else:
        tensors = dict(load_bin(src, remedy="re-save the adapter"))
    prefix = "base_model.model."
    for key, t in list(tensors.items()):
        name = key.removeprefix(prefix)
        for suffix in (".lora_B.weight", ".lora_embedding_B"):
            if name.endswith(suffix) and name[: -len(suffix)] in rescaled:
                tensors[key] = t.to(torch.float32) * rescaled[name[: -len(suffix)]]
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "adapter_model.safetensors")
    return folder


def _check_lora_gguf(info, alpha: float, n_modules: int):
    meta = info.metadata
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise BuilderError(f"{info.path}: the converter did not write a LoRA adapter GGUF (general.type "
                           f"{meta.get('general.type')!r}, adapter.type {meta.get('adapter.type')!r})")  # fmt: skip
    written = float(meta.get("adapter.lora.alpha", 0.0))
    if abs(written - alpha) > 1e-6 * max(1.0, abs(alpha)):
        raise BuilderError(f"{info.path}: adapter.lora.alpha is {written}, expected {alpha}")
    pairs = [n for n, *_ in info.tensors if n.endswith((".lora_a", ".lora_b"))]
    if len(pairs) != 2 * n_modules or len(pairs) != len(info.tensors):
        raise BuilderError(f"{info.path}: {len(info.tensors)} tensors for {n_modules} LoRA modules; expected "
                           f"one lora_a and one lora_b each")  # fmt: skip
    return info


# -- the child: the pinned converter, guarded --------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import argparse

    from builder.model.gguf.hf_to_gguf import run_converter

    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(prog="python -m builder.model.gguf.lora")
    p.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source (convert_lora_to_gguf.py, gguf-py)")
    a = p.parse_args(argv[:split])
    if "--base" not in argv[split + 1 :]:
        print("error: --base is required (the converter would otherwise fetch the base's config from a hub)")
        return 2
    os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"
    return run_converter(a.llama_cpp, "convert_lora_to_gguf.py", argv[split + 1 :])


if __name__ == "__main__":
    sys.exit(main())
