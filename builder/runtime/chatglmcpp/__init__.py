"""The chatglm.cpp runtime: an OpenAI-compatible server and a terminal chat over chatglm_cpp.Pipeline.

engine (Pipeline, decoding, stop strings) -> worker (where generations run) -> routes (HTTP
handlers, one collect/SSE path) -> app (FastAPI, auth, errors; `serve`); settings, protocol, chat.
Why not the bundled `chatglm_cpp.openai_api`: it has no /health, never sends `data: [DONE]`, treats
`max_tokens` as the total length, and crashes on the broken UTF-8 that small models emit.
"""
