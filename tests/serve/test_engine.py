"""The continuous-batching engine on its own (no HTTP): batching changes no sequence's tokens
(checked against minillm.torch.generate, one request at a time), long prompts are prefilled in
chunks between decode steps, cancelled sequences free their rows at once, the queue is bounded."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.serve.engine import Engine, GenSequence, QueueFull
from minillm.tokenizer.stream import StopChecker, TextDeltas, text_pieces
from minillm.torch.packed import write_cache
from minillm.torch.sampling import SamplingConfig
from tests.serve.conftest import CORPUS, greedy_reference

GREEDY = SamplingConfig(temperature=0.0)


class Collector:
    """Records what a sequence emits: its text, ids, finish reason, and when each event came."""

    def __init__(self, log: list | None = None, name: str = ""):
        self.text, self.ids, self.reason, self.done = "", [], None, threading.Event()
        self.log, self.name = log, name

    def __call__(self, kind: str, payload) -> None:
        if self.log is not None:
            self.log.append((self.name, kind))
        if kind == "delta":
            self.text += payload[0]
            self.ids.append(payload[1])
        else:
            self.reason = payload
            self.done.set()


def sequence(tokenizer, text: str, max_tokens: int, sampling=GREEDY, stops=(), seed=None, log=None,
             name=""):
    out = Collector(log, name)
    text_deltas = TextDeltas(tokenizer, stops)
    seq = GenSequence(tokenizer.encode(text), max_tokens, sampling, out, (), text_deltas, seed)
    return seq, out


@pytest.fixture
def engine(loaded):
    model, tokenizer = loaded
    engines = []

    def make(**kwargs) -> Engine:
        engines.append(Engine(model, tokenizer, **kwargs))
        engines[-1].start()
        return engines[-1]

    yield make
    for e in engines:
        e.close()


def wait_all(outs, timeout: float = 30.0) -> None:
    for out in outs:
        assert out.done.wait(timeout), "a sequence did not finish"


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_write_cache_per_row_slots_matches_a_loop():
    torch.manual_seed(0)
    cache, x = torch.randn(3, 2, 10, 4), torch.randn(3, 2, 2, 4)  # (B, K, S, hd), (B, K, T, hd)
    slots = torch.tensor([[0, 1], [5, 6], [8, 9]])  # (B, T): each row at its own length
    expected = cache.clone()
    for b in range(3):
        for t in range(2):
            expected[b, :, slots[b, t]] = x[b, :, t]
    write_cache(cache, slots, x)
    assert torch.equal(cache, expected)


def test_batched_greedy_equals_one_request_at_a_time(engine, loaded):
    """16 sequences of different prompt lengths (some over several prefill chunks) and max_tokens
    through 4 rows: the last 6 join while the first ones are mid-flight; every text equals what
    generate() gives for that prompt alone."""
    _, tokenizer = loaded
    eng = engine(max_batch=4, prefill_chunk=8)
    lines = CORPUS.splitlines()
    prompts = [" ".join(lines[3 * i:3 * i + 1 + i % 5])[: 4 + 7 * i] for i in range(16)]
    limits = [5 + (7 * i) % 23 for i in range(16)]
    log: list = []
    seqs = [sequence(tokenizer, p, m, log=log, name=i) for i, (p, m) in enumerate(zip(prompts, limits))]
    eng.submit([s for s, _ in seqs[:10]])
    wait_until(lambda: len(seqs[0][1].ids) >= 3)  # the first ones are decoding
    joined = len(log)
    eng.submit([s for s, _ in seqs[10:]])
    wait_all([out for _, out in seqs])
    before, after = {name for name, _ in log[:joined]}, {name for name, _ in log[joined:]}
    assert before & after, "no sequence was mid-flight when the last 6 joined"
    for (seq, out), m in zip(seqs, limits):
        assert out.reason == "length" and len(out.ids) == m
        assert out.text == greedy_reference(loaded, seq.prompt, m), seq.prompt
    assert eng.free_slots == 4


def test_seeded_sampling_equals_generate_with_that_seed(engine, loaded):
    """Per-row generators: a seeded sequence draws what generate(seed=...) draws alone, whatever
    runs beside it; stop strings end the text where text_pieces ends it."""
    _, tokenizer = loaded
    eng = engine(max_batch=3)
    sampling = SamplingConfig(temperature=0.9, top_p=0.9)
    specs = [("Bob sees", 40, 7, ()), ("Where? By", 30, 8, ("the",)), ("Cleo", 50, 9, ("e r", "\n"))]
    seqs = [sequence(tokenizer, p, m, sampling, stops, seed) for p, m, seed, stops in specs]
    eng.submit([s for s, _ in seqs])
    wait_all([out for _, out in seqs])
    for (seq, out), (_, m, seed, stops) in zip(seqs, specs):
        assert out.text == greedy_reference(loaded, seq.prompt, m, (), stops, 0.9, 0.9, seed)
    assert seqs[1][1].reason == "stop" and "the" not in seqs[1][1].text


def test_long_prompt_is_prefilled_between_decode_steps(engine, loaded):
    """A 100-token prompt in chunks of 4 takes 25 steps to prefill; a running stream gets a token
    at each of them instead of waiting for the whole prompt."""
    _, tokenizer = loaded
    eng = engine(max_batch=2, prefill_chunk=4)
    log: list = []
    running, a = sequence(tokenizer, "Anne", 100, log=log, name="a")
    eng.submit([running])
    wait_until(lambda: len(a.ids) >= 2)
    long, b = sequence(tokenizer, CORPUS[:100], 5, log=log, name="b")
    submitted = len(log)
    eng.submit([long])
    wait_all([a, b])
    first_b = log.index(("b", "delta"))
    a_during = sum(1 for name, _ in log[submitted:first_b] if name == "a")
    assert a_during >= 20, f"the running stream got {a_during} tokens while 25 prefill chunks ran"


def test_cancel_frees_the_row_at_once(engine, loaded):
    _, tokenizer = loaded
    eng = engine(max_batch=2)
    (s1, o1), (s2, o2), (s3, o3) = [sequence(tokenizer, "Bob", 120) for _ in range(3)]
    eng.submit([s1, s2, s3])  # s3 waits for a row
    wait_until(lambda: len(o1.ids) >= 3)
    eng.cancel([s1, s3])
    wait_all([o2])
    wait_until(lambda: eng.free_slots == 2)
    stats = eng.stats()
    assert stats["free_slots"] == 2 and stats["waiting"] == 0 and stats["cancelled"] == 2
    assert len(o1.ids) < 120 and o1.reason is None and not o3.ids  # cancelled: no finish event


def test_queue_limit_refuses_all_or_nothing(loaded):
    model, tokenizer = loaded
    eng = Engine(model, tokenizer, max_batch=1, max_queue=3)  # not started: nothing leaves the queue
    eng.submit([sequence(tokenizer, "a", 1)[0] for _ in range(2)])
    with pytest.raises(QueueFull, match="limit 3"):
        eng.submit([sequence(tokenizer, "a", 1)[0] for _ in range(2)])
    assert eng.stats()["waiting"] == 2
    eng.submit([sequence(tokenizer, "a", 1)[0]])


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(0, 61), max_size=40),
       stops=st.lists(st.sampled_from(["e", "the", "by t", ".\n", "zz"]), max_size=2))
def test_text_deltas_equal_the_decoded_text_cut_at_the_first_stop(loaded, ids, stops):
    """Pushed one id at a time, the deltas add up to the whole decoded text cut before its first stop
    string, the stop flag rises at the first id whose text contains one (as StopChecker's does),
    and text_pieces (pulled, with a stop token) gives the same text as the ids before that token."""
    _, tokenizer = loaded
    deltas, checker = TextDeltas(tokenizer, stops), StopChecker(tokenizer, stops)
    text, stopped_at, checker_at = "", None, None
    for i, t in enumerate(ids):
        piece, stopped = deltas.push(t)
        text += piece
        if checker_at is None and checker.push(t):
            checker_at = i
        if stopped:
            stopped_at = i
            break
    text += deltas.finish()
    full = tokenizer.decode(ids)
    cut = min([i for i in (full.find(s) for s in stops) if i >= 0], default=len(full))
    assert text == full[:cut]
    first = next((i for i in range(len(ids)) if any(s in tokenizer.decode(ids[:i + 1]) for s in stops)), None)
    assert stopped_at == checker_at == first
    k = len(ids) // 2
    if ids and ids[k] not in ids[:k]:  # a stop token ends the text where it first stands
        head = tokenizer.decode(ids[:k])
        cut = min([i for i in (head.find(s) for s in stops) if i >= 0], default=len(head))
        assert "".join(text_pieces(iter(ids), tokenizer, stops, [ids[k]])) == head[:cut]
