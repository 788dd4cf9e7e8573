"""LoRA adapters served unmerged by llama.cpp: converted with the pinned convert_lora_to_gguf.py, greedy ids
from llama-server (f16 base GGUF + f16 LoRA GGUF) equal transformers' of base + adapter (peft, unmerged), on
tiny GLM, Llama and Qwen2, for peft adapters and SWIFT checkpoints, rsLoRA and rank/alpha patterns included."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from _llama_server import llama_server, post  # noqa: E402
from _tiny_hf import PROMPTS, make_adapter  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from builder.demo.tiny import make_random_glm, make_random_llama, make_random_qwen2  # noqa: E402
from builder.errors import BuilderError  # noqa: E402
from builder.model.adapter import read_adapter  # noqa: E402
from builder.model.gguf.convert import convert_gguf, read_gguf  # noqa: E402
from builder.model.gguf.lora import convert_lora, gguf_scale, llamacpp_problems  # noqa: E402

N_NEW = 16
# f16 weights move a logit by ~1e-4 here: a greedy step whose top two logits (transformers, f32) are closer than
# this is a coin toss, not a conversion check, and its prompt is left out (most prompts have none).
MIN_GAP = 0.002
MAKERS = {"glm": make_random_glm, "llama": make_random_llama, "qwen2": make_random_qwen2}
# adapter name -> make_adapter keywords (all-linear: every projection, attention and MLP, lm_head aside)
ADAPTERS = {
    "peft": {"r": 8, "lora_alpha": 16},
    "swift": {"r": 4, "lora_alpha": 32, "seed": 2},
    "rslora": {"r": 16, "lora_alpha": 4, "use_rslora": True, "seed": 3},
    "patterns": {"r": 4, "lora_alpha": 8, "rank_pattern": {"v_proj": 8}, "alpha_pattern": {"o_proj": 32}, "seed": 4},
    # LoRA on the token embeddings and the (untied) lm_head: peft saves their frozen base weights beside
    "embed_head": {"r": 8, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj", "embed_tokens", "lm_head"]},
}
# Every architecture gets a peft adapter and a SWIFT checkpoint; the scale conversions (the same code
# whatever the architecture) are proven on Llama only, to keep the conversions few.
FAMILY_ADAPTERS = {"glm": ("peft", "swift"), "llama": tuple(ADAPTERS), "qwen2": ("peft", "swift")}


def hf_greedy(model, ids: list[int], n: int, banned: list[int]) -> tuple[list[int], float]:
    """n greedy tokens (one full forward each, never a `banned` one) and the smallest top-2 logit gap met."""
    ids, out, gap = list(ids), [], float("inf")
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            logits[banned] = float("-inf")
            top = logits.topk(2).values
            gap = min(gap, float(top[0] - top[1]))
            out.append(int(logits.argmax()))
            ids.append(out[-1])
    return out, gap


def clear_cases(model, prompts: list[list[int]], banned: list[int]) -> dict[int, list[int]]:
    """prompt index -> transformers' greedy ids, for the prompts without a near-tie (at least 4 of 6)."""
    runs = [hf_greedy(model, ids, N_NEW, banned) for ids in prompts]
    kept = {i: ids for i, (ids, gap) in enumerate(runs) if gap >= MIN_GAP}
    assert len(kept) >= 4, [gap for _, gap in runs]
    return kept


def server_greedy(url: str, ids: list[int], n: int, banned: list[int], lora: list[dict] | None) -> list[int]:
    body = {"prompt": ids, "n_predict": n, "temperature": 0, "top_k": 1, "ignore_eos": True, "cache_prompt": False,
            "logit_bias": [[i, False] for i in banned], "return_tokens": True}  # fmt: skip
    if lora is not None:
        body["lora"] = lora
    return post(url + "/completion", body)["tokens"]


def make_swift_checkpoint(model, base: Path, run: Path, **kw) -> Path:
    """SWIFT 3.x layout: output/<model>/vN-<date>/checkpoint-N/ with peft files, the base named only in args.json
    (adapter_config.json's base_model_name_or_path is a hub id), the trainer's state beside it."""
    ckpt = make_adapter(model, run / "checkpoint-20", base_path="THUDM/glm-4-9b-chat", **kw)
    (ckpt / "args.json").write_text(json.dumps({"model": "THUDM/glm-4-9b-chat", "model_id_or_path": str(base)}))
    (ckpt / "trainer_state.json").write_text(json.dumps({"best_model_checkpoint": str(ckpt), "global_step": 20}))
    for junk in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        (ckpt / junk).write_bytes(b"x")
    return ckpt


