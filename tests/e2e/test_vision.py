"""A vision-language fine-tune served for real: a tiny random Qwen2-VL built into the llama.cpp image (text GGUF
and mmproj at f32, so the answers can be checked token for token), started with its compose render, and asked
with the official openai client with images as `data:` URLs: the answer equals transformers' greedy answer for
each of two images (which differ: the image reaches the model); hostile images (not an image, truncated, a
20000 x 20000 decompression bomb, http and file URLs, 50 images in one message) are each a 400, and the server
keeps answering.

vLLM is not exercised with images here: its Qwen2-VL processor needs torchvision, and PyPI's torchvision is a
CUDA build that breaks vLLM's CPU start-up (docs/vision-language.md).
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from builder.demo.tiny_vision import data_url
from builder.image.build import build
from builder.spec import load_spec

openai = pytest.importorskip("openai")
pytest.importorskip("transformers")

from conftest import REPO, docker  # noqa: E402

pytestmark = pytest.mark.e2e

NAME, API_KEY, PORT, PROJECT = "e2e-vision", "e2e-vision-key", 18220, "e2e-vision"
SPEC = REPO / "tests" / "e2e" / "local-bases.yaml"
BEFORE = "<|im_start|>user\n"
AFTER = "Describe.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def served(docker_engine, local_bases, tmp_path_factory):
    from builder.demo.tiny_vision import make_random_qwen2_vl

    tmp = tmp_path_factory.mktemp("vision")
    folder = make_random_qwen2_vl(tmp / "qwen2-vl", version="2")
    spec = load_spec({"model": str(folder), "backends": "llamacpp", "quant": "f32", "quality": "off",
                      "spec_file": SPEC, "name": NAME, "tag": "e2e"})  # fmt: skip
    build(spec, workdir=tmp / "build", env_file=tmp / "vision.env")
    env = {**os.environ, "LLAMACPP_PORT": str(PORT), "API_KEY": API_KEY}
    argv = ["/usr/bin/docker", "compose", "-p", PROJECT, "--env-file", str(tmp / "vision.env"),
            "-f", str(tmp / "build" / NAME / "compose.yaml")]  # fmt: skip
    compose = lambda *a, **kw: subprocess.run([*argv, *a], capture_output=True, text=True, env=env, **kw)  # noqa: E731
    compose("down", "-v", "--remove-orphans")
    up = compose("up", "-d", "--wait", "--wait-timeout", "300", "llamacpp", timeout=400)
    try:
        if up.returncode != 0:
            logs = compose("logs", "--tail", "60", "llamacpp").stdout
            pytest.fail(f"compose up failed:\n{up.stdout}{up.stderr}\n{logs[-5000:]}", pytrace=False)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        yield {"client": client, "folder": folder, "name": spec.served_model_name}
    finally:
        compose("down", "-v", "--remove-orphans")
        docker("rmi", "-f", spec.image("llamacpp"), check=False)


def _ask(served, *images: str, n: int = 8) -> str:
    content = [{"type": "image_url", "image_url": {"url": u}} for u in images] + [{"type": "text", "text": "Describe."}]
    out = served["client"].chat.completions.create(
        model=served["name"], messages=[{"role": "user", "content": content}], max_tokens=n, temperature=0
    )
    return out.choices[0].message.content


def test_each_image_gets_transformers_greedy_answer(served):
    from builder.demo.tiny_vision import reference_answers

    answers = []
    for seed, (png, want) in enumerate(reference_answers(served["folder"], BEFORE, AFTER)):
        got = _ask(served, data_url(png))
        assert got == want, f"image {seed}: the image's server {got!r}, transformers {want!r}"
        answers.append(got)
    assert answers[0] != answers[1], "the image has no effect on the answer: the check would prove nothing"


def test_hostile_images_are_a_400_and_it_keeps_answering(served):
    from builder.demo.tiny_vision import hostile_images, make_pixels, png_bytes

    good = png_bytes(make_pixels(seed=0))
    for what, images in hostile_images(good).items():
        start = time.monotonic()
        with pytest.raises(openai.BadRequestError):
            _ask(served, *images, n=1)
        assert time.monotonic() - start < 60, what
    assert _ask(served, data_url(good), n=2)
