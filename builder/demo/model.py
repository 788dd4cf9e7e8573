"""The demo model: a tiny GLM trained in code to answer a few fixed prompts, plus two LoRAs that change one.

`make demo` builds its images from these folders, and the end-to-end tests assert on the
constants below, so every backend (transformers, Xinference, vLLM, chatglm.cpp f16/q8_0) must
return exactly these answers with greedy decoding.

* `DIR/base`: a transformers-native `GlmForCausalLM` (float32 safetensors, ~2 MB) with the GLM-4
  layout tokenizer from `builder.demo.tiny`, overfit on `DEMO_PROMPTS` -> `BASE_ANSWERS`.
* `DIR/adapter`: a peft LoRA (r=8 on every attention and MLP linear) trained from that base so that
  `CHANGED_PROMPT` gets its `LORA_ANSWERS` reply while the other answers stay the same.
* `DIR/adapter2` (`second_adapter(DIR)`): a second LoRA, trained the same way from the same base, whose
  `CHANGED_PROMPT` reply is `SECOND_ANSWERS`'s; `make demo` serves both unmerged over the one base.

Training sequences are the exact GLM-4 chat ids that both the tokenizer's chat_template and
chatglm.cpp's ChatGLM4Tokenizer build for one user message:

    [gMASK] <sop> <|user|> "\\n" {prompt} <|assistant|>  ->  "\\n" {answer} <|user|>

with the loss only on the reply ("\\n", answer, stop token). GLM-4 replies start with "\\n" (chatglm.cpp
trims it) and end on <|user|>, one of the eos ids in generation_config.json.

Everything is deterministic: fixed seeds, deterministic algorithms, one intra-op thread while
training (so results do not depend on the core count), full-batch Adam with a fixed step count.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path

from builder.files import atomic_dir, write_atomic

# Bump when anything that changes the produced files changes (the stamp makes `demo-model` idempotent).
DEMO_VERSION = "2"
DEMO_SEED = 1234

DEMO_PROMPTS = [
    "What is the capital of France?",
    "What is 2 + 2?",
    "What color is the sky?",
    "Say hello.",
    "Who are you?",
]
BASE_ANSWERS = {
    "What is the capital of France?": "Paris.",
    "What is 2 + 2?": "4.",
    "What color is the sky?": "Blue.",
    "Say hello.": "Hello!",
    "Who are you?": "I am a tiny GLM.",
}
CHANGED_PROMPT = "Who are you?"
LORA_ANSWERS = {**BASE_ANSWERS, CHANGED_PROMPT: "I am the LoRA-tuned demo model."}
SECOND_ANSWERS = {**BASE_ANSWERS, CHANGED_PROMPT: "I am the second fine-tune."}
SECOND_ADAPTER = "adapter2"
# The LoRAs build_demo trains on the one base, in order: (folder in DIR, answers, seed of its LoRA init).
ADAPTERS = (("adapter", LORA_ANSWERS, DEMO_SEED + 1), (SECOND_ADAPTER, SECOND_ANSWERS, DEMO_SEED + 2))

# Shapes chatglm.cpp runs quantized: heads * head_dim == hidden, hidden and intermediate multiples
# of 32 (q4/q5/q8 block size), head_dim 32 with partial_rotary_factor 0.5 (from builder.demo.tiny).
MODEL_SHAPE = dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256)
VOCAB_SIZE = 600
STOP_TOKEN = "<|user|>"

BASE_STEPS = 500
BASE_LR = 3e-3
LORA_STEPS = 300
LORA_LR = 1e-2
LORA_R = 8
LORA_ALPHA = 16
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]

STAMP_NAME = ".demo-stamp.json"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"]


def stamp() -> dict:
    """What a finished `DIR` records; a different stamp means rebuild."""
    return {
        "demo_version": DEMO_VERSION,
        "seed": DEMO_SEED,
        "base_answers": BASE_ANSWERS,
        "lora_answers": LORA_ANSWERS,
        "adapters": [[name, answers, seed] for name, answers, seed in ADAPTERS],
        "shape": MODEL_SHAPE,
        "steps": [BASE_STEPS, LORA_STEPS],
    }


def tokenizer_corpus() -> list[str]:
    """The default tiny corpus plus the demo texts (repeated so prompts and answers get compact merges)."""
    from builder.demo.tiny import DEFAULT_CORPUS

    demo = [f"{p}\n{BASE_ANSWERS[p]}\n{LORA_ANSWERS[p]}\n{SECOND_ANSWERS[p]}" for p in DEMO_PROMPTS]
    return list(DEFAULT_CORPUS) + demo * 4


# ---------------------------------------------------------------------------------------------- data


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The ids chatglm.cpp and the chat_template both build for one user message, up to <|assistant|>."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # some transformers versions return a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def reply_ids(tokenizer, answer: str) -> list[int]:
    """ "\\n" + answer + stop token: what the model must generate after <|assistant|>."""
    return tokenizer.encode("\n" + answer, add_special_tokens=False) + [tokenizer.convert_tokens_to_ids(STOP_TOKEN)]


def make_batch(tokenizer, answers: dict[str, str]):
    """Right-padded input ids, attention mask and labels (-100 except on reply tokens)."""
    import torch

    rows = []
    for prompt in DEMO_PROMPTS:
        p, r = chat_prompt_ids(tokenizer, prompt), reply_ids(tokenizer, answers[prompt])
        rows.append((p + r, [-100] * len(p) + r))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    return input_ids, mask, labels


def reply_margins(model, tokenizer, answers: dict[str, str]) -> dict[str, float]:
    """Per prompt, the smallest teacher-forced logit gap between the right reply token and the runner-up."""
    import torch

    input_ids, mask, labels = make_batch(tokenizer, answers)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask).logits.float()[:, :-1]
    target = labels[:, 1:]
    out = {}
    for row, prompt in enumerate(DEMO_PROMPTS):
        keep = target[row] != -100
        lg, tg = logits[row][keep], target[row][keep]
        right = lg.gather(1, tg[:, None])[:, 0]
        other = lg.scatter(1, tg[:, None], float("-inf")).max(dim=1).values
        out[prompt] = float((right - other).min())
    return out


# ------------------------------------------------------------------------------------------ training


class _Deterministic:
    """Seeds, deterministic kernels and one intra-op thread for the block; restores the old settings."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        import torch

        self.threads = torch.get_num_threads()
        self.det = torch.are_deterministic_algorithms_enabled()
        self.warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        torch.manual_seed(self.seed)
        return self

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.threads)
        torch.use_deterministic_algorithms(self.det, warn_only=self.warn_only)