@pytest.fixture(scope="module")
def family(tmp_path_factory, request):
    """One architecture: base folder, f16 base GGUF, its adapters (folders and f16 GGUF LoRAs)."""
    arch = request.param
    root = tmp_path_factory.mktemp(f"lora-{arch}")
    base = MAKERS[arch](root / "base")
    gguf = convert_gguf(base, "f16", root / "base-f16.gguf", quiet=True).path
    adapters, ggufs = {}, {}
    for name in FAMILY_ADAPTERS[arch]:
        kw = {"target_modules": "all-linear", **ADAPTERS[name]}
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        if name == "swift":
            adapters[name] = make_swift_checkpoint(model, base, root / "output" / "v0-20250101", **kw)
        else:
            adapters[name] = make_adapter(model, root / name, base_path=str(base), **kw)
        ggufs[name] = convert_lora(adapters[name], None, root / f"{name}.gguf", quiet=True).path
    return {"arch": arch, "root": root, "base": base, "gguf": gguf, "adapters": adapters, "ggufs": ggufs}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["glm", "llama", "qwen2"], indirect=True)
def test_unmerged_lora_greedy_ids_equal_peft(family):
    """One llama-server holds every adapter at default scale 0 (`--lora-scaled FILE:0`: the pinned server's
    --lora-init-without-apply does not keep a request without a `lora` field off the adapters); each request
    picks one with the per-request `lora` field (ids left out get 0), none for the base. Each adapter must
    change the ids (a no-op LoRA proves nothing) and give exactly peft's."""
    names = list(FAMILY_ADAPTERS[family["arch"]])
    tok = AutoTokenizer.from_pretrained(family["base"])
    banned = sorted(set(tok.all_special_ids) | set(tok.added_tokens_decoder))
    base_model = AutoModelForCausalLM.from_pretrained(family["base"], dtype=torch.float32).eval()
    prompts = [tok(p).input_ids for p in PROMPTS[:6]]
    want_base = clear_cases(base_model, prompts, banned)
    args = [a for n in names for a in ("--lora-scaled", f"{family['ggufs'][n]}:0")]
    with llama_server(family["gguf"], "-c", "512", "-np", "1", *args) as url:
        assert {i: server_greedy(url, prompts[i], N_NEW, banned, None) for i in want_base} == want_base
        for i, name in enumerate(names):
            model = PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(family["base"], dtype=torch.float32), family["adapters"][name]
            ).eval()
            want = clear_cases(model, prompts, banned)
            changed = [j for j in want if want[j] != hf_greedy(base_model, prompts[j], N_NEW, banned)[0]]
            assert changed, f"{name}: the adapter does not change the greedy ids; the test proves nothing"
            got = {j: server_greedy(url, prompts[j], N_NEW, banned, [{"id": i, "scale": 1.0}]) for j in want}
            assert got == want, (family["arch"], name)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama"], indirect=True)
def test_rslora_alpha_and_pattern_rescale_are_written(family):
    """rsLoRA: llama.cpp scales by alpha / r, so alpha * sqrt(r) is written; patterns: one alpha for most
    modules, the rest folded into lora_B (checked against the source adapter's tensors)."""
    from safetensors.torch import load_file

    from builder.model.gguf.convert import _gguf_module

    meta = read_gguf(family["ggufs"]["rslora"]).metadata
    assert meta["adapter.lora.alpha"] == pytest.approx(4 * math.sqrt(16), rel=1e-6)
    facts = read_adapter(family["adapters"]["patterns"])
    alpha, rescaled = gguf_scale(facts)
    assert alpha == 8.0  # scale * r: 8 / 4 * 4 everywhere, v_proj too (8 / 8 * 8: llama.cpp divides by its rank)
    assert rescaled == {f"model.layers.{i}.self_attn.o_proj": 4.0 for i in range(2)}  # 32 / 4 * 4 = 4 * 8
    src = load_file(family["adapters"]["patterns"] / "adapter_model.safetensors")
    reader = _gguf_module().GGUFReader(family["ggufs"]["patterns"])
    tensors = {t.name: torch.from_numpy(t.data.copy()).float() for t in reader.tensors}
    b_src = src["base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight"].float()
    assert torch.allclose(tensors["blk.0.attn_output.weight.lora_b"], 4.0 * b_src, rtol=1e-3, atol=1e-5)


# -- the compatibility check (no llama-server) -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-compat")
    return make_random_llama(root / "base")


def _adapter(base: Path, path: Path, **kw) -> Path:
    return make_adapter(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), path, base_path=str(base), **kw
    )


def test_facts_of_a_plain_adapter(tiny_llama, tmp_path):
    ad = _adapter(tiny_llama, tmp_path / "ad", r=8, lora_alpha=16, target_modules="all-linear")
    facts = read_adapter(ad)
    assert facts.base == tiny_llama and facts.architecture == "LlamaForCausalLM"
    assert facts.target_modules == ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj")
    assert (facts.max_rank, facts.use_dora, facts.use_rslora, facts.saved_tensors) == (8, False, False, ())
    assert not facts.embeddings_targeted and not facts.lm_head_targeted and facts.uniform_scale
    assert llamacpp_problems(facts) == []


