"""The demo: a tiny GLM + LoRA trained in seconds (model, tiny) and `make demo` (quickstart)."""
