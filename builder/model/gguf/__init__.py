"""GGUF for llama.cpp: the pinned source and its build (llamacpp.py), conversion (convert.py), the
converter's guards (hf_to_gguf.py) and ChatGLM originals (originals.py)."""
