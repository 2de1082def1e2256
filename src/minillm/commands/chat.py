"""`minillm chat`: talk to a model in the terminal, with streaming replies.

The conversation is rendered by the chat template (minillm.tokenizer.chat), so the model sees
the ids fine-tuning trained on, and replies until it emits eos. When the conversation outgrows the
model's context, the oldest exchanges are dropped (the system prompt stays).
"""

from __future__ import annotations

import argparse
import sys

from minillm.commands._generation import add_sampling_args, load_for_generation, sampling_kwargs
from minillm.tokenizer import chat as template
from minillm.tokenizer.stream import text_pieces

HELP = "commands: /reset forgets the conversation, /exit quits (so does Ctrl-D)"


def register(sub) -> None:
    p = sub.add_parser("chat", help="interactive chat with a model (streaming)",
                       description="Interactive chat in the terminal. " + HELP + ".",
                       epilog="example: minillm chat --run runs/sft --temperature 0.7 --top-p 0.9")
    p.add_argument("--system", default="", help="a system prompt kept at the start of the conversation")
    add_sampling_args(p, temperature=0.7, max_new_tokens=256)
    p.set_defaults(func=run)


class Conversation:
    """The messages so far, rendered by the chat template (minillm.tokenizer.chat); when they
    outgrow the context, the oldest exchanges go first (the system prompt stays)."""

    def __init__(self, tokenizer, max_seq_len: int, system: str = ""):
        self.tokenizer, self.max_seq_len = tokenizer, max_seq_len
        self.system = [{"role": "system", "content": system}] if system else []
        self.turns: list[dict] = []  # user, assistant, user, ...
        self.stop_strings = template.stop_strings(tokenizer)
        self.stop_token_ids = template.stop_token_ids(tokenizer)

    def prompt(self, text: str, reserve: int) -> list[int]:
        """The ids to generate after: system + the exchanges that fit + this user turn + the
        assistant opener (what fine-tuning trained on), leaving `reserve` slots for the reply."""
        self.turns.append({"role": "user", "content": text})
        budget = self.max_seq_len - reserve
        while True:
            ids = template.render(self.tokenizer, self.system + self.turns, add_generation_prompt=True)
            if len(ids) <= budget or len(self.turns) == 1:
                return ids[-budget:]
            del self.turns[:2]  # the oldest user turn and its reply

    def add_reply(self, text: str) -> None:
        """Record the reply as shown (stop token and stop string already cut off)."""
        self.turns.append({"role": "assistant", "content": text.strip()})

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
        conv.add_reply(_stream_reply(tokens, tokenizer, kwargs))
        turn += 1


def _stream_reply(tokens, tokenizer, kwargs: dict) -> str:
    """Print a reply as it is generated (without stop tokens or stop strings); return its text."""
    sys.stdout.write("model> ")
    text = ""
    for piece in text_pieces(tokens, tokenizer, kwargs["stop_strings"], kwargs["stop_token_ids"]):
        print(piece, end="", flush=True)
        text += piece
    print()
    return text
