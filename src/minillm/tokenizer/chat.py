"""The chat template: how a conversation of messages becomes token ids, in one place.

A message is `{"role": "system" | "user" | "assistant", "content": str}`. With a tokenizer that
has the chat special tokens (`bos`, `eos`, `system`, `user`, `assistant`; every tokenizer we train
has them) a conversation renders as

    <|bos|> <|role|> content <|eos|> <|role|> content <|eos|> ...   [+ <|assistant|> to generate]

`<|bos|>` once at the start; every message is its role token, the ids of its content and
`<|eos|>`. A generation prompt is `<|assistant|>`; the model's reply ends when it emits `<|eos|>`.
Content is always encoded as ordinary text, so a user who types "<|user|>" cannot forge a turn.

Training (`render_for_training`) trains on each assistant turn's content and its closing eos only
(the model must learn to stop); bos, role tokens and system/user turns are context. Because
rendering is a concatenation of per-message pieces, the ids before an assistant turn's content
are exactly `render(messages[:k], add_generation_prompt=True)`: what fine-tuning trains on is
what inference feeds.

Tokenizers without role tokens (e.g. one imported from GPT-2) get a plain-text fallback:
"System text\\n", "User: text\\n", "Assistant: text\\n", generation prompt "Assistant:", each
piece encoded on its own; replies stop at the stop string "\\nUser:" (`stop_strings`).

`hf_chat_template()` is the same template as Jinja for Hugging Face's `chat_template` field, and
`save_hf_tokenizer` writes it with the tokenizer into an HF directory: `apply_chat_template` on
the exported tokenizer then gives the same ids.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Sequence

from minillm.files import atomic_write_json
from minillm.tokenizer.base import SPECIAL_TOKENS

ROLES = ("system", "user", "assistant")
# What the role-token template needs; a tokenizer lacking any of them uses the plain-text fallback.
TEMPLATE_TOKENS = ("bos", "eos", *ROLES)
PLAIN_PREFIX = {"system": "", "user": "User: ", "assistant": "Assistant: "}
PLAIN_GENERATION_PROMPT = "Assistant:"
PLAIN_STOP = "\nUser:"

Message = dict[str, Any]


def uses_role_tokens(tokenizer) -> bool:
    """True when the tokenizer has every special token of the template (else: plain-text fallback)."""
    return all(SPECIAL_TOKENS[name] in tokenizer.special_tokens for name in TEMPLATE_TOKENS)


def validate_messages(messages: Sequence[Message], for_training: bool = False) -> None:
    """Raise ValueError with a one-line reason if `messages` is not a conversation we can render.

    A conversation is a non-empty list of {"role", "content"} dicts with a known role and string
    content; for training it must contain at least one assistant turn (else nothing is learned).
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("a conversation must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i}: expected an object with 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i}: unknown role {m['role']!r}; expected one of {list(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i}: content must be a string, got {type(m['content']).__name__}")
    if for_training and not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn: a training conversation needs at least one reply to learn")


def _segments(tokenizer, messages: Sequence[Message],
              add_generation_prompt: bool) -> Iterator[tuple[list[int], bool]]:
    """The template itself: (ids, trained) pieces whose concatenation is the rendered conversation."""
    encode = tokenizer.encode  # allowed_special="none": content is ordinary text
    if uses_role_tokens(tokenizer):
        special = tokenizer.special_id
        yield [special("bos")], False
        for m in messages:
            reply = m["role"] == "assistant"
            yield [special(m["role"])], False
            yield encode(m["content"]) + [special("eos")], reply  # content + its closing eos
        if add_generation_prompt:
            yield [special("assistant")], False
        return
    for m in messages:
        reply = m["role"] == "assistant"
        yield encode(PLAIN_PREFIX[m["role"]].rstrip(" ") if reply else PLAIN_PREFIX[m["role"]]), False
        # The assistant's " text\n" is encoded apart from "Assistant:", so that the prompt part of
        # a training example is exactly the generation prompt below.
        yield encode((" " if reply else "") + m["content"] + "\n"), reply
    if add_generation_prompt:
        yield encode(PLAIN_GENERATION_PROMPT), False


def render(tokenizer, messages: Sequence[Message], add_generation_prompt: bool = False) -> list[int]:
    """Ids of a conversation; with `add_generation_prompt`, followed by the assistant's turn opener."""
    validate_messages(messages)
    return [t for ids, _ in _segments(tokenizer, messages, add_generation_prompt) for t in ids]


def render_for_training(tokenizer, messages: Sequence[Message]) -> tuple[list[int], list[bool]]:
    """(ids, trained): `trained[i]` is True where ids[i] is a target of the loss, i.e. the content
    and closing eos (plain fallback: " content\\n") of every assistant turn. Same ids as `render`."""
    validate_messages(messages, for_training=True)
    ids: list[int] = []
    trained: list[bool] = []
    for piece, is_reply in _segments(tokenizer, messages, add_generation_prompt=False):
        ids += piece
        trained += [is_reply] * len(piece)
    return ids, trained


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end a reply: eos, and any other template token (a model that opens a new turn is done)."""
    if not uses_role_tokens(tokenizer):  # an imported tokenizer's role map may list several eos tokens
        return tokenizer.role_ids("eos")
    return [*tokenizer.role_ids("eos"), *(tokenizer.special_id(name) for name in ("bos", *ROLES))]


def stop_strings(tokenizer) -> list[str]:
    """Stop strings of the plain-text fallback (the next user turn); none with role tokens."""
    return [] if uses_role_tokens(tokenizer) else [PLAIN_STOP]


def hf_chat_template() -> str:
    """The role-token template as Jinja for Hugging Face's `chat_template` (tokenizer_config.json).

    HF renders text and splits the special-token strings out of it, so the ids equal `render`'s
    whenever no content contains a special-token string (see `minillm.tokenizer.hf`).
    """
    bos, eos, gen = SPECIAL_TOKENS["bos"], SPECIAL_TOKENS["eos"], SPECIAL_TOKENS["assistant"]
    return (
        "{{ '" + bos + "' }}"
        "{% for message in messages %}"
        "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
        "{{ '<|' + message['role'] + '|>' }}"
        # {% generation %} marks what is trained (HF's return_assistant_tokens_mask, TRL's
        # assistant-only loss): an assistant turn's content and its eos, as in render_for_training.
        "{% if message['role'] == 'assistant' %}{% generation %}"
        "{{ message['content'] + '" + eos + "' }}{% endgeneration %}"
        "{% else %}{{ message['content'] + '" + eos + "' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '" + gen + "' }}{% endif %}"
    )


def save_hf_tokenizer(tokenizer, directory: str | os.PathLike) -> None:
    """A Hugging Face tokenizer directory: tokenizer.json (`save_hf`) and a tokenizer_config.json
    naming the special tokens and holding the chat template, so that
    `AutoTokenizer.from_pretrained(directory).apply_chat_template(...)` gives `render`'s ids."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_hf(directory / "tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    config.update({f"{name}_token": token for name in ("bos", "eos", "pad")
                   if (token := tokenizer.special_token(name)) is not None})
    if uses_role_tokens(tokenizer):
        config["chat_template"] = hf_chat_template()
    atomic_write_json(directory / "tokenizer_config.json", config)
