"""The merged folder's other files: the base's non-weight files (config, tokenizer, remote code), then the
adapter's tokenizer files on top; never training state or old weights. And the signal handling that lets
an interrupted merge clean up after itself."""

from __future__ import annotations

import os
import re
import shutil
import signal
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from builder.model.merge.adapter import ADAPTER_WEIGHT_FILES

PROVENANCE = "merge_provenance.json"

# Files that are training state, not part of a model: never copied.
TRAINING_STATE = re.compile(
    r"^(optimizer\.pt|optimizer\.bin|scheduler\.pt|scaler\.pt|rng_state.*\.pth|trainer_state\.json|"
    r"training_args\.bin|latest|zero_to_fp32\.py|global_step\d+)$"
)
# Weight files of any framework: the merged folder gets fresh safetensors shards instead.
WEIGHT_FILE = re.compile(
    r"(\.safetensors|\.safetensors\.index\.json|\.bin|\.bin\.index\.json|\.pt|\.pth|\.ckpt|\.h5|\.msgpack|"
    r"\.gguf|\.ggml|\.onnx|\.onnx_data|\.npz)$"
)
ADAPTER_FILES = {"adapter_config.json", *ADAPTER_WEIGHT_FILES}
# Files the adapter folder may carry that must win over the base's (added tokens, new chat template).
TOKENIZER_FILE = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab.*|merges\.txt|spiece\.model|"
    r"sentencepiece.*\.model|.*\.tiktoken|qwen\.tiktoken|chat_template.*|preprocessor_config\.json)$"
)


def copy_tree(src: Path, dst: Path, keep: Callable[[Path, bool], bool]) -> list[str]:
    """Copy the files of `src` that `keep(relative path, is_dir)` accepts into `dst` (hidden folders and
    training-state folders skipped); returns the copied files' relative paths."""
    copied = []
    for root, dirs, files in os.walk(src):
        rel = Path(root).relative_to(src)
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and not TRAINING_STATE.match(d) and keep(rel / d, True)
        )
        for name in sorted(files):
            if keep(rel / name, False):
                (dst / rel).mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(root) / name, dst / rel / name)
                copied.append(str(rel / name))
    return copied


def keep_base_file(rel: Path, is_dir: bool) -> bool:
    """What of the base folder the merged folder keeps: everything but weights, training state, adapter
    files, an old provenance record, hidden files and checkpoint-N folders."""
    if is_dir:
        return not re.match(r"^checkpoint-\d+$", rel.name)
    name = rel.name
    return not (
        WEIGHT_FILE.search(name)
        or TRAINING_STATE.match(name)
        or name in ADAPTER_FILES
        or name == PROVENANCE
        or name.startswith(".")
    )


def keep_tokenizer_file(rel: Path, is_dir: bool) -> bool:
    """What of the adapter folder the merged folder takes: its tokenizer files (top level only)."""
    return not is_dir and bool(TOKENIZER_FILE.match(rel.name))


@contextmanager
def sigterm_as_interrupt():
    """Turn SIGTERM into KeyboardInterrupt so the temp folder is cleaned up (main thread only)."""
    try:
        prev = signal.signal(signal.SIGTERM, signal.default_int_handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, prev)


def inside(p: Path, folder: Path) -> bool:
    """Whether `p` is `folder` or lies under it (symlinks resolved)."""
    p, folder = p.resolve(), folder.resolve()
    return p == folder or folder in p.parents
