"""The math: peft's, op for op. Plain LoRA / rsLoRA on a Linear or Conv1D repeats peft's `get_delta_weight` +
`merge` (without importing peft); DoRA and embedding LoRA run peft's own layer code around a bare base layer
that holds only the one tensor; a LoRA bias repeats peft's one-line `bias += lora_B.bias * scaling`."""

from __future__ import annotations

from builder.model.merge.adapter import LoraSpec
from builder.model.merge.plan import LoraModule

MERGE_BLOCK_BYTES = 1 << 20  # rows of the delta per elementwise step: fits in L2


def _peft_layer(lm: LoraModule, weight, cfg):
    """A peft LoRA layer around a bare base layer that holds `weight`, adapter loaded as from_pretrained does."""
    import torch
    from peft.tuners.lora import layer as lora_layer
    from torch import nn

    try:
        from peft.tuners.tuners_utils import cast_adapter_dtype
    except ImportError:  # older peft: same logic lives on the tuner
        cast_adapter_dtype = None

    # no init work (pissa/olora/... would touch the weight; from_pretrained resets it to True, which only
    # initialises A/B we overwrite anyway), no dropout module, bias handled on its own (see module doc)
    layer_cfg = cfg.peft_config()
    with torch.device("meta"):
        if lm.kind == "embedding":
            base = nn.Embedding(weight.shape[0], weight.shape[1])
        elif cfg.fan_in_fan_out:
            from transformers.pytorch_utils import Conv1D

            base = Conv1D(weight.shape[1], weight.shape[0])
        else:
            base = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    base.weight = nn.Parameter(weight, requires_grad=False)
    cls = lora_layer.Embedding if lm.kind == "embedding" else lora_layer.Linear
    layer = cls(base, "default", config=layer_cfg, r=lm.r, lora_alpha=lm.alpha)
    if cast_adapter_dtype is not None:
        cast_adapter_dtype(layer, adapter_name="default", autocast_adapter_dtype=True)
    else:
        for p_name, p in list(layer.named_parameters()):
            if "base_layer" not in p_name and p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
    state = {}
    for part, t in lm.tensors.items():
        if part in ("lora_embedding_A", "lora_embedding_B"):
            state[f"{part}.default"] = t.load()
        else:
            head, tail = part.split(".", 1)
            state[f"{head}.default.{tail}"] = t.load()
    result = layer.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"internal: peft layer rejected {result.unexpected_keys}")
    return layer


def _adapter_param_dtype(base_dtype):
    """The dtype PeftModel.from_pretrained gives LoRA parameters: created in the base layer's dtype, then
    half (and fp8) types upcast to fp32 by autocast_adapter_dtype=True."""
    import torch

    if base_dtype in (torch.float16, torch.bfloat16) or base_dtype.itemsize == 1:
        return torch.float32
    return base_dtype


def _merge_linear(lm: LoraModule, weight, cfg: LoraSpec, device: str, scratch: dict):
    """Plain LoRA / rsLoRA on a Linear (or Conv1D): peft's `lora.Linear.merge(safe_merge=False)` with
    `get_delta_weight`, op for op, without importing peft (whose import costs more CPU than the merge).

    B @ A is the same whole-matrix call as peft's (a row block of it can take another BLAS kernel and
    differ in the last bit), written into a reused buffer; the elementwise `* scaling` and `+=` then go a
    cache-sized block of rows at a time, which is several times faster than whole-matrix passes and
    gives the same bits. The tests hold it torch.equal to peft across dtypes, rsLoRA, rank/alpha
    patterns and fan_in_fan_out."""
    import torch

    dev = weight.device if device == "cpu" else torch.device("cuda")
    pdtype = _adapter_param_dtype(weight.dtype)
    weight = weight.to(dev)
    a = lm.tensors["lora_A.weight"].load().to(dev, pdtype).contiguous()
    b = lm.tensors["lora_B.weight"].load().to(dev, pdtype).contiguous()
    cast_to_fp32 = dev.type == "cpu" and pdtype in (torch.float16, torch.bfloat16)  # never true after autocast
    if cast_to_fp32:
        a, b = a.float(), b.float()
    buf = scratch.get((a.dtype, dev))
    if buf is None or buf.numel() < b.shape[0] * a.shape[1]:
        buf = scratch[(a.dtype, dev)] = torch.empty(b.shape[0] * a.shape[1], dtype=a.dtype, device=dev)
    delta = torch.mm(b, a, out=buf[: b.shape[0] * a.shape[1]].view(b.shape[0], a.shape[1]))
    if cfg.fan_in_fan_out:  # Conv1D keeps its weight as (in, out)
        delta = delta.T
    rows, cols = weight.shape
    step = max(1, MERGE_BLOCK_BYTES // max(1, cols * delta.element_size())) if dev.type == "cpu" else max(1, rows)
    for r0 in range(0, rows, step):
        block = delta[r0 : r0 + step].mul_(lm.scale)  # same bits as peft's `* scaling`
        weight[r0 : r0 + step] += block.to(dtype=pdtype) if cast_to_fp32 else block
    return weight.cpu() if device == "cuda" else weight


def merge_weight(lm: LoraModule, weight, cfg: LoraSpec, device: str, scratch: dict):
    """`weight` with `lm`'s delta merged in, as peft's merge does it (`scratch`: buffers kept between calls).
    Sets `lm.scale` from peft's layer where peft's code runs (DoRA, embeddings)."""
    if lm.kind == "linear" and not cfg.use_dora:
        return _merge_linear(lm, weight, cfg, device, scratch)
    import torch

    if device == "cuda":
        weight = weight.to("cuda")
    layer = _peft_layer(lm, weight, cfg)
    lm.scale = float(layer.scaling["default"])
    with torch.no_grad():
        layer.merge(safe_merge=False)
    merged = layer.get_base_layer().weight.data
    return merged.cpu() if device == "cuda" else merged


def merge_bias(lm: LoraModule, bias, cfg):
    """peft's Linear.merge: `base_layer.bias.data += lora_B.bias * scaling`, lora_B in its from_pretrained dtype."""
    lora_bias = lm.bias.load().to(_adapter_param_dtype(bias.dtype))
    bias += lora_bias * lm.scale  # our own buffer (or a copy-on-write mmap for .bin shards)
    return bias
