"""`make demo`'s step 5 without Docker: the second image's spec (both LoRAs unmerged over the one base), and
what run_demo does with it (build into build/, docker run, wait, ask each name, remove) against fakes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from builder import backends
from builder.demo import model as demo
from builder.demo import quickstart
from builder.errors import BuilderError
from builder.spec import load_spec

SERVING = [name for name in backends.DEMO if backends.get(name).serves_adapters]


@pytest.fixture
def specs(demo_dirs, monkeypatch):
    """(first spec, step 5's spec) from demo_spec_flags, the harness off (no `scripts/harness.sh bases`)."""
    out = demo_dirs[0]
    monkeypatch.setattr(quickstart, "_can_run_harness", lambda: False)
    flags = quickstart.demo_spec_flags(out)
    return load_spec(flags), load_spec(quickstart.adapters_spec_flags(flags, out))


def test_a_demo_backend_serves_adapters():
    assert SERVING, "make demo's step 5 needs a demo backend whose record serves adapters unmerged"


def test_second_image_spec(demo_dirs, second, specs):
    out = demo_dirs[0]
    first, spec = specs
    assert spec.backends == SERVING and spec.lora_mode == "serve" and spec.adapter is None
    assert spec.adapters == {"tuned": out / "adapter", "second": second}
    assert spec.name == quickstart.ADAPTERS_NAME != first.name
    assert all(spec.image(b) != first.image(b) for b in SERVING)  # the compose images stay as built
    changed = {"adapter", "adapters", "lora_mode", "backends", "name"}
    same = {k: v for k, v in first.model_dump().items() if k not in changed}
    assert {k: v for k, v in spec.model_dump().items() if k not in changed} == same  # bases, quant, options


def test_second_image_selection_serves_both(specs):
    from builder.selection import select_backends
    from builder.spec import read_model_config

    _, spec = specs
    selection = select_backends(spec, read_model_config(spec))
    assert selection.backends == SERVING
    assert all(selection.served_by(b) == spec.adapters for b in SERVING)


def test_expected_lines_three_names_three_lines(specs):
    _, spec = specs
    prompt = demo.CHANGED_PROMPT
    expected = quickstart.expected_lines(spec)
    assert expected == {
        spec.served_model_name: demo.BASE_ANSWERS[prompt],
        "tuned": demo.LORA_ANSWERS[prompt],
        "second": demo.SECOND_ANSWERS[prompt],
    }
    assert len(set(expected.values())) == 3


class FakeDocker:
    """Records every `docker` argv; `container inspect` says whether the container runs."""

    def __init__(self, running: bool = True):
        self.calls: list[tuple[tuple[str, ...], dict | None]] = []
        self.running = running

    def run(self, *args: str, check: bool = True, env: dict | None = None):
        self.calls.append((args, env))
        out = f"{str(self.running).lower()}\n" if args[:2] == ("container", "inspect") else ""
        return subprocess.CompletedProcess(args, 0, out, "")


@pytest.fixture
def step5(specs, tmp_path, monkeypatch):
    """ask_adapters with build() and the HTTP calls faked; yields (run it -> (ok, docker), what build got)."""
    import builder.image.build as build_module
    import builder.runtime.smoke as smoke

    _, spec = specs
    built_with = {}

    def fake_build(spec, workdir, env_file, docker):
        built_with.update(workdir=workdir, env_file=env_file)
        return [build_module.Built(b, spec.image(b), "0" * 12, 1.0, 1.0) for b in SERVING]

    models = [{"id": name, "status": {"value": "loaded"}} for name in quickstart.expected_lines(spec)]
    monkeypatch.setattr(build_module, "build", fake_build)
    monkeypatch.setattr(smoke, "request_json", lambda url, path, **kw: {"data": models})
    monkeypatch.setattr(quickstart.time, "sleep", lambda s: None)

    def run(answers: dict[str, str], docker: FakeDocker | None = None):
        monkeypatch.setattr(smoke, "chat", lambda url, name, prompt, **kw: answers[name])
        docker = docker or FakeDocker()
        return quickstart.ask_adapters(docker, spec, {spec.api_key_env: "sk-demo"}), docker

    return run, built_with, spec


def test_step5_runs_asks_and_removes(step5):
    run, built_with, spec = step5
    ok, docker = run(quickstart.expected_lines(spec))
    assert ok
    assert built_with["workdir"] == quickstart.REPO / "build"
    assert built_with["env_file"] != quickstart.REPO / ".env" and built_with["env_file"].parent == built_with["workdir"]
    (record,) = [backends.get(b) for b in SERVING]
    (args, env), *_ = [c for c in docker.calls if c[0][0] == "run"]
    assert args[:4] == ("run", "-d", "--name", f"{spec.name}-{record.name}") and args[-1] == spec.image(record.name)
    port = args[args.index("-p") + 1]
    assert port.startswith("127.0.0.1:") and port.endswith(f":{record.port}")
    assert args[args.index("-e") + 1] == record.api_key_var and env == {record.api_key_var: "sk-demo"}
    assert "sk-demo" not in " ".join(args)  # the key goes through the environment, not the argv
    assert docker.calls[-1][0] == ("rm", "-f", f"{spec.name}-{record.name}")


def test_step5_a_wrong_line_fails(step5):
    run, _, spec = step5
    answers = {**quickstart.expected_lines(spec), "second": demo.LORA_ANSWERS[demo.CHANGED_PROMPT]}
    ok, docker = run(answers)
    assert not ok
    assert docker.calls[-1][0][:2] == ("rm", "-f")


def test_step5_a_stopped_container_fails_fast_and_is_removed(step5, monkeypatch):
    import builder.runtime.smoke as smoke

    def refused(*args, **kw):
        raise smoke.SmokeError("GET /v1/models: cannot connect")

    run, _, spec = step5
    monkeypatch.setattr(smoke, "request_json", refused)
    docker = FakeDocker(running=False)
    with pytest.raises(BuilderError, match="stopped"):
        run(quickstart.expected_lines(spec), docker)
    assert [c[0][0] for c in docker.calls[-2:]] == ["logs", "rm"]


def test_run_demo_numbers_five_steps():
    source = Path(quickstart.__file__).read_text()
    assert [f"{n}/5" in source for n in range(1, 6)] == [True] * 5 and "/4 " not in source


def test_the_vllm_cpu_demo_serves_both_loras_on_vllms_cpu_variant(demo_dirs, second, monkeypatch):
    """`make demo-vllm-cpu`: vLLM alone, its CPU variant, both LoRAs unmerged, float32; the same three lines."""
    from builder.selection import select_backends
    from builder.spec import read_model_config

    out = demo_dirs[0]
    monkeypatch.setattr(quickstart, "_can_run_harness", lambda: False)
    spec = load_spec(quickstart.vllm_cpu_spec_flags(out))
    record = backends.get("vllm")
    assert spec.backends == ["vllm"] and record.cpu_variant_of_gpu(spec) and record.device_for(spec) == "cpu"
    assert spec.adapters == {"tuned": out / "adapter", "second": second} and spec.lora_mode == "serve"
    assert select_backends(spec, read_model_config(spec)).served_by("vllm") == spec.adapters
    assert quickstart.expected_lines(spec) == {
        spec.served_model_name: demo.BASE_ANSWERS[demo.CHANGED_PROMPT],
        "tuned": demo.LORA_ANSWERS[demo.CHANGED_PROMPT],
        "second": demo.SECOND_ANSWERS[demo.CHANGED_PROMPT],
    }