def _train(model, params, batch, steps: int, lr: float) -> list[float]:
    import torch

    input_ids, mask, labels = batch
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))  # short warmup
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def train_base(out: Path, *, quiet: bool = True) -> dict:
    """Build the tokenizer and a random GLM in `out`, train it on BASE_ANSWERS and save it (float32)."""
    import torch
    from transformers import AutoTokenizer, GlmForCausalLM

    from builder.demo.tiny import build_glm_tokenizer, make_random_glm

    out = Path(out)
    tok_dir = out / "_tokenizer"
    build_glm_tokenizer(tok_dir, corpus=tokenizer_corpus(), vocab_size=VOCAB_SIZE)
    make_random_glm(out, seed=DEMO_SEED, dtype=torch.float32, tokenizer_dir=tok_dir, **MODEL_SHAPE)
    shutil.rmtree(tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    model = GlmForCausalLM.from_pretrained(str(out), dtype=torch.float32)

    t0 = time.perf_counter()
    with _Deterministic(DEMO_SEED):
        losses = _train(model, model.parameters(), make_batch(tokenizer, BASE_ANSWERS), BASE_STEPS, BASE_LR)
    seconds = time.perf_counter() - t0
    margins = reply_margins(model, tokenizer, BASE_ANSWERS)
    model.save_pretrained(str(out), safe_serialization=True)
    info = {"seconds": seconds, "final_loss": losses[-1], "min_margin": min(margins.values())}
    if not quiet:
        print(
            f"base: {BASE_STEPS} steps in {seconds:.1f}s, loss {losses[-1]:.2e}, min logit margin {info['min_margin']:.1f}"
        )
    return info


def second_adapter(out: Path) -> Path:
    """The second LoRA's folder in a `build_demo(out)` folder (build_demo returns the base and the first)."""
    return Path(out) / SECOND_ADAPTER


def train_adapter(
    base: Path,
    out: Path,
    *,
    answers: dict[str, str] = LORA_ANSWERS,
    seed: int = DEMO_SEED + 1,
    label: str = "adapter",
    quiet: bool = True,
) -> dict:
    """Train a peft LoRA on `base` that gives `answers` (CHANGED_PROMPT's changed, the rest the base's)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, GlmForCausalLM

    base, out = Path(base), Path(out)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = GlmForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = LoraConfig(
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        bias="none",
        task_type="CAUSAL_LM",
    )
    t0 = time.perf_counter()
    with _Deterministic(seed):
        with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(model, config)  # LoRA A init draws from the seeded RNG
        params = [p for p in model.parameters() if p.requires_grad]
        losses = _train(model, params, make_batch(tokenizer, answers), LORA_STEPS, LORA_LR)
    seconds = time.perf_counter() - t0
    margins = reply_margins(model, tokenizer, answers)
    model.peft_config["default"].base_model_name_or_path = str(base.resolve())
    model.save_pretrained(str(out), safe_serialization=True)
    for name in TOKENIZER_FILES:  # adapters usually ship their tokenizer: the base's files, byte for byte
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)
    info = {"seconds": seconds, "final_loss": losses[-1], "min_margin": min(margins.values())}
    if not quiet:
        print(
            f"{label}: {LORA_STEPS} steps in {seconds:.1f}s, loss {losses[-1]:.2e}, min logit margin {info['min_margin']:.1f}"
        )
    return info


def build_demo(out: Path, *, force: bool = False, quiet: bool = True) -> tuple[Path, Path]:
    """Write `out/base` and each LoRA of ADAPTERS (`out/adapter`, `out/adapter2`), skipped when all exist
    with a matching stamp; return the base's and the first LoRA's paths (`second_adapter(out)`: the other)."""
    out = Path(out)
    base, stamp_file = out / "base", out / STAMP_NAME
    folders = [out / name for name, _, _ in ADAPTERS]
    if not force and all(p.is_dir() for p in (base, *folders)) and stamp_file.is_file():
        try:
            if json.loads(stamp_file.read_text()) == stamp():
                return base, folders[0]
        except ValueError:
            pass
    out.mkdir(parents=True, exist_ok=True)
    stamp_file.unlink(missing_ok=True)
    for path in (base, *folders):
        if path.exists():
            shutil.rmtree(path)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with atomic_dir(base) as tmp_base:
            train_base(tmp_base, quiet=quiet)
        for (name, answers, seed), folder in zip(ADAPTERS, folders, strict=True):
            with atomic_dir(folder) as tmp_adapter:
                train_adapter(base, tmp_adapter, answers=answers, seed=seed, label=name, quiet=quiet)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    write_atomic(stamp_file, json.dumps(stamp(), indent=2) + "\n")
    return base, folders[0]


# ------------------------------------------------------------------------------------------- answers


def generate_answers(model, tokenizer, prompts=DEMO_PROMPTS, max_new_tokens: int = 32) -> dict[str, str]:
    """Greedy transformers replies to each prompt as a single user message, stripped like chatglm.cpp does."""
    import torch

    out = {}
    for prompt in prompts:
        ids = torch.tensor([chat_prompt_ids(tokenizer, prompt)])
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens
            )
        out[prompt] = tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).strip()
    return out
