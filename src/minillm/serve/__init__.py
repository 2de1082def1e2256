"""Serving: an OpenAI-compatible HTTP API over continuous batching (`minillm serve`).

engine.py (the decode loop over a batched KV cache), jobs.py (a request's sequences and its
OpenAI response), app.py (the HTTP endpoints), server.py (uvicorn), text.py (ids -> text deltas),
schemas.py (request bodies, error bodies), static/index.html (the web chat page)."""
