"""GGUF conversion with llama.cpp's own tools from the pinned source (see llamacpp.py).

`convert_gguf` runs `convert_hf_to_gguf.py` in lazy mode (tensors stream from the checkpoint to
the file; the model is never instantiated and no code from its folder runs: hf_to_gguf.py), to the
float type asked for, or, for the quantized types, to the checkpoint's own float type and then
through `llama-quantize`. Every file is validated with gguf-py before it is renamed into place.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from builder.errors import BuilderError
from builder.files import atomic_file
from builder.model.gguf import llamacpp

# The GGUF types `convert_gguf` writes (llama-quantize's names, lower case).
QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m", "q5_k_m", "q6_k")
# The default GGUF type (QUANT unset): measured on SmolLM2-135M + LoRA against its f16 (docs/quality.md),
# q4_k_m has 5x lower KL divergence than q4_0 (0.071 vs 0.378) and top-1 agreement 0.85 vs 0.67 for
# 15 % more size; q8_0 (KL 0.005, top-1 0.955) where size hardly matters.
DEFAULT_QUANT = "q4_k_m"
FLOAT_TYPES = ("f32", "f16", "bf16")  # written by the converter itself; the others by llama-quantize
# The vision tower + projector GGUF of a vision-language model (`convert_hf_to_gguf.py --mmproj`): f16 (what
# llama.cpp's own mmproj files ship as; the encoder is small beside the text model), f32 when QUANT=f32 so
# that a build can be checked token for token against transformers.
ARCHITECTURES_FILE = Path(__file__).with_name("architectures.txt")
# Where the host keeps the pinned source and its own build (`make llamacpp`); the image build sets
# LLAMA_CPP_SRC and LLAMA_QUANTIZE instead.
HOME = llamacpp.HOST_HOME

__all__ = ["DEFAULT_QUANT", "QUANTS", "architectures", "check_supported", "convert_gguf", "read_gguf"]


def architectures() -> frozenset[str]:
    """Text-model architectures the pinned converter registers (committed list, checked by a test)."""
    return frozenset(line.strip() for line in ARCHITECTURES_FILE.read_text().splitlines() if line.strip())


def check_supported(config: dict) -> str | None:
    """None when the pinned converter registers the model's architecture, else why not."""
    archs = config.get("architectures") or []
    if not archs:
        return "config.json names no architectures"
    if archs[0] not in architectures():
        return f"llama.cpp {llamacpp.COMMIT}'s converter does not register {archs[0]}"
    return None


def mmproj_type(quant: str | None) -> str:
    """The mmproj's float type for a text GGUF of type `quant`."""
    return "f32" if quant == "f32" else "f16"


def source_dir() -> Path:
    """The pinned llama.cpp source: $LLAMA_CPP_SRC, else the host cache (fetched on first use)."""
    env = os.environ.get("LLAMA_CPP_SRC")
    if env:
        src = Path(env)
        if not (src / "convert_hf_to_gguf.py").is_file():
            raise BuilderError(f"LLAMA_CPP_SRC={env} holds no convert_hf_to_gguf.py")
        return src
    return llamacpp.fetch_source(HOME / "src", HOME.parent / "dl")


def quantize_binary() -> Path:
    """llama-quantize: $LLAMA_QUANTIZE, else the host build of `make llamacpp`."""
    path = llamacpp.host_binary("llama-quantize", "LLAMA_QUANTIZE")
    if not path.is_file():
        raise BuilderError(
            f"llama-quantize not found at {path}: run `make llamacpp` (compiles it from the pinned source), "
            "or set LLAMA_QUANTIZE; f32, f16 and bf16 need no quantizer"
        )
    return path


def source_float_type(model: Path) -> str:
    """f32, f16 or bf16: the float type most of the checkpoint's weights are stored in."""
    from builder.model.tensors import read_safetensors_header

    counts: dict[str, int] = {}
    for f in sorted(model.glob("*.safetensors")):
        for info in read_safetensors_header(f).tensors.values():
            n = 1
            for d in info.shape:
                n *= d
            counts[info.dtype] = counts.get(info.dtype, 0) + n
    if not counts:
        config = json.loads((model / "config.json").read_text())
        name = str(config.get("torch_dtype") or config.get("dtype") or "float32")
        counts[name.removeprefix("torch.")] = 1
    main = max(counts, key=counts.get)
    return {"float16": "f16", "bfloat16": "bf16"}.get(main, "f32")


