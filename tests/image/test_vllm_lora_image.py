"""vLLM serving adapters unmerged. Which adapters vLLM takes (selection, on real tiny models and real
peft adapters), and the image that serves them, asserted from its render and build args (no Docker, no GPU):
the base unmerged in one layer, each adapter a small pinned layer after it, and the env that becomes vLLM's
--enable-lora --lora-modules ... --max-loras N --max-lora-rank R."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from _tiny_hf import make_adapter  # noqa: E402
from test_vllm_image import runtime_env  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from builder.errors import BuilderError  # noqa: E402
from builder.image.build import adapter_context, build_args, prepare_context  # noqa: E402
from builder.image.render import render_text  # noqa: E402
from builder.model.gguf.router import base_name as router_base_name  # noqa: E402
from builder.runtime import vllm_boot  # noqa: E402
from builder.selection import select_backends  # noqa: E402
from builder.spec import BuildSpec, read_model_config  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random Llama and adapters on it: two plain LoRAs (r 4 and r 40), one with LoRA on lm_head, one of rank
    600 (above vLLM's largest --max-lora-rank) and a DoRA."""
    from builder.demo.tiny import make_random_llama

    root = tmp_path_factory.mktemp("vllm-lora")
    base = make_random_llama(root / "base")
    found = {"base": base}
    kinds = {
        "sql": {"seed": 1},
        "chat": {"seed": 2, "r": 40, "lora_alpha": 80},
        "head": {"target_modules": ["q_proj", "lm_head"]},
        "wide": {"r": 600, "lora_alpha": 600},
        "dora": {"use_dora": True},
    }
    for name, kw in kinds.items():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        found[name] = make_adapter(model, root / name, base_path=str(base), **kw)
    return found


def _select(spec: BuildSpec):
    return select_backends(spec, read_model_config(spec))


def _served(tiny, **kw):
    spec = BuildSpec(model=str(tiny["base"]), backends=["vllm"], **kw)
    sel = _select(spec)
    return spec, sel, render_text(spec, sel)["Dockerfile.vllm"]


def _image_env(spec, sel, dockerfile: str) -> dict[str, str]:
    """The runtime ENV with the build args `builder build` passes substituted, as the container sees it."""
    args = build_args(spec, "vllm", None, sel.served_by("vllm"))
    return {k: re.sub(r"\$\{(\w+)\}", lambda m: args.get(m[1], ""), v) for k, v in runtime_env(dockerfile).items()}


# ---- selection ------------------------------------------------------------------------------------------


def test_auto_serves_a_plain_adapter_unmerged_on_vllm(tiny):
    sel = _select(BuildSpec(model=str(tiny["base"]), adapter=tiny["sql"], backends=["vllm"]))
    assert sel.lora["vllm"].mode == "serve" and sel.served_by("vllm") == {"base": tiny["sql"]}


@pytest.mark.parametrize(
    "adapter,why",
    [
        ("head", "embeddings / lm_head"),
        ("wide", "rank 600 is above vLLM's largest --max-lora-rank 512"),
        ("dora", "DoRA"),
    ],
)
def test_auto_merges_what_vllm_cannot_serve_saying_why(tiny, adapter, why):
    sel = _select(BuildSpec(model=str(tiny["base"]), adapter=tiny[adapter], backends=["vllm"]))
    plan = sel.lora["vllm"]
    assert plan.mode == "merge" and why in plan.reason and "LORA=merge" in plan.reason
    assert sel.served_by("vllm") == {}
    with pytest.raises(BuilderError, match=f"LORA=serve, but .*{re.escape(why)}"):
        _select(BuildSpec(model=str(tiny["base"]), adapter=tiny[adapter], backends=["vllm"], lora_mode="serve"))


def test_several_adapters_on_vllm_and_one_it_cannot_serve_among_them(tiny):
    adapters = {"sql": tiny["sql"], "chat": tiny["chat"]}
    sel = _select(BuildSpec(model=str(tiny["base"]), adapters=adapters, backends=["vllm"]))
    assert sel.served_by("vllm") == adapters
    with pytest.raises(BuilderError, match="vLLM cannot serve this model: .*head: LoRA on the embeddings"):
        _select(BuildSpec(model=str(tiny["base"]), adapters={**adapters, "head": tiny["head"]}, backends=["vllm"]))


# ---- the image ------------------------------------------------------------------------------------------


