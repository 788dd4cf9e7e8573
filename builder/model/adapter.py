"""What a LoRA adapter is, read before any heavy step: the facts each engine's "can it serve this
unmerged?" check needs.

`read_adapter` reads adapter_config.json, the adapter's tensor table (a safetensors header: no torch,
no tensor data) and the base's config.json and shard headers, through the merge's own reading (so
an adapter is understood here exactly as the merge understands it, and one the merge would refuse
is refused here with the merge's message). Each engine decides from the one `AdapterFacts`:
`builder.model.gguf.lora.llamacpp_problems` for llama.cpp, `vllm_problems` below for vLLM.

`run_checkpoints` lists a SWIFT / HF Trainer run folder's checkpoints, and the one it recorded as best.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from builder.errors import BuilderError
from builder.model import merge  # its readers: the facts are what the merge would check
from builder.model.vision import (
    LANGUAGE_MODEL,
    PROVEN,
    parts_touched,
    vision_architecture,
    vllm_misplaced,
    vllm_module,
)
from builder.runtime.vllm_boot import MAX_LORA_RANKS as VLLM_MAX_LORA_RANKS
from builder.runtime.vllm_boot import max_lora_rank as vllm_max_lora_rank

# Leaf module names of vocabulary-shaped matrices (the merge's VOCAB_MATRIX): the input side ...
EMBEDDING_MODULES = frozenset({"embed_tokens", "word_embeddings", "wte"})
# ... and the output side.
LM_HEAD_MODULES = frozenset({"lm_head", "output_layer", "embed_out"})
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


@dataclass(frozen=True)
class ModuleLora:
    name: str  # module path in the base, e.g. model.layers.0.self_attn.q_proj
    kind: str  # "linear" | "embedding"
    r: int  # this module's rank (rank_pattern applied)
    scale: float  # peft's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA (patterns applied)


@dataclass(frozen=True)
class AdapterFacts:
    """One LoRA adapter on its base, as far as serving it unmerged is concerned."""

    adapter: Path  # the folder with adapter_config.json (peft, or a SWIFT checkpoint-N)
    base: Path  # the base model folder it was trained on (found as the merge finds it)
    architecture: str  # the base's config.json architectures[0] ("" when it names none)
    r: int  # adapter_config.json's r
    lora_alpha: float
    use_rslora: bool
    use_dora: bool
    lora_bias: bool  # LoRA B biases (lora_bias=True)
    fan_in_fan_out: bool
    rank_pattern: bool  # per-module ranks / alphas in adapter_config.json
    alpha_pattern: bool
    modules: tuple[ModuleLora, ...]  # every module that carries LoRA A/B
    saved_tensors: tuple[str, ...]  # full tensors that replace the base's (modules_to_save, bias="all" ...)
    frozen_copies: tuple[str, ...]  # base weights peft saves beside an embedding / lm_head LoRA, unchanged
    base_has_lm_head: bool  # False: the output layer is tied to the input embeddings
    new_vocab: int | None  # the adapter resizes the vocabulary (added tokens)
    tokenizer_changes: tuple[str, ...]  # what the adapter folder changes of the base's tokenizer / template
    size_bytes: int  # the adapter weights file
    vision: bool = False  # the base is a vision-language model (builder/model/vision.py)
    file_modules: tuple[str, ...] = ()  # the LoRA modules as the adapter's weights file names them

    @property
    def parts(self) -> dict[str, str]:
        """A vision-language base: {part: what the adapter does to it} (language model, vision tower, projector);
        {} for a text model."""
        return parts_touched([m.name for m in self.modules], self.saved_tensors) if self.vision else {}

    @property
    def vision_parts(self) -> tuple[str, ...]:
        """The parts besides the language model it changes (vision tower, projector): a LoRA on the language
        model alone leaves the base's image encoder as it is."""
        return tuple(p for p in self.parts if p != LANGUAGE_MODEL)

    @property
    def max_rank(self) -> int:
        return max((m.r for m in self.modules), default=self.r)

    @property
    def target_modules(self) -> tuple[str, ...]:
        """Leaf names of the modules with LoRA (q_proj, ...), sorted."""
        return tuple(sorted({m.name.rsplit(".", 1)[-1] for m in self.modules}))

    @property
    def modules_to_save(self) -> tuple[str, ...]:
        """Modules whose full weights the adapter saves (a weight or bias of theirs is in saved_tensors)."""
        return tuple(sorted({t.rsplit(".", 1)[0] for t in self.saved_tensors}))

    def _touches(self, leaves: frozenset[str]) -> bool:
        saved = (*self.saved_tensors, *self.frozen_copies)
        names = [m.name for m in self.modules] + [t.rsplit(".", 1)[0] for t in saved]
        return any(n.rsplit(".", 1)[-1] in leaves for n in names)

    @property
    def embeddings_targeted(self) -> bool:
        """LoRA on, or a saved copy of, the input token embeddings."""
        return self._touches(EMBEDDING_MODULES) or any(m.kind == "embedding" for m in self.modules)

    @property
    def lm_head_targeted(self) -> bool:
        """LoRA on, or a saved copy of, the output layer."""
        return self._touches(LM_HEAD_MODULES)

    @property
    def uniform_scale(self) -> bool:
        """Every module scaled by lora_alpha / r (what an engine that reads only r and lora_alpha applies)."""
        plain = self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)
        return all(m.scale == plain for m in self.modules)


