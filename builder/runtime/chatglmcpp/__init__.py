"""The chatglm.cpp runtime: an OpenAI-compatible server and a terminal chat over chatglm_cpp.Pipeline.

engine (Pipeline, decoding, stop strings; runs in its own process: engine_process) -> scheduler
(admission, queue, cancellation, restarts, on the event loop) -> routes (HTTP handlers, one
collect/SSE path) -> app (FastAPI, errors, API key, body limit, metrics; `serve`) over connection
(uvicorn's protocol with a header timeout); settings, protocol, metrics, chat.
Why not the bundled `chatglm_cpp.openai_api`: it has no /health, never sends `data: [DONE]`, treats
`max_tokens` as the total length, and crashes on the broken UTF-8 that small models emit.
"""