def test_served_adapters_keep_the_base_unmerged_and_add_one_pinned_layer_each(tiny):
    _, _, text = _served(tiny, adapters={"sql": tiny["sql"], "chat": tiny["chat"]})
    model = text[text.index("AS model") : text.index("AS adapter-0")]
    assert "--adapter" not in model and "/ctx/adapter" not in model  # no merge: the base as it is
    for i, name in enumerate(["sql", "chat"]):
        stage = text[text.index(f"AS adapter-{i}") :].split("\nFROM ", 1)[0]
        assert f"source=adapters/{name},target=/in/adapter" in stage  # the context folder llama.cpp's uses
        assert f"/in/adapter/adapter_config.json /in/adapter/adapter_model.* /w/models/lora/{name}/" in stage
        assert "touch -h -d @0" in stage and "chown -R 0:0 /w" in stage
    runtime = text[text.index("AS runtime") :]
    copies = [line for line in runtime.splitlines() if line.startswith("COPY --from=")]
    assert copies == [
        "COPY --from=chat-template /w/ /",  # the base: one layer
        "COPY --from=adapter-0 /w/ /",
        "COPY --from=adapter-1 /w/ /",
    ]
    assert runtime.index("COPY --from=adapter-1") < runtime.index("USER 10001")


def test_the_env_becomes_vllms_lora_flags(tiny):
    spec, sel, text = _served(tiny, adapters={"sql": tiny["sql"], "chat": tiny["chat"]})
    args = build_args(spec, "vllm", None, sel.served_by("vllm"))
    assert (args["LORA_RANK"], args["MAX_LORA_RANK"]) == ("40", "64")  # the largest rank, and vLLM's value for it
    env = _image_env(spec, sel, text)
    assert env["LLM_LORA_MODULES"] == "sql=/models/lora/sql chat=/models/lora/chat"
    argv = vllm_boot.serve_argv(env)
    assert argv[argv.index("--served-model-name") + 1] == "base"  # the base keeps the model's name
    tail = argv[argv.index("--enable-lora") :]
    assert tail[:8] == [
        "--enable-lora", "--lora-modules", "sql=/models/lora/sql", "chat=/models/lora/chat",
        "--max-loras", "2", "--max-lora-rank", "64",
    ]  # fmt: skip


def test_one_unnamed_adapter_is_the_model_and_the_base_is_name_base_as_on_llamacpp(tiny):
    spec, sel, text = _served(tiny, adapter=tiny["sql"], served_model_name="support")
    env = _image_env(spec, sel, text)
    assert env["LLM_LORA_MODULES"] == "support=/models/lora/support"
    argv = vllm_boot.serve_argv({**env, "SERVED_MODEL_NAME": "support"})
    assert argv[argv.index("--served-model-name") + 1] == "support-base" == router_base_name("support", ["support"])
    assert argv[argv.index("--lora-modules") + 1] == "support=/models/lora/support"
    assert argv[argv.index("--max-lora-rank") + 1] == "8"  # r 4


def test_the_arch_check_is_asked_for_lora_at_the_adapters_rank(tiny):
    spec, sel, text = _served(tiny, adapters={"sql": tiny["sql"], "chat": tiny["chat"]})
    check = text[text.index("AS arch-check") : text.index("AS build-env")]
    assert '--lora-rank "$LORA_RANK"' in check
    assert build_args(spec, "vllm", None, sel.served_by("vllm"))["LORA_RANK"] == "40"
    merged = BuildSpec(model=str(tiny["base"]), adapter=tiny["sql"], backends=["vllm"], lora_mode="merge")
    assert "LORA_RANK" not in build_args(merged, "vllm", tiny["sql"], _select(merged).served_by("vllm"))


def test_rank_pattern_raises_the_rank_the_build_asks_for(tiny, tmp_path):
    from builder.backends import get

    folder = tmp_path / "patterned"
    folder.mkdir()
    cfg = json.loads((tiny["sql"] / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "rank_pattern": {"q_proj": 100}}))
    args = get("vllm").adapter_build_args(BuildSpec(), {"a": tiny["sql"], "b": folder})
    assert args == {"LORA_RANK": "100", "MAX_LORA_RANK": "128"}


def test_the_context_holds_what_the_adapter_stages_copy(tiny, tmp_path):
    spec = BuildSpec(model=str(tiny["base"]), adapters={"sql": tiny["sql"], "chat": tiny["chat"]}, backends=["vllm"])
    served, files = adapter_context(spec, _select(spec))
    assert files == {}  # vLLM needs no file of its own: the names and rank are in the image's env
    ctx = prepare_context(spec, tmp_path, None, served, files)
    for name in ("sql", "chat"):
        assert (ctx / "adapters" / name / "adapter_config.json").is_file()
        assert (ctx / "adapters" / name / "adapter_model.safetensors").is_file()


def test_without_adapters_the_render_is_unchanged(tiny):
    default = render_text(BuildSpec())["Dockerfile.vllm"]
    runtime = default[default.index(" AS runtime\n") :]  # the engine sets LLM_LORA_MODULES="": adapters at run time
    assert "LLM_LORA_MODULES" not in runtime and "adapter-0" not in default
    merged = BuildSpec(model=str(tiny["base"]), adapter=tiny["wide"], backends=["vllm"])
    assert render_text(merged, _select(merged))["Dockerfile.vllm"] == default  # merged: as without adapters
    assert Path(__file__).resolve().parents[2].joinpath("Dockerfile.vllm").read_text() == default