def test_embedding_and_lm_head_lora_facts(tiny_llama, tmp_path):
    """peft saves the frozen embedding / lm_head weights beside their LoRA: copies, not replacements (llama.cpp
    serves it; vLLM's check still says no); a resized vocabulary makes them real replacements."""
    from builder.model.adapter import vllm_problems

    ad = _adapter(tiny_llama, tmp_path / "ad", target_modules=["q_proj", "embed_tokens", "lm_head"])
    facts = read_adapter(ad)
    assert facts.frozen_copies == ("lm_head.weight", "model.embed_tokens.weight") and facts.saved_tensors == ()
    assert facts.embeddings_targeted and facts.lm_head_targeted
    assert llamacpp_problems(facts) == []
    assert any("embeddings / lm_head" in p for p in vllm_problems(facts))


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"lora_bias": True, "base": "qwen2"}, "LoRA biases"),  # Qwen2: q/k/v have biases
        ({"modules_to_save": ["lm_head"]}, r"saves full modules \(lm_head\)"),
        ({"modules_to_save": ["norm"]}, r"saves full modules \(.*model\.norm\)"),  # llama.cpp would drop norms
    ],
)
def test_llamacpp_refusals_say_what_to_do(tiny_llama, tmp_path, kw, reason):
    kw = {"target_modules": ["q_proj", "v_proj"], **kw}
    base = make_random_qwen2(tmp_path / "qwen2") if kw.pop("base", None) else tiny_llama
    facts = read_adapter(_adapter(base, tmp_path / "ad", **kw))
    problems = llamacpp_problems(facts)
    assert len(problems) == 1 and all("LORA=merge" in p for p in problems), problems
    assert __import__("re").search(reason, problems[0]), problems
    with pytest.raises(BuilderError, match="cannot serve .* unmerged"):
        convert_lora(facts.adapter, None, tmp_path / "x.gguf", quiet=True)
    assert not (tmp_path / "x.gguf").exists()


def test_adapter_tokenizer_changes_are_refused(tiny_llama, tmp_path):
    """A SWIFT checkpoint repeats the base's tokenizer (fine); a new chat template or added tokens are not
    served by the base GGUF (the merge would take them)."""
    ad = _adapter(tiny_llama, tmp_path / "ad", target_modules=["q_proj"])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (ad / name).write_bytes((tiny_llama / name).read_bytes())
    assert read_adapter(ad).tokenizer_changes == ()
    cfg = json.loads((ad / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ messages[0].content }}"
    (ad / "tokenizer_config.json").write_text(json.dumps(cfg))
    (ad / "added_tokens.json").write_text(json.dumps({"<tool>": 600}))
    facts = read_adapter(ad)
    assert facts.tokenizer_changes == ("chat template", "added tokens")
    assert [p.split(":")[0] for p in llamacpp_problems(facts)] == [
        "the adapter folder carries its own chat template",
        "the adapter folder carries its own added tokens",
    ]


def test_swift_layouts_find_the_base_and_list_checkpoints(tiny_llama, tmp_path):
    """SWIFT 3.x / 4.x: args.json in checkpoint-N names the base; SWIFT 2.x: sft_args.json in the run folder
    (model_dir). adapter_config.json names a hub id the machine does not have. run_checkpoints lists the
    run's checkpoints and the one trainer_state.json records as best."""
    from builder.model.adapter import run_checkpoints

    run = tmp_path / "output" / "llama" / "v1-20250101-120000"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    c10 = make_swift_checkpoint(model, tiny_llama, run, target_modules=["q_proj"])
    c10.rename(run / "checkpoint-10")
    c20 = make_swift_checkpoint(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                tiny_llama, run, target_modules=["q_proj"])  # fmt: skip
    (c20 / "trainer_state.json").write_text(json.dumps({"best_model_checkpoint": "/train/output/v1/checkpoint-10"}))
    assert read_adapter(c20).base == tiny_llama
    (c20 / "args.json").unlink()
    (run / "sft_args.json").write_text(json.dumps({"model_type": "llama3", "model_dir": str(tiny_llama)}))
    assert read_adapter(c20).base == tiny_llama
    assert run_checkpoints(run) == {"checkpoint-10": run / "checkpoint-10", "checkpoint-20": c20,
                                    "best": run / "checkpoint-10"}  # fmt: skip
    with pytest.raises(BuilderError, match="training run: pass one of its checkpoints"):
        read_adapter(run)


def test_no_code_from_the_base_folder_runs(tiny_llama, tmp_path):
    """A base whose config points at its own code (auto_map, a model_type transformers does not know): the
    converter reads config.json, never the folder's Python, and the LoRA still converts."""
    base = tmp_path / "remote-base"
    base.mkdir()
    for f in tiny_llama.iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "remote-code-ran"
    (base / "configuration_custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    cfg = json.loads((base / "config.json").read_text())
    cfg.update(model_type="custom_llama", auto_map={"AutoConfig": "configuration_custom.CustomConfig"})
    (base / "config.json").write_text(json.dumps(cfg))
    ad = _adapter(tiny_llama, tmp_path / "ad", target_modules=["q_proj"])
    out = convert_lora(ad, base, tmp_path / "ad.gguf", quiet=True)
    assert not marker.exists()
    assert read_gguf(out.path).metadata["general.architecture"] == "llama" and out.tensors == 4
