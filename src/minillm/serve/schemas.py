"""The OpenAI request bodies the server accepts, and its error bodies.

Requests are validated by pydantic: a wrong type or value is a 400 naming the field (`param`).
Fields we do not implement (`user`, `presence_penalty`, ...) are ignored, as clients send them.
Errors have OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

BRANCHES = {"str", "int", "float", "bool", "list", "dict"}
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error the client gets as an OpenAI error body with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = ERROR_TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    """What both endpoints share: the model, the sampling options, n, stream."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, gt=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, f"stop: at most 4 stop strings, got {len(stops)}", "stop")
        return stops


class CompletionRequest(_Request):
    """POST /v1/completions: a prompt (text, or token ids) to continue."""

    prompt: str | list[int]
    max_tokens: int | None = Field(16, gt=0)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=20)  # the k most likely tokens besides the chosen one

    def logprobs_k(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]

    def as_template_message(self) -> dict:
        """{"role", "content"} for minillm.tokenizer.chat (a developer turn is a system turn)."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Request):
    """POST /v1/chat/completions: a conversation, rendered by the chat template."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, gt=0)  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def parse(kind: type[BaseModel], body: object) -> BaseModel:
    """The request model of a JSON body, or an APIError(400) naming the first bad field."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return kind.model_validate(body)
    except ValidationError as e:
        raise _bad_field(e.errors()) from None


def _bad_field(errors: list[dict]) -> APIError:
    """A 400 naming the first bad field. pydantic reports a union (prompt: str | list[int]) once per
    branch, with the branch's name in the path: those become "expected str or list[int]"."""
    def is_branch(part) -> bool:
        return isinstance(part, str) and (part in BRANCHES or "[" in part)

    def head(error: dict) -> str:
        """The field's path, up to a union's branch name."""
        parts = []
        for p in error["loc"]:
            if is_branch(p):
                break
            parts.append(str(p))
        return ".".join(parts)

    first, param = errors[0], head(errors[0])
    got = f", got {first['input']!r:.60}" if first["type"] != "missing" else ""
    branches = [next(p for p in e["loc"] if is_branch(p)) for e in errors
                if head(e) == param and any(is_branch(p) for p in e["loc"])]
    why = f"expected {' or '.join(dict.fromkeys(branches))}" if len(branches) > 1 else first["msg"]
    return APIError(400, f"{param}: {why}{got}", param or None)