def adapter_folder(adapter: Path) -> Path:
    """`adapter` when it holds adapter_config.json, else a BuilderError that says what to pass."""
    adapter = Path(adapter)
    if not adapter.is_dir():
        raise BuilderError(f"adapter {adapter} is not a folder")
    if not (adapter / "adapter_config.json").is_file():
        ckpts = sorted(run_checkpoints(adapter)) if adapter.is_dir() else []
        hint = f"; it is a training run: pass one of its checkpoints ({', '.join(ckpts[:3])} ...)" if ckpts else ""
        raise BuilderError(f"{adapter} has no adapter_config.json, so it is not a LoRA adapter{hint}")
    return adapter


def read_adapter(adapter: Path, base: Path | None = None) -> AdapterFacts:
    """The facts of the LoRA adapter in `adapter` on `base` (default: the base it names, found as the
    merge finds it: adapter_config.json's base_model_name_or_path, else SWIFT's args.json / sft_args.json)."""
    adapter = adapter_folder(adapter)
    raw = merge.load_json(adapter / "adapter_config.json")
    base = Path(base) if base is not None else merge.resolve_base(adapter, raw)
    if not (base / "config.json").is_file():
        raise BuilderError(f"base model folder {base} has no config.json; pass the folder from_pretrained loads")
    config = merge.load_json(base / "config.json")
    base_tensors = {}
    for shard in merge.base_shards(base):
        base_tensors.update(shard.tensors)
    lora = merge.read_adapter(adapter)
    plan = merge.build_plan(base_tensors, config, adapter, "auto")  # raises what the merge would refuse
    cfg = plan.lora_config
    modules = tuple(
        ModuleLora(lm.name, lm.kind, lm.r, lm.scale) for lm in sorted(plan.modules.values(), key=lambda m: m.name)
    )
    # peft saves the (frozen) base_layer of a LoRA'd embedding / lm_head with the adapter
    # (save_embedding_layers): same shape as the base's, it is the base's own weight, not a replacement.
    copies = {k.split("base_model.model.", 1)[-1].replace(".base_layer.", ".") for k in lora.tensors
              if ".base_layer." in k}  # fmt: skip
    frozen = {k for k in copies & set(plan.replace) if tuple(plan.replace[k].shape) == base_tensors[k].shape}
    return AdapterFacts(
        adapter=adapter,
        base=base,
        architecture=str((config.get("architectures") or [""])[0]),
        r=cfg.r,
        lora_alpha=float(cfg.lora_alpha),
        use_rslora=bool(cfg.use_rslora),
        use_dora=bool(cfg.use_dora),
        lora_bias=bool(cfg.lora_bias or plan.bias_of),
        fan_in_fan_out=bool(cfg.fan_in_fan_out),
        rank_pattern=bool(cfg.rank_pattern),
        alpha_pattern=bool(cfg.alpha_pattern),
        modules=modules,
        saved_tensors=tuple(sorted(set(plan.replace) - frozen)),
        frozen_copies=tuple(sorted(frozen)),
        base_has_lm_head=any(re.search(r"(^|\.)(lm_head|output_layer|embed_out)\.weight$", k) for k in base_tensors),
        new_vocab=plan.new_vocab,
        tokenizer_changes=tokenizer_changes(adapter, base),
        size_bytes=lora.weights_file.stat().st_size,
        vision=vision_architecture(config) is not None,
        file_modules=tuple(
            sorted(
                {
                    re.sub(r"\.lora_[AB](\.[^.]+)?\.weight$", "", k)
                    for k in lora.tensors
                    if re.search(r"\.lora_[AB](\.[^.]+)?\.weight$", k)
                }
            )
        ),  # fmt: skip
    )


