"""The image part of the quality step (vision-language models): EVAL records in SWIFT's layout with `images`
are read and checked, and, on the real llama-server with a tiny random Qwen2-VL, each image prompt is answered
by the reference and the artifact (text GGUF + mmproj) and compared token for token in the same report."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest

from builder.demo.tiny_vision import data_url, make_pixels, png_bytes
from builder.errors import BuilderError
from builder.model.quality import images, prompts
from builder.model.quality.report import print_report, summary


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def swift(content: str, images_: list, answer: str | None = None) -> dict:
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages, "images": images_}


@pytest.fixture
def pngs(tmp_path):
    out = []
    for seed in (0, 1):
        path = tmp_path / "img" / f"{seed}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(png_bytes(make_pixels(seed=seed)))
        out.append(path)
    return out


def _image_urls(prompt) -> list[str]:
    return [p["image_url"]["url"] for m in prompt.messages if isinstance(m["content"], list) for p in m["content"]
            if p["type"] == "image_url"]  # fmt: skip


def test_swift_records_become_image_prompts(tmp_path, pngs):
    inline = data_url(pngs[1].read_bytes())
    path = write_jsonl(
        tmp_path / "eval.jsonl",
        [
            swift("<image>What is this?", ["img/0.png"], "A square."),
            swift("Compare <image> with <image>.", [{"path": str(pngs[0])}, inline]),
            swift("No placeholder here.", ["img/1.png"]),
            {"messages": [{"role": "user", "content": "text only"}]},
        ],
    )
    first, both, prepended, text = prompts.load_eval(path)
    assert first.images == (data_url(pngs[0].read_bytes()),) and first.expected == "A square."
    assert first.messages[-1]["content"] == [
        {"type": "image_url", "image_url": {"url": first.images[0]}},
        {"type": "text", "text": "What is this?"},
    ]
    assert first.question == "<image>What is this?"
    assert _image_urls(both) == [data_url(pngs[0].read_bytes()), inline] and both.question.count("<image>") == 2
    assert prepended.question == "<image>No placeholder here."  # SWIFT puts them before the first user text
    assert text.images == () and text.messages == ({"role": "user", "content": "text only"},)


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        ("img/missing.png", r"\(.img/missing.png.\) not found at .*img/missing.png"),
        ("https://example.com/cat.png", "images are never fetched"),
        ("notes.txt", "is not a PNG, JPEG, GIF, BMP or WebP image"),
        ("data:image/png;base64,@@@", "not valid base64"),
        ("data:text/plain;base64,aGk=", "is not a data:image/<type>;base64"),
        (None, "is not a path or a data: URL"),
    ],
)
def test_a_bad_image_names_the_line_and_why(tmp_path, pngs, image, reason):
    (tmp_path / "notes.txt").write_text("not an image")
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps(swift("<image>ok", ["img/0.png"])) + "\n\n" + json.dumps(swift("<image>x", [image])))
    with pytest.raises(BuilderError, match=rf"eval.jsonl line 3: image 1 .*{reason}"):
        prompts.load_eval(path)
    with pytest.raises(BuilderError, match=rf"eval.jsonl line 3: image 1 .*{reason}"):
        prompts.copy_eval(path, tmp_path / "ctx.jsonl")


def test_placeholder_count_must_match_and_size_is_limited(tmp_path, pngs, monkeypatch):
    path = write_jsonl(tmp_path / "eval.jsonl", [swift("<image><image>two?", ["img/0.png"])])
    with pytest.raises(BuilderError, match=r"line 1: 2 <image> placeholder\(s\) for 1 image\(s\)"):
        prompts.load_eval(path)
    monkeypatch.setattr(images, "MAX_BYTES", 100)
    write_jsonl(path, [swift("<image>big", ["img/0.png"])])
    with pytest.raises(BuilderError, match=r"line 1: image 1 .* bytes, over the limit of 100"):
        prompts.load_eval(path)
    write_jsonl(path, [swift("<image>big", [data_url(pngs[0].read_bytes())])])
    with pytest.raises(BuilderError, match=r"line 1: image 1 \('data: URL'\) \d+ bytes, over the limit"):
        prompts.load_eval(path)


def test_copy_eval_inlines_images_and_keeps_text_files_as_they_are(tmp_path, pngs):
    text = write_jsonl(tmp_path / "text.jsonl", [{"query": "Q", "response": "A"}])
    prompts.copy_eval(text, tmp_path / "ctx-text.jsonl")
    assert (tmp_path / "ctx-text.jsonl").read_bytes() == text.read_bytes()
    source = write_jsonl(tmp_path / "eval.jsonl", [swift("<image>What?", ["img/0.png"], "A.")])
    dest = prompts.copy_eval(source, tmp_path / "ctx" / "eval.jsonl")
    [record] = [json.loads(line) for line in dest.read_text().splitlines()]
    assert record["images"] == [data_url(pngs[0].read_bytes())]
    assert base64.b64decode(record["images"][0].split(",", 1)[1]) == pngs[0].read_bytes()
    shutil.rmtree(tmp_path / "img")  # the copy stands alone: no path outside it is read again
    assert prompts.load_eval(dest) == prompts.load_eval(dest) and prompts.load_eval(dest)[0].images


# -- the real thing: llama-server with an mmproj ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory):
    """A tiny random Qwen2-VL as an f32 text GGUF + f32 mmproj, a copy of both (the artifact), and the mmproj of
    another random Qwen2-VL (a wrong vision tower of the same shapes)."""
    from builder.model.quality.tools import binary

    try:
        for name in ("llama-perplexity", "llama-server"):
            binary(name)
    except BuilderError as e:
        pytest.skip(str(e))
    from builder.demo.tiny_vision import make_random_qwen2_vl
    from builder.model.gguf.convert import convert_gguf, convert_mmproj

    work = tmp_path_factory.mktemp("quality-vl")
    folder = make_random_qwen2_vl(work / "hf")
    out = {"text": convert_gguf(folder, "f32", work / "model.gguf", quiet=True).path}
    out["mmproj"] = convert_mmproj(folder, work / "mmproj.gguf", "f32", quiet=True)
    (work / "artifact").mkdir()
    for key in ("text", "mmproj"):
        out[f"artifact_{key}"] = Path(shutil.copy2(out[key], work / "artifact" / out[key].name))
    other = make_random_qwen2_vl(work / "other", seed=1)
    out["other_mmproj"] = convert_mmproj(other, work / "other-mmproj.gguf", "f32", quiet=True)
    for seed in (0, 1):
        (work / f"{seed}.png").write_bytes(png_bytes(make_pixels(seed=seed)))
    out["eval"] = write_jsonl(
        work / "eval.jsonl", [swift("<image>Describe.", ["0.png"]), swift("<image>Describe.", ["1.png"])]
    )
    return out


def test_image_part_of_the_report_f32_against_f32(tiny_vl, tmp_path):
    from rich.console import Console

    from builder.model.quality import Artifact, Served, Settings, measure

    reference = Served(tiny_vl["text"], mmproj=tiny_vl["mmproj"])
    same = Artifact(Served(tiny_vl["artifact_text"], mmproj=tiny_vl["artifact_mmproj"]), "f32")
    wrong = Artifact(Served(tiny_vl["artifact_text"], mmproj=tiny_vl["other_mmproj"]), "f32", "wrong tower")
    settings = Settings(ctx=128, chunks=2, n_predict=8)
    good, bad = measure(
        reference, [same, wrong], work=tmp_path, eval_file=tiny_vl["eval"], settings=settings, progress=lambda _: None
    )
    assert good.image_eval_total == 2 and good.image_eval_same == 2, good.image_eval
    assert all(r["differs_at_token"] is None and r["answer"] == r["reference_answer"] for r in good.image_eval)
    answers = [r["reference_answer"] for r in good.image_eval]
    assert answers[0] and answers[0] != answers[1], f"the image has no effect on the answer: {answers}"
    assert good.eval_total == len(prompts.BUILTIN_PROMPTS) and good.eval_same == good.eval_total  # the text part
    assert good.kl_mean == pytest.approx(0, abs=1e-6) and good.top1_agreement == 1
    assert "mmproj mmproj.gguf" in good.reference and "mmproj mmproj.gguf" in good.artifact
    # the same text GGUF with another model's vision tower: the text part agrees, the image part does not
    assert bad.eval_same == bad.eval_total and bad.image_eval_same < bad.image_eval_total
    assert "image eval 2/2" in summary([good])
    console = Console(record=True, width=200)
    print_report([good, bad], console=console)
    shown = console.export_text()
    assert "image eval same" in shown and "image prompt '<image>Describe.' differs from token" in shown


def test_image_prompts_need_an_mmproj_on_both_sides_or_are_left_out(tiny_vl, tmp_path):
    from builder.model.quality import Artifact, Served, Settings, measure

    with pytest.raises(BuilderError, match=r"2 eval prompt\(s\) show images, but model.gguf has no mmproj"):
        measure(Served(tiny_vl["text"], mmproj=tiny_vl["mmproj"]), [Artifact(Served(tiny_vl["artifact_text"]), "f32")],
                work=tmp_path, eval_file=tiny_vl["eval"], progress=lambda _: None)  # fmt: skip
    said = []
    [text_only] = measure(
        Served(tiny_vl["text"]), [Artifact(Served(tiny_vl["artifact_text"]), "f32")], work=tmp_path,
        eval_file=tiny_vl["eval"], settings=Settings(ctx=128, chunks=2, n_predict=4), progress=said.append,
    )  # fmt: skip
    assert text_only.image_eval_total == 0 and text_only.eval_total == len(prompts.BUILTIN_PROMPTS)
    assert any("2 eval prompt(s) with images left out" in line for line in said)


def test_the_quality_stage_of_a_vision_image_measures_its_mmproj(tmp_path, pngs):
    """The llama.cpp image's quality stage mounts the mmproj stage and passes it, and the build context's EVAL holds
    the images inline."""
    pytest.importorskip("torch")
    from builder.demo.tiny_vision import make_random_qwen2_vl
    from builder.image.build import prepare_context
    from builder.image.render import render_text
    from builder.selection import select_backends
    from builder.spec import load_spec, read_model_config

    folder = make_random_qwen2_vl(tmp_path / "vl")
    eval_file = write_jsonl(tmp_path / "eval.jsonl", [swift("<image>What?", ["img/0.png"])])
    spec = load_spec({"model": str(folder), "backends": "llamacpp", "quality": "on", "quality_eval": str(eval_file)})
    dockerfile = render_text(spec, select_backends(spec, read_model_config(spec)))["Dockerfile.llamacpp"]
    stage = dockerfile.split("AS quality-measure", 1)[1].split("FROM scratch AS quality", 1)[0]
    assert "--mount=type=bind,from=mmproj,source=/w/models,target=/in/mmproj" in stage
    assert "--mmproj /in/mmproj/mmproj.gguf" in stage and "--eval /ctx/quality/eval.jsonl" in stage
    ctx = prepare_context(spec, tmp_path / "build")
    [record] = prompts.read_records(ctx / "quality" / "eval.jsonl")
    assert record["images"] == [data_url(pngs[0].read_bytes())]
