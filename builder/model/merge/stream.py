"""The stream: each base shard read tensor by tensor in file order, merged, and written straight into its
output shard, whose safetensors header is known up front (merging changes no shape, except for a vocab
an adapter grew, which the plan knows). Writing runs on one writer thread and hashing the input (for the
provenance record) on another, both in calls that drop the GIL; memory stays at about the largest tensor
plus its fp32 LoRA delta and a bounded write-ahead queue."""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from builder.files import atomic_file, write_atomic
from builder.model.merge.peft_math import merge_bias, merge_weight
from builder.model.merge.plan import Plan
from builder.model.tensors import SafetensorsWriter, Shard, TensorInfo, itemsize, load_bin, read_tensor, torch_dtype

WRITE_AHEAD_BYTES = 64 << 20  # merged tensors queued for the writer thread (beyond the one being written)


def out_dtype(info: TensorInfo, plan: Plan) -> str:
    """The dtype a base tensor is written in: the plan's float type for float tensors, else its own."""
    want = plan.dtype if plan.dtype != "auto" else plan.config_dtype
    if want and info.dtype in ("float16", "bfloat16", "float32", "float64"):
        return want
    return info.dtype


def out_shape(info: TensorInfo, plan: Plan) -> tuple[int, ...]:
    t = plan.replace.get(info.name)
    return tuple(t.shape) if t is not None else info.shape


def nbytes(info: TensorInfo) -> int:
    return math.prod(info.shape) * itemsize(info.dtype)


def sha256(path: Path, stop: threading.Event | None = None) -> str:
    """The file's sha256 (cut short, and then meaningless, once `stop` is set)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while (chunk := f.read(1 << 24)) and not (stop and stop.is_set()):
            h.update(chunk)
    return h.hexdigest()


def write_shards(folder: Path, shards: list[Shard], plan: Plan, device: str, quiet: bool) -> dict[str, str]:
    """Merge `shards` into safetensors shards in `folder` (with an index when there are several); returns
    each input shard's sha256 by file name."""
    n = len(shards)
    weight_map: dict[str, str] = {}
    total_size = 0
    base_hashes: dict[str, str] = {}
    with _progress(quiet) as progress:
        for i, shard in enumerate(shards, 1):
            out_name = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            infos = list(shard.tensors.values())
            if shard.fmt == "safetensors":
                infos.sort(key=lambda t: t.begin)
            entries = [(t.name, out_dtype(t, plan), out_shape(t, plan)) for t in infos]
            task = None
            if progress is not None:
                task = progress.add_task(f"[{i}/{n}] {shard.path.name}", total=sum(nbytes(t) for t in infos))
            with atomic_file(folder / out_name) as part:
                writer = SafetensorsWriter(part, entries)
                base_hashes[shard.path.name] = process_shard(shard, writer, plan, device, progress, task)
            for name, dt, shape in entries:
                weight_map[name] = out_name
                total_size += math.prod(shape) * itemsize(dt)
            if n > 1:  # the index grows with every finished shard
                index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
                write_atomic(folder / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
    return base_hashes


def _progress(quiet: bool):
    if quiet:
        return nullcontext(None)
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )


def process_shard(shard: Shard, writer: SafetensorsWriter, plan: Plan, device: str, progress, task) -> str:
    """Read, merge and write one shard: reading and merging here, writing on a writer thread, and the
    input's sha256 (returned, for the provenance file) on another that reads the file by itself, so
    hashing never holds up the merge. Both threads spend their time in calls that drop the GIL.

    The math runs on this thread alone (torch intra-op threads off): a rank-r product and elementwise
    steps on cache-sized blocks, where OpenMP workers spin-waiting between calls would only take the
    cores that hashing and writing need."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    stop = threading.Event()
    try:
        with ThreadPoolExecutor(1, "merge-hash") as hash_pool, ThreadPoolExecutor(1, "merge-write") as write_pool:
            digest = hash_pool.submit(sha256, shard.path, stop)
            try:
                _stream(shard, writer, plan, device, progress, task, write_pool)
            except BaseException:
                stop.set()  # an interrupt should not wait for a multi-GB shard to be hashed
                raise
            digest = digest.result()
    except BaseException:
        writer.f.close()
        raise
    finally:
        torch.set_num_threads(threads)
    writer.close()
    return digest


def _stream(shard, writer, plan, device, progress, task, write_pool) -> None:
    """Merge the shard's tensors as they are read and queue them for the writer in header order."""
    import torch

    order = [e[0] for e in writer.expected]
    pending: dict[str, Any] = {}  # only used when the file order differs from the header order (bin)
    nxt = 0
    in_flight: deque = deque()  # (write future, bytes) in submission order
    queued = 0
    scratch: dict = {}  # one fp32 delta buffer, reused: no fresh pages per tensor
    it = _iter_safetensors(shard) if shard.fmt == "safetensors" else _iter_bin(shard)
    try:
        with torch.no_grad():
            for name, t in it:
                info = shard.tensors[name]
                pending[name] = _merged(name, t, info, plan, device, scratch)
                while nxt < len(order) and order[nxt] in pending:
                    out = pending.pop(order[nxt])
                    in_flight.append((write_pool.submit(writer.write, order[nxt], out), out.nbytes))
                    queued += out.nbytes
                    nxt += 1
                while len(in_flight) > 1 and queued > WRITE_AHEAD_BYTES:  # bounded memory, whatever the tensor sizes
                    fut, size = in_flight.popleft()
                    fut.result()
                    queued -= size
                if progress is not None:
                    progress.advance(task, nbytes(info))
        while in_flight:
            in_flight.popleft()[0].result()
    finally:
        for fut, _ in in_flight:
            fut.cancel()
        it.close()


def _merged(name: str, t, info: TensorInfo, plan: Plan, device: str, scratch: dict):
    """One base tensor as it is written: replaced by the adapter's, cast to its output dtype, LoRA merged in."""
    lm = plan.modules.get(name)
    lmb = plan.bias_of.get(name)
    replacement = plan.replace.get(name)
    if replacement is not None:
        t = replacement.load()
    t = t.to(torch_dtype(out_dtype(info, plan)))
    if lm is not None:
        t = merge_weight(lm, t, plan.lora_config, device, scratch)
    if lmb is not None:
        t = merge_bias(lmb, t, plan.lora_config)
    return t


def _iter_safetensors(shard: Shard) -> Iterator[tuple[str, Any]]:
    """Yield (name, tensor) in file order, each tensor read into its own buffer."""
    with open(shard.path, "rb", buffering=0) as f:
        for info in sorted(shard.tensors.values(), key=lambda t: t.begin):
            yield info.name, read_tensor(f, shard, info)


def _iter_bin(shard: Shard) -> Iterator[tuple[str, Any]]:
    sd = load_bin(shard.path)
    for name in list(sd):
        yield name, sd.pop(name)
