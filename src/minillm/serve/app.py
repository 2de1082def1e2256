"""The OpenAI-compatible HTTP API (Starlette): GET /v1/models, POST /v1/completions and
/v1/chat/completions (stream or not), GET /health, and the web chat page at /.

Each model is one Engine (minillm.serve.engine: continuous batching in a thread of its own); a
request becomes a Job (minillm.serve.jobs) whose sequences join that engine's batch. Limits: a
body size cap (413), the engines' queue cap (429), an optional API key (401); every error is an
OpenAI error body (minillm.serve.schemas.APIError).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from minillm.serve.engine import Engine, QueueFull
from minillm.serve.jobs import Job
from minillm.serve.schemas import APIError, ChatRequest, CompletionRequest, parse
from minillm.serve.server import run_in_thread
from minillm.tokenizer import chat as template
from minillm.tokenizer.stream import special_ids
from minillm.torch.sft import load_for_inference

__all__ = ["create_app", "run_in_thread"]
PAGE = Path(__file__).parent / "static" / "index.html"
PLACEHOLDER = "<!doctype html><title>minillm</title><p>minillm server: the API is at /v1 (no web page yet)."


def load_engines(runs: dict[str, str] | list[str], max_batch: int, max_queue: int, prefill_chunk: int,
                 adapters: dict[str, str] | None = None) -> dict[str, Engine]:
    """model id -> Engine. A list of run directories is named by the directories' names; adapters
    (model id -> LoRA adapter directory) are merged in as `minillm sample --adapter` does."""
    if not isinstance(runs, dict):
        names = [Path(r).name for r in runs]
        if len(set(names)) != len(names):
            raise ValueError(f"two runs have the same directory name in {list(runs)}; name them (NAME=DIR)")
        runs = dict(zip(names, runs))
    unknown = set(adapters or {}) - set(runs)
    if unknown:
        raise ValueError(f"adapters for models this server does not have: {sorted(unknown)}; "
                         f"it has {list(runs)}")
    engines = {}
    for name, run in runs.items():
        model, tokenizer = load_for_inference(run, (adapters or {}).get(name))
        if tokenizer is None:
            raise ValueError(f"run directory {run} has no tokenizer.json; serving text needs one")
        engines[name] = Engine(model, tokenizer, max_batch, max_queue, prefill_chunk)
    return engines


def create_app(runs: dict[str, str] | list[str], *, max_batch: int = 8, api_key: str | None = None,
               max_queue: int = 64, max_body_bytes: int = 1 << 20, prefill_chunk: int = 64,
               adapters: dict[str, str] | None = None) -> Starlette:
    """The ASGI app serving these runs (model id -> run directory, or a list of directories).
    max_batch: rows of each model's batch; max_queue: sequences waiting for a row before 429;
    prefill_chunk: prompt tokens per step; adapters: model id -> LoRA adapter to merge in."""
    engines = load_engines(runs, max_batch, max_queue, prefill_chunk, adapters)
    api = API(engines, api_key, max_body_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        for e in engines.values():
            e.start()
        yield
        for e in engines.values():
            await asyncio.to_thread(e.close)

    routes = [Route("/", api.page), Route("/health", api.health), Route("/v1/models", api.models),
              Route("/v1/models/{model:path}", api.model),
              Route("/v1/completions", api.completions, methods=["POST"]),
              Route("/v1/chat/completions", api.chat_completions, methods=["POST"])]
    handlers = {APIError: api.error, HTTPException: api.http_error, Exception: api.internal_error}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.state.engines = engines
    return app


class API:
    """The endpoints, over engines: model id -> Engine."""

    def __init__(self, engines: dict[str, Engine], api_key: str | None, max_body_bytes: int):
        self.engines, self.api_key, self.max_body_bytes = engines, api_key, max_body_bytes
        self.created = int(time.time())

    # --- errors and checks ------------------------------------------------------------------------
    async def error(self, request: Request, e: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    async def http_error(self, request: Request, e: HTTPException) -> JSONResponse:
        return await self.error(request, APIError(e.status_code, f"{request.method} {request.url.path}: "
                                                                 f"{e.detail}"))

    async def internal_error(self, request: Request, e: Exception) -> JSONResponse:
        """A bug, not the client's fault: an OpenAI 500 body (the traceback goes to the server's log)."""
        return await self.error(request, APIError(500, f"internal server error: {type(e).__name__}: {e}"))

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    async def read_json(self, request: Request) -> object:
        """The body as JSON, refusing bodies over max_body_bytes before reading them whole."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise APIError(413, f"request body of {declared} bytes is over the limit of "
                                f"{self.max_body_bytes}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                raise APIError(413, f"request body is over the limit of {self.max_body_bytes} bytes")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None

    def engine(self, model: str) -> Engine:
        if model not in self.engines:
            raise APIError(404, f"the model {model!r} does not exist; this server has {list(self.engines)}",
                           "model", "model_not_found")
        return self.engines[model]

    # --- endpoints ----------------------------------------------------------------------------------
    async def page(self, request: Request):
        return FileResponse(PAGE) if PAGE.is_file() else HTMLResponse(PLACEHOLDER)

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "models": {n: e.stats() for n, e in self.engines.items()}})

    def describe(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "minillm",
                "max_seq_len": self.engines[name].max_len}

    async def models(self, request: Request) -> JSONResponse:
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [self.describe(n) for n in self.engines]})

    async def model(self, request: Request) -> JSONResponse:
        self.authorize(request)
        name = request.path_params["model"]
        self.engine(name)  # 404 unless served
        return JSONResponse(self.describe(name))

    async def completions(self, request: Request):
        self.authorize(request)
        req = parse(CompletionRequest, await self.read_json(request))
        engine = self.engine(req.model)
        tokenizer = engine.tokenizer
        if isinstance(req.prompt, str):
            prompt = _tokenize(lambda: tokenizer.encode(req.prompt) or special_ids(tokenizer, "bos"),
                               "prompt")
        else:
            prompt = req.prompt
            if any(not 0 <= t < tokenizer.vocab_size for t in prompt):
                raise APIError(400, f"prompt: token ids must be in [0, {tokenizer.vocab_size})", "prompt")
        return await self.run(request, engine, req, prompt, req.max_tokens, special_ids(tokenizer, "eos"),
                              req.stop_strings(), chat=False)

    async def chat_completions(self, request: Request):
        self.authorize(request)
        req = parse(ChatRequest, await self.read_json(request))
        engine = self.engine(req.model)
        messages = [m.as_template_message() for m in req.messages]
        prompt = _tokenize(lambda: template.render(engine.tokenizer, messages, add_generation_prompt=True),
                           "messages")
        stop_strings = template.stop_strings(engine.tokenizer) + req.stop_strings()
        return await self.run(request, engine, req, prompt, req.max_completion_tokens or req.max_tokens,
                              template.stop_token_ids(engine.tokenizer), stop_strings, chat=True)

    async def run(self, request: Request, engine: Engine, req, prompt: list[int], max_tokens: int | None,
                  stop_token_ids: list[int], stop_strings: list[str], chat: bool):
        """Queue the request's sequences; answer with SSE chunks or, once done, one JSON body.
        Generation stops at the context: max_tokens is cut to the room the prompt leaves."""
        if not prompt:
            raise APIError(400, "prompt: empty, and the tokenizer has no bos token to start from", "prompt")
        room = engine.max_len - len(prompt)
        if room < 1:
            raise APIError(400, f"the prompt is {len(prompt)} tokens; the model's context is "
                                f"{engine.max_len} tokens, so it leaves no room for a reply",
                           "messages" if chat else "prompt", "context_length_exceeded")
        if req.n > engine.max_batch:
            raise APIError(400, f"n: at most {engine.max_batch} (the server's --max-batch), got {req.n}", "n")
        job = Job(engine, req.model, prompt, req, min(max_tokens or room, room), stop_token_ids, stop_strings,
                  chat, req.logprobs_k())
        try:
            engine.submit(job.seqs)
        except QueueFull as e:
            raise APIError(429, f"the server is busy ({e}); retry later", code="queue_full") from None
        if req.stream:
            return StreamingResponse(job.sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(await self.until_disconnect(request, job))

    async def until_disconnect(self, request: Request, job: Job) -> dict:
        """job.response(), cancelled (its rows freed) if the client disconnects first (then the
        empty body goes nowhere)."""
        answer = asyncio.ensure_future(job.response())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not answer.done():
                answer.cancel()
                job.engine.cancel(job.seqs)
        return {} if answer.cancelled() else answer.result()


def _tokenize(encode, param: str) -> list[int]:
    """encode() -> ids; text the tokenizer cannot encode (a character a char model never saw) is a 400."""
    try:
        return encode()
    except ValueError as e:
        raise APIError(400, f"{param}: {e}", param) from None


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is already read: the next message is the end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