# -- the adapter folder's own tokenizer files -------------------------------------------------------


def _chat_template(folder: Path) -> str | None:
    for name in TEMPLATE_FILES:
        if (folder / name).is_file():
            text = (folder / name).read_text(encoding="utf-8")
            return json.loads(text).get("chat_template") if name.endswith(".json") else text
    if (folder / "tokenizer_config.json").is_file():
        return merge.load_json(folder / "tokenizer_config.json").get("chat_template")
    return None


def _added_tokens(folder: Path) -> set[tuple[int, str]] | None:
    """(id, text) of every added token the folder's tokenizer files declare, or None when it has none."""
    found: set[tuple[int, str]] = set()
    seen = False
    if (folder / "tokenizer.json").is_file():
        seen = True
        for t in merge.load_json(folder / "tokenizer.json").get("added_tokens") or []:
            found.add((int(t.get("id", -1)), str(t.get("content"))))
    if (folder / "tokenizer_config.json").is_file():
        decoder = merge.load_json(folder / "tokenizer_config.json").get("added_tokens_decoder")
        if isinstance(decoder, dict):
            seen = True
            found |= {(int(i), str(t.get("content"))) for i, t in decoder.items() if isinstance(t, dict)}
    if (folder / "added_tokens.json").is_file():
        seen = True
        found |= {(int(i), str(text)) for text, i in merge.load_json(folder / "added_tokens.json").items()}
    return found if seen else None


def tokenizer_changes(adapter: Path, base: Path) -> tuple[str, ...]:
    """What the adapter folder's tokenizer files change of the base's: a merge copies them over the base's
    (merge/folders.py TOKENIZER_FILE), an unmerged engine serves the base's tokenizer and template. Files the
    adapter merely repeats (SWIFT saves the base's tokenizer into every checkpoint) change nothing."""
    changes = []
    template = _chat_template(adapter)
    if template is not None and template != _chat_template(base):
        changes.append("chat template")
    tokens = _added_tokens(adapter)
    if tokens is not None and not tokens <= (_added_tokens(base) or set()):
        changes.append("added tokens")
    return tuple(changes)


# -- vLLM --------------------------------------------------------------------------------------------


