"""`builder inspect`: prints a GGML file and rejects truncated or foreign files with a clear error."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

from builder.cli import cli  # noqa: E402
from builder.demo.tiny import make_random_glm  # noqa: E402
from builder.errors import BuilderError  # noqa: E402
from builder.model.convert import convert_model  # noqa: E402
from builder.model.convert.inspect import main, read_ggml  # noqa: E402


@pytest.fixture(scope="module")
def ggml(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    return convert_model(make_random_glm(root / "glm"), quant="q4_0", out=root / "glm-q4_0.bin", quiet=True)


def test_prints_header_config_tokenizer_and_tensors(ggml, capsys):
    main(ggml)
    out = capsys.readouterr().out
    for needle in (
        "magic         ggml",
        "ChatGLM4",
        "hidden_size=64",
        "dtype=Q4_0",
        "tiktoken",
        "614 tokens",
        "transformer.output_layer.weight",
        "Q4_0",
        "17 tensors",
        "end exactly at byte",
    ):
        assert needle in out, needle
    info = read_ggml(ggml)
    assert info.tensors[-1].offset + info.tensors[-1].nbytes == ggml.stat().st_size
    assert info.config["num_key_value_heads"] == 1 and info.config["eos_token_id"] == 600


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda b: b[: len(b) // 2], "truncated"),
        (lambda b: b[:-1], "truncated"),
        (lambda b: b[:30], "truncated"),
        (lambda b: b + b"\0" * 40, "truncated"),
        (lambda b: b"GGUF" + b[4:], "not a chatglm.cpp GGML file"),
        (lambda b: b"", "not a chatglm.cpp GGML file"),
        (lambda b: b[:4] + (77).to_bytes(4, "little") + b[8:], "unknown model type"),
    ],
)
def test_bad_files_raise(ggml, tmp_path, mutate, needle):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(mutate(ggml.read_bytes()))
    with pytest.raises(BuilderError) as e:
        main(bad)
    assert needle in str(e.value)


def test_cli_exit_codes(ggml, tmp_path):
    r = CliRunner().invoke(cli, ["inspect", str(ggml)])
    assert r.exit_code == 0 and "ChatGLM4" in r.output
    (tmp_path / "x.bin").write_bytes(b"hello world, not ggml")
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "x.bin")])
    assert r.exit_code == 2 and "not a chatglm.cpp GGML file" in r.output
    r = CliRunner().invoke(cli, ["inspect", str(tmp_path / "missing.bin")])
    assert r.exit_code == 2 and "does not exist" in r.output
