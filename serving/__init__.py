"""Serving a Qwen3 checkpoint: an OpenAI-compatible HTTP API and a web page (FastAPI + uvicorn).

Modules: `checkpoint` (find and check the directory), `served_model` (load it), `engine` (the
generation worker), `schemas` / `errors` / `completions` / `app` (the HTTP side), `text_stream`
(token ids to text deltas with stop sequences), `static/` (the page). Import the module you
need; this package file stays empty so `serve.py` can report a bad checkpoint before torch loads.
"""