def declared_rank(adapter: Path) -> int:
    """The largest rank adapter_config.json declares (r, and any rank_pattern value): what --max-lora-rank
    must hold. Read from the config alone, so it is known for an adapter over a hub base too."""
    raw = merge.load_json(adapter_folder(adapter) / "adapter_config.json")
    ranks = [raw.get("r") or 8, *(raw.get("rank_pattern") or {}).values()]  # peft's LoraConfig default r: 8
    try:
        return max(int(r) for r in ranks)
    except (TypeError, ValueError):
        raise BuilderError(f"{adapter}/adapter_config.json: r / rank_pattern {ranks} are not ranks") from None


def vllm_problems(facts: AdapterFacts) -> list[str]:
    """Why vLLM cannot serve this adapter unmerged (empty: it can), each with what to do instead.

    From vLLM's PEFTHelper (vllm/lora/peft_helper.py): modules_to_save and DoRA are refused, bias must be
    "none", the rank must fit --max-lora-rank, and one scale lora_alpha / r (or / sqrt(r)) is applied to
    every module (rank_pattern / alpha_pattern are not read). Whether the architecture takes LoRA at all
    is vLLM's registry's (SupportsLoRA) to say: the image's build stage asks it."""
    merge = "serve it merged: LORA=merge"
    out = []
    if facts.use_dora:
        out.append(f"it is a DoRA adapter, which vLLM does not support; {merge}")
    if facts.saved_tensors:
        out.append(f"it saves full modules ({', '.join(facts.modules_to_save)}), which vLLM refuses; {merge}")
    if facts.lora_bias:
        out.append(f"it trains LoRA biases (lora_bias), which vLLM refuses; {merge}")
    if vllm_max_lora_rank(facts.max_rank) is None:
        out.append(
            f"its rank {facts.max_rank} is above vLLM's largest --max-lora-rank {VLLM_MAX_LORA_RANKS[-1]}; {merge}"
        )
    if not facts.uniform_scale:
        out.append(f"rank_pattern / alpha_pattern give modules scales vLLM does not apply; {merge}")
    if facts.embeddings_targeted or facts.lm_head_targeted:
        out.append(f"LoRA on the embeddings / lm_head is not verified on the pinned vLLM; {merge}")
    out += [f"{change}: vLLM would serve the base's; {merge}" for change in _change_texts(facts)]
    if facts.vision_parts:
        out.append(
            f"it changes the {' and '.join(facts.vision_parts)}; vLLM applies a LoRA to the language model only "
            "unless --enable-tower-connector-lora (which vLLM marks experimental, and no image has been served "
            f"with it here); {merge}"
        )
    misplaced = vllm_misplaced(facts.file_modules) if facts.architecture in PROVEN else []
    if misplaced:
        out.append(
            f"vLLM would load the LoRA of {len(misplaced)} module(s) and never apply it ({misplaced[0]} lands on "
            f"{vllm_module(misplaced[0])}, not a module of its {facts.architecture}): the server would answer as "
            f"the base does; {merge}"
        )
    return out


def _change_texts(facts: AdapterFacts) -> list[str]:
    return [f"the adapter folder carries its own {c}" for c in facts.tokenizer_changes]


# -- training runs -----------------------------------------------------------------------------------


def _step(path: Path) -> int:
    tail = path.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def run_checkpoints(run: Path) -> dict[str, Path]:
    """A SWIFT / HF Trainer run folder's LoRA checkpoints by name (checkpoint-N, in step order), plus
    "best" for the one trainer_state.json records as best_model_checkpoint (read from the last
    checkpoint, which holds the whole run's state). Empty when `run` holds no checkpoint-N adapter."""
    run = Path(run)
    ckpts = sorted(
        (p for p in run.glob("checkpoint-*") if _step(p) >= 0 and (p / "adapter_config.json").is_file()), key=_step
    )
    out = {p.name: p for p in ckpts}
    for folder in [*reversed(ckpts), run]:
        state = folder / "trainer_state.json"
        if state.is_file():
            best = merge.load_json(state).get("best_model_checkpoint")
            if isinstance(best, str) and Path(best).name in out:
                out["best"] = out[Path(best).name]
            break
    return out
