"""Vision-language models on the real llama-server (host build of the pinned llama.cpp, with its source patches):
a tiny random Qwen2-VL / Qwen2.5-VL converted to an f32 text GGUF + f32 mmproj answers an image greedily as
transformers does (M-RoPE positions), two images give two answers, and hostile images are a 400 that leaves the
server answering."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from _llama_server import SERVER, llama_server, post

from builder.demo.tiny_vision import (
    data_url,
    hostile_images,
    make_pixels,
    make_random_qwen2_vl,
    png_bytes,
    reference_answers,
    reference_ids,
)
from builder.model.gguf.convert import convert_gguf, convert_mmproj, read_gguf

pytestmark = pytest.mark.skipif(not SERVER.is_file(), reason="needs the host llama-server (make llamacpp)")
BEFORE = "<|im_start|>user\n"
AFTER = "Describe.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module", params=["2", "2.5"])
def served(request, tmp_path_factory):
    folder = make_random_qwen2_vl(tmp_path_factory.mktemp(f"qwen{request.param}-vl"), version=request.param)
    text = convert_gguf(folder, "f32", folder.parent / "model.gguf", quiet=True).path
    mmproj = convert_mmproj(folder, folder.parent / "mmproj.gguf", "f32", quiet=True)
    with llama_server(text, "--mmproj", str(mmproj), "--temp", "0") as url:
        yield folder, mmproj, url


def ask(url: str, *images: str, n: int = 8, timeout: float = 120) -> dict:
    content = [{"type": "image_url", "image_url": {"url": u}} for u in images] + [{"type": "text", "text": "Describe."}]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": n, "temperature": 0}
    return post(url + "/v1/chat/completions", body, timeout=timeout)


def status_of(url: str, *images: str) -> tuple[int, str]:
    try:
        ask(url, *images, n=1)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}").get("error", {}).get("message", "")
    return 200, ""


def test_mmproj_holds_the_vision_encoder(served):
    _, mmproj, _ = served
    info = read_gguf(mmproj)
    names = {t[0] for t in info.tensors}
    assert {"v.blk.0.attn_q.weight", "v.blk.2.attn_q.weight", "v.patch_embd.weight"} <= names
    assert {t[2] for t in info.tensors if t[0].startswith("v.blk.") and t[0].endswith("attn_q.weight")} == {"F32"}


def test_greedy_answer_with_an_image_equals_transformers(served):
    folder, _, url = served
    answers = []
    for seed, (png, want) in enumerate(reference_answers(folder, BEFORE, AFTER)):
        got = ask(url, data_url(png))["choices"][0]["message"]["content"]
        assert got == want, f"image {seed}: llama-server {got!r}, transformers {want!r}"
        answers.append(got)
    assert answers[0] != answers[1], "the image has no effect on the answer: the test would prove nothing"


def test_hostile_images_are_a_400_and_the_server_keeps_answering(served):
    _, _, url = served
    good = png_bytes(make_pixels(seed=0))
    for what, images in hostile_images(good).items():
        code, message = status_of(url, *images)
        assert code == 400, f"{what}: {code} {message}"
        if what == "50 images":
            assert "too many images" in message, message
    assert ask(url, data_url(good), n=2)["choices"][0]["message"]["content"]  # still answering


def test_a_client_that_hangs_up_leaves_the_server_answering(served):
    import socket

    _, _, url = served
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": data_url(png_bytes(make_pixels(seed=1)))}}]}], "max_tokens": 64}).encode()  # fmt: skip
    for cut in (len(body) // 2, len(body)):  # mid-body, and right after sending a whole request
        with socket.create_connection((host, int(port))) as s:
            head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            s.sendall((head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body[:cut])
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        assert r.status == 200
    assert ask(url, data_url(png_bytes(make_pixels(seed=0))), n=2)["choices"][0]["message"]["content"]


def test_a_language_model_lora_served_unmerged_answers_as_peft(served, tmp_path):
    """The adapter's GGUF LoRA over the base's text GGUF and the base's own mmproj (what the image serves for a
    LoRA on the language model) gives peft's greedy tokens with an image, and not the base's."""
    from _tiny_hf import randomize_adapter
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from builder.model.gguf.lora import convert_lora

    folder, mmproj, url = served
    base = AutoModelForImageTextToText.from_pretrained(str(folder), dtype="float32").eval()
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    randomize_adapter(pm, 5)
    pm.save_pretrained(tmp_path / "adapter")
    lora = convert_lora(tmp_path / "adapter", folder, tmp_path / "adapter.gguf", outtype="f32", quiet=True).path
    tok = AutoTokenizer.from_pretrained(str(folder))
    pixels = make_pixels(seed=0)
    want = tok.decode(reference_ids(folder, BEFORE, pixels, AFTER, n=8, model=pm.merge_and_unload().eval()))
    base_answer = ask(url, data_url(png_bytes(pixels)))["choices"][0]["message"]["content"]
    assert want != base_answer, "the LoRA does not change the answer: the test would prove nothing"
    text = folder.parent / "model.gguf"
    with llama_server(text, "--mmproj", str(mmproj), "--lora", str(lora), "--temp", "0") as lora_url:
        got = ask(lora_url, data_url(png_bytes(pixels)))["choices"][0]["message"]["content"]
    assert got == want, f"llama-server with the LoRA {got!r}, peft {want!r}"


def test_an_image_just_over_the_byte_limit_is_a_400_naming_it(served):
    """One byte over LLAMA_MEDIA_MAX_BYTES (20 MiB by default) once decoded from base64: refused before decoding,
    with the size and the limit, and the server goes on answering."""
    _, _, url = served
    good = png_bytes(make_pixels(seed=0))
    limit = 20 * 1024 * 1024
    big = good + b"\0" * (limit + 1 - len(good))  # a real PNG with trailing bytes: only the size is wrong
    code, message = status_of(url, data_url(big))
    assert code == 400, f"{code} {message}"
    assert f"image of {limit + 1} bytes is over the limit of {limit} (LLAMA_MEDIA_MAX_BYTES)" in message, message
    assert ask(url, data_url(good), n=2)["choices"][0]["message"]["content"]  # still answering
