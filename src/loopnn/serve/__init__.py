"""`loopnn serve`: an OpenAI-compatible completions server for looped models (docs/serve.md).

engine.py (continuous batching on one model thread) and batch.py need only torch; app.py needs the `serve` extra
(starlette, uvicorn). protocol.py validates requests.
"""