@dataclass
class Converted:
    path: Path
    quant: str
    converter_peak_rss_mb: float  # the converter child's peak resident memory


def peak_rss_mb(pid: int) -> float:
    """VmHWM of a running process: the high-water mark of its own memory image (0 once it is gone).
    (ru_maxrss would not do: Linux carries the forking parent's peak over into the child.)"""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _run(cmd: list[str], quiet: bool, what: str) -> float:
    """Run a tool (its output to stderr, or kept for the error when quiet); its peak RSS in MB."""
    import time

    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log if quiet else sys.stderr, stderr=subprocess.STDOUT)
        peak = 0.0
        while proc.poll() is None:
            peak = max(peak, peak_rss_mb(proc.pid))
            time.sleep(0.05)
        if proc.returncode != 0:
            log.seek(0)
            tail = log.read()[-4000:]
            raise BuilderError(f"{what} failed (exit {proc.returncode})" + (f":\n{tail}" if tail else ""))
    return peak


def convert_gguf(
    model: Path, quant: str, out: Path, *, pre_tokenizer: str | None = None, quiet: bool = False, eager: bool = False
) -> Converted:
    """Convert a Hugging Face model folder to a GGUF file of type `quant` at `out` (temp file, then rename).

    `eager` (benchmarks only) runs the converter with --no-lazy: every tensor in memory before writing."""
    from builder.model.gguf import originals

    model, out = Path(model), Path(out)
    if quant not in QUANTS:
        raise BuilderError(f"unknown GGUF type {quant!r}; choose one of {', '.join(QUANTS)}")
    if not (model / "config.json").is_file():
        raise BuilderError(f"{model} has no config.json; point --model at a Hugging Face model folder")
    if out.is_dir():
        raise BuilderError(f"--out {out} is a folder; give a file name such as {out / 'model.gguf'}")
    reason = check_supported(json.loads((model / "config.json").read_text()))
    if reason:
        raise BuilderError(f"cannot convert {model} to GGUF: {reason}")
    src = source_dir()
    quantizer = None if quant in FLOAT_TYPES else quantize_binary()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="builder-gguf-", dir=out.parent) as work, atomic_file(out) as tmp:
        work_dir = Path(work)
        folder = originals.converter_folder(model, work_dir)
        float_type = quant if quant in FLOAT_TYPES else source_float_type(model)
        first = tmp if quantizer is None else work_dir / f"model-{float_type}.gguf"
        cmd = [sys.executable, "-m", "builder.model.gguf.hf_to_gguf", "--llama-cpp", str(src)]
        if pre_tokenizer:
            cmd += ["--pre-tokenizer", pre_tokenizer]
        cmd += ["--", str(folder), "--outfile", str(first), "--outtype", float_type, *(["--no-lazy"] if eager else [])]
        peak = _run(cmd, quiet, "convert_hf_to_gguf.py")
        if quantizer is not None:
            threads = str(max(1, os.cpu_count() or 1))
            _run([str(quantizer), str(first), str(tmp), quant.upper(), threads], quiet, "llama-quantize")
        read_gguf(tmp)
    return Converted(out, quant, peak)


