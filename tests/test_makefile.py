"""The Makefile hands Make variables to the builder as single values: nothing inside one runs.

Each case runs the real `make spec` (what `make image` resolves before any Docker work) with a
hostile or awkward value, as a user or a CI job driven by a branch name or form field would.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def make(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "spec", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "my model"  # a space in the path, as on many desktops
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    return folder


@pytest.mark.parametrize("variable", ["MODEL", "TAG", "NAME", "ADAPTER", "REGISTRY", "QUANT", "BACKEND"])
@pytest.mark.parametrize(
    "template",
    [
        "x; touch {marker}",
        "$(touch {marker})",
        "$(shell touch {marker})",
        "${{shell touch {marker}}}",
        "`touch {marker}`",
        "x' && touch {marker} && echo '",
        'x" && touch {marker} && echo "',
        "x\n touch {marker}",
    ],
)
def test_hostile_values_are_refused_and_never_run(tmp_path, model_dir, variable, template):
    marker = tmp_path / "pwned"
    value = template.format(marker=marker)
    args = {"MODEL": str(model_dir), "BACKEND": "xinference", variable: value}
    res = make(*(f"{k}={v}" for k, v in args.items()))
    assert not marker.exists(), f"{variable}={value!r} ran a command"
    assert res.returncode != 0, res.stdout
    assert "Traceback" not in res.stderr
    field = {"BACKEND": "backends"}.get(variable, variable.lower())
    assert field in res.stderr, res.stderr


def test_values_arrive_intact(model_dir, tmp_path):
    adapter = tmp_path / "lora, v2 (final)"  # parentheses are refused by the spec, so: a refusal
    adapter.mkdir()
    res = make(
        f"MODEL={model_dir}", "BACKEND=xinference", "TAG=v1.2_rc-3", "NAME=acme/llm", "REGISTRY=127.0.0.1:5000/ns"
    )
    assert res.returncode == 0, res.stderr
    spec = yaml.safe_load(res.stdout)
    assert spec["model"] == str(model_dir)  # the space survived
    assert (spec["tag"], spec["name"], spec["registry"]) == ("v1.2_rc-3", "acme/llm", "127.0.0.1:5000/ns")
    assert spec["backends"] == ["xinference"]
    res = make(f"MODEL={model_dir}", f"ADAPTER={adapter}", "BACKEND=xinference")
    assert res.returncode == 2 and "adapter" in res.stderr and not any(tmp_path.glob("*pwned*"))


def test_unset_variables_leave_the_spec_file_in_charge(model_dir, tmp_path):
    spec_file = tmp_path / "build.yaml"
    spec_file.write_text(f"model: {model_dir}\ntag: from-file\nbackends: [xinference]\n")
    res = make(f"SPEC={spec_file}")
    assert res.returncode == 0, res.stderr
    assert yaml.safe_load(res.stdout)["tag"] == "from-file"
    res = make(f"SPEC={spec_file}", "TAG=from-make")
    assert yaml.safe_load(res.stdout)["tag"] == "from-make"


@pytest.mark.parametrize(
    ("variable", "value"), [("QUALITY_MIN_TOP1", "0.9; touch {marker}"), ("EVAL", "$(touch {marker})")]
)
def test_quality_variables_are_refused_and_never_run(tmp_path, model_dir, variable, value):
    marker = tmp_path / "pwned"
    res = make(f"MODEL={model_dir}", "BACKEND=llamacpp", f"{variable}={value.format(marker=marker)}")
    assert not marker.exists() and res.returncode != 0 and "Traceback" not in res.stderr
    field = {"EVAL": "quality_eval"}.get(variable, variable.lower())
    assert field in res.stderr or f"BUILDER_{variable}" in res.stderr, res.stderr  # the spec's or click's refusal


def test_quality_variables_arrive(model_dir, tmp_path):
    eval_file = tmp_path / "eval prompts.jsonl"
    eval_file.write_text('{"query": "2+2?", "response": "4"}\n')
    res = make(f"MODEL={model_dir}", "BACKEND=llamacpp", "QUALITY=off", "QUALITY_MIN_TOP1=0.85", f"EVAL={eval_file}")
    assert res.returncode == 0, res.stderr
    spec = yaml.safe_load(res.stdout)
    assert (spec["quality"], spec["quality_min_top1"], spec["quality_eval"]) == ("off", 0.85, str(eval_file))


def dry_run(tmp_path: Path, *args: str) -> str:
    """`make -n` on a machine where nothing is set up yet (every venv and cache under tmp_path)."""
    where = [f"VENV={tmp_path}/venv", f"XINFERENCE_VENV={tmp_path}/xinference", f"XLLAMACPP_DIR={tmp_path}/xllamacpp"]
    res = subprocess.run(["make", "-n", *args, *where], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_make_test_sets_up_its_three_chains_side_by_side(tmp_path):
    out = dry_run(tmp_path, "test")
    assert "-j3 --output-sync=line test-setup" in out
    for step in (".[test]'", "xinference==4.1.0", "builder.model.gguf.llamacpp host", "xllamacpp=="):
        assert step in out, step
    assert out.index("xinference==4.1.0") < out.index("xllamacpp==")  # xllamacpp installs with that venv's pip
    assert "-j1 --output-sync=line test-setup" in dry_run(tmp_path, "test", "SETUP_JOBS=1")


def test_llamacpp_compile_waits_only_for_the_bare_venv(tmp_path):
    out = dry_run(tmp_path, "llamacpp")
    assert f"-m venv {tmp_path}/venv" in out and "builder.model.gguf.llamacpp host" in out
    assert "pip install" not in out


def test_demo_installs_the_build_extra_only(tmp_path):
    out = dry_run(tmp_path, "demo")
    assert "-e '.[build]'" in out and ".[test]" not in out and "-m builder demo" in out
