"""`minillm chat`: talk to a model in the terminal, with streaming replies.

Each user message becomes a turn `<|user|> text <|assistant|>` and the model writes until it
emits eos (or the next `<|user|>`). A tokenizer without chat tokens gets a plain-text template
("User: ...\\nAssistant:") that stops at the next "\\nUser:". When the conversation outgrows the
model's context, the oldest turns are dropped (the system prompt stays).
"""

from __future__ import annotations

import argparse
import sys

from minillm.commands._generation import add_sampling_args, load_for_generation, sampling_kwargs
from minillm.tokenizer.stream import special_ids, text_pieces

HELP = "commands: /reset forgets the conversation, /exit quits (so does Ctrl-D)"


def register(sub) -> None:
    p = sub.add_parser("chat", help="interactive chat with a model (streaming)",
                       description="Interactive chat in the terminal. " + HELP + ".",
                       epilog="example: minillm chat --run runs/sft --temperature 0.7 --top-p 0.9")
    p.add_argument("--system", default="", help="a system prompt kept at the start of the conversation")
    add_sampling_args(p, temperature=0.7, max_new_tokens=256)
    p.set_defaults(func=run)


class Conversation:
    """Turns as token lists, the template that makes them, and trimming to the context."""

    def __init__(self, tokenizer, max_seq_len: int, system: str = ""):
        self.tokenizer, self.max_seq_len = tokenizer, max_seq_len
        roles = special_ids(tokenizer, "user", "assistant")
        self.chat_tokens = len(roles) == 2
        self.user_id, self.assistant_id = roles if self.chat_tokens else (None, None)
        self.eos = special_ids(tokenizer, "eos")
        self.system = self._system_turn(system)
        self.turns: list[list[int]] = []

    def _system_turn(self, text: str) -> list[int]:
        if not text:
            return []
        system_id = special_ids(self.tokenizer, "system")
        if self.chat_tokens and system_id:
            return system_id + self.tokenizer.encode(text)
        return self.tokenizer.encode(text + "\n")

    @property
    def stop_strings(self) -> list[str]:
        return [] if self.chat_tokens else ["\nUser:"]

    @property
    def stop_token_ids(self) -> list[int]:
        return self.eos + ([self.user_id] if self.chat_tokens else [])

    def user_turn(self, text: str) -> list[int]:
        if self.chat_tokens:
            return [self.user_id] + self.tokenizer.encode(text) + [self.assistant_id]
        return self.tokenizer.encode(f"User: {text}\nAssistant:")

    def prompt(self, text: str, reserve: int) -> list[int]:
        """The ids to generate after: system + the turns that fit + this user turn, leaving
        `reserve` slots for the reply. The new turn is kept even if older turns must go."""
        self.turns.append(self.user_turn(text))
        budget = self.max_seq_len - reserve - len(self.system)
        while len(self.turns) > 1 and sum(map(len, self.turns)) > budget:
            self.turns.pop(0)
        ids = self.system + [t for turn in self.turns for t in turn]
        return ids[-(self.max_seq_len - reserve):] if len(ids) > self.max_seq_len - reserve else ids

    def add_reply(self, ids: list[int], text: str) -> None:
        """Close the assistant turn: its ids and eos, or (plain template) its shown text and a newline."""
        if not self.chat_tokens:
            self.turns[-1] = self.turns[-1] + self.tokenizer.encode(" " + text.strip() + "\n")
            return
        if ids and ids[-1] in self.stop_token_ids:
            ids = ids[:-1]
        self.turns[-1] = self.turns[-1] + ids + self.eos

    def reset(self) -> None:
        self.turns = []


def run(args: argparse.Namespace) -> int:
    from minillm.torch.generate import generate_stream

    model, tokenizer = load_for_generation(args)
    kwargs = sampling_kwargs(args, model, tokenizer)
    max_seq_len = model.config.max_seq_len
    reply_budget = min(args.max_new_tokens, max_seq_len // 2)  # room for the conversation itself
    conv = Conversation(tokenizer, max_seq_len, args.system)
    kwargs.update(stop_strings=conv.stop_strings + kwargs["stop_strings"], stop_token_ids=conv.stop_token_ids,
                  context_overflow="error", tokenizer=tokenizer)
    print(HELP, file=sys.stderr)
    turn = 0
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            conv.reset()
            print("(conversation cleared)")
            continue
        try:
            ids = conv.prompt(line, reply_budget)
        except ValueError as e:  # e.g. a character the tokenizer does not know: say so, keep chatting
            print(f"(cannot encode that: {e})")
            continue
        seed = None if args.seed is None else args.seed + turn
        tokens = generate_stream(model, ids, reply_budget, seed=seed, **kwargs)
        conv.add_reply(*_stream_reply(tokens, tokenizer, kwargs))
        turn += 1


def _stream_reply(tokens, tokenizer, kwargs: dict) -> tuple[list[int], str]:
    """Print a reply as it is generated (without stop tokens or stop strings); return ids and text."""
    ids: list[int] = []

    def recorded():
        for t in tokens:
            ids.append(t)
            yield t

    sys.stdout.write("model> ")
    text = ""
    for piece in text_pieces(recorded(), tokenizer, kwargs["stop_strings"], kwargs["stop_token_ids"]):
        print(piece, end="", flush=True)
        text += piece
    print()
    return ids, text