def convert_mmproj(model: Path, out: Path, outtype: str = "f16", *, quiet: bool = False) -> Path:
    """The vision tower + projector of the vision-language model folder `model` as an mmproj GGUF at `out`
    (`convert_hf_to_gguf.py --mmproj`, float type `outtype`; temp file, validated, then renamed)."""
    from builder.model.vision import PROVEN, proven

    model, out = Path(model), Path(out)
    if outtype not in ("f32", "f16"):
        raise BuilderError(f"unknown mmproj type {outtype!r}; choose f16 or f32")
    if not (model / "config.json").is_file():
        raise BuilderError(f"{model} has no config.json; point --model at a Hugging Face model folder")
    if not proven(json.loads((model / "config.json").read_text())):
        raise BuilderError(f"{model}: an mmproj is made here for {', '.join(PROVEN)} only")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:
        # the converter keeps a file name it is given (an `mmproj-` prefix only for a folder)
        cmd = [sys.executable, "-m", "builder.model.gguf.hf_to_gguf", "--llama-cpp", str(source_dir()), "--"]
        cmd += [str(model), "--mmproj", "--outfile", str(tmp), "--outtype", outtype]
        _run(cmd, quiet, "convert_hf_to_gguf.py --mmproj")
        info = read_gguf(tmp)
        if not any(name.startswith("v.blk.") for name, *_ in info.tensors):
            raise BuilderError(
                f"the mmproj of {model} holds no vision encoder blocks; the checkpoint's names are unknown"
            )
    return out


# -- reading ---------------------------------------------------------------------------------------


@dataclass
class GGUFInfo:
    path: Path
    size: int
    version: int
    architecture: str
    file_type: str
    metadata: dict[str, object]
    tensors: list[tuple[str, tuple[int, ...], str, int]]  # name, shape, type, bytes


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _gguf_module():
    """gguf-py: the installed package (same version as the pinned source's), else the source's copy."""
    try:
        import gguf
    except ImportError:
        sys.path.insert(0, str(source_dir() / "gguf-py"))
        import gguf
    return gguf


def read_gguf(path: Path) -> GGUFInfo:
    """Header, metadata and tensor table of a GGUF file; raises BuilderError if it is truncated or malformed."""
    gguf = _gguf_module()
    path = Path(path)
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - any parse failure means a bad file
        raise BuilderError(f"{path} is not a valid GGUF file ({type(e).__name__}: {e})") from None
    meta: dict[str, object] = {}
    for name, field in reader.fields.items():
        if len(field.data) > 1 and name not in ("tokenizer.chat_template",):
            meta[name] = f"[{len(field.data)} items]"  # token lists, scores, merges
            continue
        try:
            meta[name] = field.contents()
        except Exception:  # noqa: BLE001
            meta[name] = "?"
    tensors = []
    end = 0
    for t in reader.tensors:
        tensors.append((t.name, tuple(int(d) for d in t.shape), t.tensor_type.name, int(t.n_bytes)))
        end = max(end, int(t.data_offset) + int(t.n_bytes))
    if end > size:
        raise BuilderError(f"{path} is truncated: tensor data ends at byte {end}, the file has {size}")
    file_type = meta.get("general.file_type")
    ftype = gguf.LlamaFileType(file_type).name if isinstance(file_type, int) else "?"
    return GGUFInfo(
        path=path,
        size=size,
        version=int(meta.get("GGUF.version", 0) or 0),
        architecture=str(meta.get("general.architecture", "?")),
        file_type=ftype,
        metadata=meta,
        tensors=tensors,
    )


def describe_gguf(info: GGUFInfo) -> str:
    arch = info.architecture
    lines = [
        f"{info.path}: GGUF v{info.version}, {info.size / 1e6:.1f} MB, architecture {arch}, file type {info.file_type}",
    ]
    for key in (
        "general.name",
        f"{arch}.context_length",
        f"{arch}.embedding_length",
        f"{arch}.block_count",
        f"{arch}.attention.head_count",
        f"{arch}.attention.head_count_kv",
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.eos_token_id",
    ):
        if key in info.metadata:
            lines.append(f"  {key} = {info.metadata[key]}")
    template = info.metadata.get("tokenizer.chat_template")
    lines.append(f"  chat template: {'yes' if template else 'none'}")
    types: dict[str, int] = {}
    for _, _, t, _ in info.tensors:
        types[t] = types.get(t, 0) + 1
    lines.append(f"  {len(info.tensors)} tensors: " + ", ".join(f"{n} {t}" for t, n in sorted(types.items())))
    return "\n".join(lines)
