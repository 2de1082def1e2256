"""One HTTP request's generation: its n sequences in an Engine, their events on an asyncio queue,
and the OpenAI response built from them (one JSON body, or server-sent event chunks)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator

from minillm.serve.engine import Engine, GenSequence
from minillm.serve.schemas import APIError
from minillm.tokenizer.stream import TextDeltas
from minillm.torch.sampling import SamplingConfig


class Job:
    """The n choices of one request. chat: the chat format (messages, deltas) or the completions one."""

    def __init__(self, engine: Engine, model_id: str, prompt: list[int], req, max_tokens: int,
                 stop_token_ids: list[int], stop_strings: list[str], chat: bool, logprobs: int | None = None):
        self.engine, self.model_id, self.chat, self.prompt = engine, model_id, chat, prompt
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)
        try:
            sampling = SamplingConfig(req.temperature, top_p=None if req.top_p >= 1.0 else req.top_p)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        # choice i is seeded with seed + i (as `minillm sample --num-samples`): n different answers
        self.seqs = [GenSequence(prompt, max_tokens, sampling, self._emitter(i), stop_token_ids,
                                 TextDeltas(engine.tokenizer, stop_strings),
                                 None if req.seed is None else req.seed + i, logprobs)
                     for i in range(req.n)]
        self.logprobs = logprobs

    def _emitter(self, index: int):
        def emit(kind: str, payload) -> None:  # called from the engine's thread
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, kind, payload))
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass
        return emit

    def usage(self) -> dict:
        completion = sum(s.generated for s in self.seqs)
        return {"prompt_tokens": len(self.prompt), "completion_tokens": completion,
                "total_tokens": len(self.prompt) + completion}

    async def events(self) -> AsyncIterator[tuple[int, str, object]]:
        """(choice index, "delta" | "finish", payload) until every choice has finished."""
        left = len(self.seqs)
        while left:
            index, kind, payload = await self.queue.get()
            if kind == "finish":
                left -= 1
                if str(payload).startswith("error"):
                    raise APIError(500, f"generation failed: {payload}")
            yield index, kind, payload

    # --- the response bodies --------------------------------------------------------------------
    def _choice(self, index: int, text: str | None, finish: str | None, stream: bool,
                logprobs: list | None = None) -> dict:
        """One choice; logprobs: [(token id, logprob, [(id, logprob)] top, text offset)] of its tokens."""
        logprobs = None if self.logprobs is None or logprobs is None else self._logprobs(logprobs)
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        key = "delta" if stream else "message"
        if text is None:  # the last chunk of a stream carries only the finish reason
            message = {}
        else:
            message = {"content": text} if stream else {"role": "assistant", "content": text}
        return {"index": index, key: message, "logprobs": logprobs, "finish_reason": finish}

    def _logprobs(self, entries: list) -> dict:
        """OpenAI's logprobs object: chat {"content": [{token, logprob, bytes, top_logprobs}]};
        completions {tokens, token_logprobs, top_logprobs ({token: logprob}), text_offset}."""
        raw = self.engine.tokenizer.token_bytes

        def text(i: int) -> str:
            return raw(i).decode("utf-8", errors="replace")  # a piece of a character shows as U+FFFD

        if self.chat:
            def item(i: int, lp: float) -> dict:
                return {"token": text(i), "logprob": lp, "bytes": list(raw(i))}

            return {"content": [{**item(t, lp), "top_logprobs": [item(i, v) for i, v in top]}
                                for t, lp, top, _ in entries]}
        return {"tokens": [text(e[0]) for e in entries], "token_logprobs": [e[1] for e in entries],
                "top_logprobs": [{text(i): v for i, v in e[2]} for e in entries],
                "text_offset": [e[3] for e in entries]}

    def _envelope(self, choices: list[dict], stream: bool) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind + (".chunk" if stream and self.chat else ""),
                "created": self.created, "model": self.model_id, "choices": choices}

    async def response(self) -> dict:
        """The whole answer as one JSON body (stream: false)."""
        texts, reasons = [""] * len(self.seqs), [None] * len(self.seqs)
        logprobs: list[list] = [[] for _ in self.seqs]
        async for index, kind, payload in self.events():
            if kind == "delta":
                if payload[2] is not None:
                    logprobs[index].append((payload[1], *payload[2], len(texts[index])))
                texts[index] += payload[0]
            else:
                reasons[index] = payload
        choices = [self._choice(i, texts[i], reasons[i], False, logprobs[i]) for i in range(len(self.seqs))]
        return {**self._envelope(choices, False), "usage": self.usage()}

    async def sse(self) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. If the client
        goes away, the iteration is cancelled and `finally` frees the rows at once."""
        try:
            if self.chat:  # the first chunk of each choice says who speaks
                for i in range(len(self.seqs)):
                    first = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}
                    yield _event(self._envelope([first], True))
            try:
                async for index, kind, payload in self.events():
                    if kind == "delta" and (payload[0] or payload[2] is not None):
                        entries = None if payload[2] is None else [(payload[1], *payload[2], 0)]
                        choice = self._choice(index, payload[0], None, True, entries)
                        yield _event(self._envelope([choice], True))
                    elif kind == "finish":
                        yield _event(self._envelope([self._choice(index, None, payload, True)], True))
            except APIError as e:  # headers are sent: the error goes in the stream
                yield _event(e.body())
            if self.include_usage:
                yield _event({**self._envelope([], True), "usage": self.usage()})
            yield "data: [DONE]\n\n"
        finally:
            self.engine.cancel(self.seqs)


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
