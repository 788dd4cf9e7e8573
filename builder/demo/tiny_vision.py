"""Tiny, random Qwen2-VL and Qwen2.5-VL folders built in code, with what a real one carries beside its weights:
a ChatML tokenizer with the vision tokens (one llama.cpp's converter accepts), a preprocessor_config.json that
matches the vision config, and images to ask about.

`make_random_qwen2_vl(out, version="2" | "2.5")` saves the folder; `make_pixels` and `png_bytes` make an image
(zlib only); `pixel_inputs(pixels)` does the image
processor's steps (rescale, normalize, temporal copy, patches in merge order) without transformers' processor
class, which needs torchvision; `reference_ids` is transformers' greedy answer with M-RoPE positions. Images
are multiples of 28 pixels a side (no resize on either side) and give at least 8 image tokens (llama.cpp
upscales smaller ones). The vision tower has 3 blocks or more: the converter maps `merger.mlp.2` through a
block index.
"""

from __future__ import annotations

import base64
import json
import struct
import zlib
from pathlib import Path

from builder.demo.tiny import QWEN2_PAT_STR, _randomized, build_bpe_tokenizer

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *VISION_TOKENS]
# OpenAI CLIP's mean and std: what Qwen2-VL's preprocessor_config.json carries
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]
PATCH, MERGE, TEMPORAL = 14, 2, 2
IMAGE_GAIN = 8.0  # the projector's output layer, scaled after the random init
# ChatML with OpenAI content parts: an image part becomes the vision tokens, as Qwen2-VL's own template does.
VL_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' or p['type'] == 'image_url' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_random_qwen2_vl(out_dir: Path, *, version: str = "2", seed: int = 0, depth: int = 3) -> Path:
    """Save a random Qwen2-VL (`version` "2") or Qwen2.5-VL ("2.5") with its tokenizer and preprocessor config."""
    from transformers import GenerationConfig

    out_dir = Path(out_dir)
    tok = build_bpe_tokenizer(out_dir, QWEN2_PAT_STR, SPECIAL_TOKENS, eos="<|im_end|>", chat_template=VL_CHAT_TEMPLATE)
    ids = dict(zip(SPECIAL_TOKENS, tok.convert_tokens_to_ids(SPECIAL_TOKENS), strict=True))
    end, im_end = ids["<|endoftext|>"], ids["<|im_end|>"]
    text = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=end, eos_token_id=im_end, pad_token_id=end,
    )  # fmt: skip
    common = dict(depth=depth, num_heads=4, in_channels=3, patch_size=PATCH, spatial_merge_size=MERGE,
                  temporal_patch_size=TEMPORAL)  # fmt: skip
    if version == "2":
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model

        vision = dict(common, embed_dim=32, hidden_size=64, mlp_ratio=2)
        arch = "Qwen2VLForConditionalGeneration"
    elif version == "2.5":
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model

        vision = dict(common, hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=56,
                      fullatt_block_indexes=list(range(1, depth, 2)) or [0])  # fmt: skip
        arch = "Qwen2_5_VLForConditionalGeneration"
    else:
        raise ValueError(f"version {version!r}: 2 or 2.5")
    config = Config(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )  # fmt: skip
    config.architectures = [arch]
    model = _randomized(Model, config, seed)
    import torch

    with torch.no_grad():  # image embeddings well above the text ones': each image steers the answer
        model.model.visual.merger.mlp[2].weight.mul_(IMAGE_GAIN)
    model.generation_config = GenerationConfig(bos_token_id=None, eos_token_id=[im_end, end], pad_token_id=end)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    processor = {
        "image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": IMAGE_MEAN, "image_std": IMAGE_STD,
        "do_convert_rgb": True, "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280, "patch_size": PATCH,
        "temporal_patch_size": TEMPORAL, "merge_size": MERGE,
    }  # fmt: skip
    (out_dir / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return out_dir


def png_bytes(pixels) -> bytes:
    """An RGB (h, w, 3) or grey (h, w) uint8 array as PNG (zlib only: no imaging library needed)."""
    import numpy as np

    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    height, width = pixels.shape[:2]
    colour = 2 if pixels.ndim == 3 else 0
    rows = np.concatenate([np.zeros((height, 1), np.uint8), pixels.reshape(height, -1)], axis=1)
    return png_header(width, height, colour) + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + _chunk(b"IEND", b"")


def png_header(width: int, height: int, colour: int = 2) -> bytes:
    """The PNG signature and IHDR chunk of a width x height 8-bit image (colour 2: RGB, 0: grey)."""
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def data_url(png: bytes) -> str:
    """An OpenAI `image_url` for PNG bytes, inline (no server-side fetch)."""
    return "data:image/png;base64," + base64.b64encode(png).decode()


def bomb_png(side: int = 20000) -> bytes:
    """A real side x side grey PNG of zeros: 400 MB of pixels at 20000 a side, in a few hundred KB of file."""
    z = zlib.compressobj(9)
    data = b"".join(z.compress(b"\x00" * (side + 1)) for _ in range(side)) + z.flush()
    return png_header(side, side, 0) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def hostile_images(good_png: bytes) -> dict[str, list[str]]:
    """{what: the image URLs of one message} a vision server must refuse with a 400 and survive."""
    return {
        "not an image": [data_url(b"this is not a picture at all" * 10)],
        "truncated": [data_url(good_png[: len(good_png) // 2])],
        "20000x20000 bomb": [data_url(bomb_png())],
        "http URL": ["http://127.0.0.1:9/cat.png"],
        "file URL": ["file:///etc/passwd"],
        "50 images": [data_url(good_png)] * 50,
    }


def make_pixels(width: int = 112, height: int = 84, seed: int = 0):
    """Random 14-pixel blocks, RGB uint8 (sides multiples of 28: no resize; 112 x 84 gives 12 image tokens)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(height // PATCH, width // PATCH, 3), dtype=np.uint8)
    return np.kron(blocks, np.ones((PATCH, PATCH, 1), dtype=np.uint8))


def pixel_inputs(pixels):
    """(pixel_values, image_grid_thw) of one RGB uint8 image, as Qwen2VLImageProcessor makes them for a size
    that needs no resize: rescaled, normalized, copied to the temporal patch size, patches in merge order."""
    import numpy as np
    import torch

    img = np.asarray(pixels, dtype=np.float32) / 255.0
    height, width = img.shape[:2]
    if height % (PATCH * MERGE) or width % (PATCH * MERGE):
        raise ValueError(f"{width}x{height} is not a multiple of {PATCH * MERGE} a side")
    img = ((img - np.array(IMAGE_MEAN, dtype=np.float32)) / np.array(IMAGE_STD, dtype=np.float32)).transpose(2, 0, 1)
    patches = np.stack([img] * TEMPORAL)  # (T, C, H, W)
    gh, gw = height // PATCH, width // PATCH
    patches = patches.reshape(1, TEMPORAL, 3, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = patches.reshape(gh * gw, 3 * TEMPORAL * PATCH * PATCH)
    return torch.from_numpy(np.ascontiguousarray(flat)), torch.tensor([[1, gh, gw]])


def image_tokens(grid_thw) -> int:
    """How many image tokens (after the 2x2 merge) an image of grid (t, h, w) becomes."""
    t, h, w = (int(x) for x in grid_thw[0])
    return t * h * w // (MERGE * MERGE)


def reference_ids(folder: Path, prompt_before: str, pixels, prompt_after: str, n: int = 8, model=None):
    """transformers' greedy continuation (token ids) of `prompt_before` + the image + `prompt_after` (text with
    the chat template already applied), with M-RoPE positions (mm_token_type_ids) as the processor gives them."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = model or AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    pixel_values, grid = pixel_inputs(pixels)
    vision = "<|vision_start|>" + "<|image_pad|>" * image_tokens(grid) + "<|vision_end|>"
    ids = tok(prompt_before + vision + prompt_after, return_tensors="pt", add_special_tokens=False).input_ids
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values, image_grid_thw=grid,
            mm_token_type_ids=(ids == pad).int(), max_new_tokens=n, do_sample=False, eos_token_id=None,
        )  # fmt: skip
    return out[0, ids.shape[1] :].tolist()


def reference_answers(folder: Path, prompt_before: str, prompt_after: str, seeds=(0, 1), n: int = 8):
    """[(PNG bytes, transformers' greedy answer text)] for make_pixels(seed) of each seed: what a server that
    serves `folder` must answer to that image between the two prompt halves."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    answers = []
    for seed in seeds:
        pixels = make_pixels(seed=seed)
        ids = reference_ids(folder, prompt_before, pixels, prompt_after, n=n, model=model)
        answers.append((png_bytes(pixels), tok.decode(ids)))
    return answers
