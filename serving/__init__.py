"""Serving a Qwen3 checkpoint: an OpenAI-compatible HTTP API and a web page (FastAPI + uvicorn).

Modules: `served_model` (load the directory `trainer.run_layout` found and checked), `engine`
(the generation worker), `schemas` / `errors` / `completions` / `app` (the HTTP side),
`access` (the API key and the body limit), `openapi` (the schema as the server answers),
`text_stream` (token ids to text deltas with stop sequences), `static/` (the page). Import the
module you need; this package file stays empty.
"""
