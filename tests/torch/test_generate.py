"""KV-cached generation: cached logits == full forward, batching, seeds, stops, streaming, overflow."""

import functools

import pytest
import torch

from minillm.torch import packed
from minillm.torch.generate import generate, generate_stream, stream_text
from minillm.torch.kv_cache import BatchCache, KVCache, make_caches
from minillm.torch.packed import packed_copy
from tests.conftest import STYLES, make_model, random_prompt


# --- cached == uncached -------------------------------------------------------------------------
def _trace_compiled_step_eagerly(monkeypatch) -> None:
    """Run what compile=True compiles, without compiling: the [out, in] weights, the row-dot
    products that only run under torch.compile, and the written-out attention."""
    monkeypatch.setattr(packed, "row_dots_faster", lambda: True)  # the layout, whatever this CPU prefers
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(packed, "compile_decode_step",
                        lambda model: lambda *args: model(*args, last_only=True, manual_attention=True))


def _random_biases_and_gains(model, seed: int = 0):
    """Init leaves biases at 0 and norm gains at 1, where a dropped or misplaced bias or gain
    changes nothing: move every vector parameter so that the packed copies of them count."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("chunk", [None, 1, 3])
@pytest.mark.parametrize("row_dot", [False, True])
def test_packed_cache_logits_equal_full_forward(style, chunk, row_dot, monkeypatch):
    """Every decode step's logits (and a chunked prefill's) equal the full uncached forward,
    for both packings: eager ([in, out], addmm) and the compiled step's ([out, in], row dots)."""
    if row_dot:
        _trace_compiled_step_eagerly(monkeypatch)
    model = _random_biases_and_gains(make_model(style, scale=3.0))  # a wrong formula shows above 1e-5
    tokens = random_prompt(30, seed=1)
    with torch.inference_mode():
        full = model(torch.tensor([tokens]))[0]  # (T, V)
        cache = BatchCache(packed_copy(model, compile=row_dot), 30, 61)
        got = [cache.prefill([tokens[:10]], chunk)]
        for t in tokens[10:]:
            got.append(cache.decode(torch.tensor([t])))
    got = torch.cat(got)  # (21, V): predictions after 10, 11, ... 30 tokens
    assert (got - full[9:]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("chunks", [(30,), (10, 1, 1, 5, 13), (1,) * 30])
def test_module_kv_cache_logits_equal_full_forward(style, chunks):
    """The readable path: model(tokens, positions, kv_caches) block by block, masks bottom-right."""
    model = make_model(style, scale=3.0)  # large enough that a wrong formula shows above 1e-5
    tokens = torch.tensor([random_prompt(30, seed=2)])
    caches = make_caches(model.config, 1, 30)
    with torch.inference_mode():
        full = model(tokens)
        start, parts = 0, []
        for n in chunks:
            positions = torch.arange(start, start + n)
            parts.append(model(tokens[:, start:start + n], positions=positions, kv_caches=caches))
            start += n
    assert (torch.cat(parts, 1) - full).abs().max().item() <= 1e-5
    assert caches[0].k.shape == (1, model.config.n_kv_heads, 30, model.config.head_dim)  # GQA-sized


def test_kv_cache_overflow_and_reorder():
    cache = KVCache(2, 1, 4, 3)
    cache.update(torch.ones(2, 1, 3, 3), torch.ones(2, 1, 3, 3))
    with pytest.raises(ValueError, match="overflow"):
        cache.update(torch.ones(2, 1, 2, 3), torch.ones(2, 1, 2, 3))
    cache.k[1] = 7.0
    cache.reorder(torch.tensor([1, 1]))
    assert (cache.k == 7.0).all()


# --- sampling through generate ----------------------------------------------------------------------
@pytest.mark.parametrize("style", STYLES)
def test_greedy_equals_argmax_of_full_forward(style):
    model = make_model(style)
    prompt = random_prompt(6)
    out = generate(model, prompt, 25, temperature=0)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out]))[0]
    assert out == logits[len(prompt) - 1:-1].argmax(-1).tolist()


@pytest.mark.parametrize("style", STYLES)
def test_batched_equals_unbatched_on_five_prompt_lengths(style):
    model = make_model(style)
    prompts = [random_prompt(n, seed=n) for n in (1, 4, 7, 12, 20)]
    for kwargs in (dict(temperature=0), dict(temperature=0.9, top_k=20, top_p=0.95, seed=3),
                   dict(temperature=1.0, min_p=0.05, repetition_penalty=1.3, seed=[5, 6, 7, 8, 9])):
        batched = generate(model, prompts, 20, **kwargs)
        seeds = kwargs.pop("seed", None)
        alone = [generate(model, p, 20, **kwargs, seed=seeds[i] if isinstance(seeds, list) else seeds)
                 for i, p in enumerate(prompts)]
        assert batched == alone


def test_same_seed_same_output_and_different_seed_differs():
    model = make_model("gpt2", scale=1.0)
    a = generate(model, [1, 2, 3], 30, temperature=1.0, seed=123)
    b = generate(model, [1, 2, 3], 30, temperature=1.0, seed=123)
    c = generate(model, [1, 2, 3], 30, temperature=1.0, seed=124)
    assert a == b and a != c


def test_temperature_zero_is_greedy_whatever_the_filters():
    model = make_model("llama-gqa", scale=1.0)
    greedy = generate(model, [3, 1, 4], 20, temperature=0)
    assert generate(model, [3, 1, 4], 20, temperature=0, top_k=3, top_p=0.5, min_p=0.2, seed=9) == greedy


def test_stop_token_ids_end_each_row():
    model = make_model("gpt2")
    free = generate(model, [[1, 2], [7, 8, 9]], 30, temperature=0)
    stop = free[0][5]
    out = generate(model, [[1, 2], [7, 8, 9]], 30, temperature=0, stop_token_ids=[stop])
    assert out[0] == free[0][: free[0].index(stop) + 1]
    assert out[1] == (free[1][: free[1].index(stop) + 1] if stop in free[1] else free[1])
    assert list(generate_stream(model, [1, 2], 30, temperature=0, stop_token_ids=[stop])) == out[0]


def test_padded_vocabulary_is_never_generated():
    model = make_model("gpt2")
    with torch.no_grad():
        model.lm_head.weight[50:] += 50.0  # make the padding ids the likeliest
    out = generate(model, [[1, 2], [3]], 20, temperature=1.0, seed=0, vocab_size=50)
    assert all(t < 50 for row in out for t in row)


# --- text: stop strings and streaming -------------------------------------------------------------
class LetterTokenizer:
    """Id i <-> the letter chr(ord('a') + i % 26): the tokenizer API generate uses, nothing more."""

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)

    def stream_decoder(self):
        tok = self

        class Stream:
            def push(self, ids):
                return tok.decode([ids] if isinstance(ids, int) else ids)

            def flush(self):
                return ""

        return Stream()


def test_stop_strings_and_stream_text():
    model, tok = make_model("llama-gqa"), LetterTokenizer()
    free = generate(model, [1, 2, 3], 30, temperature=0)
    text = tok.decode(free)
    stop = text[8:10]
    out = generate(model, [1, 2, 3], 30, temperature=0, stop_strings=[stop], tokenizer=tok)
    assert stop in tok.decode(out) and stop not in tok.decode(out[:-1])
    streamed = list(stream_text(model, tok, [1, 2, 3], 30, temperature=0, stop_strings=[stop]))
    assert "".join(streamed) == text[: text.index(stop)]
    assert "".join(stream_text(model, tok, [1, 2, 3], 30, temperature=0)) == text
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, [1], 3, stop_strings=["x"])


# --- context overflow -------------------------------------------------------------------------------
def test_context_overflow_is_an_error_by_default():
    model = make_model("gpt2", max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, random_prompt(10), 7)
    assert len(generate(model, random_prompt(10), 6, temperature=0)) == 6


@pytest.mark.parametrize("style", STYLES)
def test_sliding_window_conditions_on_the_last_max_seq_len_tokens(style):
    model = make_model(style, max_seq_len=16)
    prompt = random_prompt(12)
    out = generate(model, prompt, 20, temperature=0, context_overflow="slide")
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            seq.append(model(torch.tensor([seq[-16:]]))[0, -1].argmax().item())
    assert out == seq[len(prompt):]


def test_packed_copy_is_rebuilt_when_weights_change():
    model = make_model("gpt2")
    before = generate(model, [1, 2], 10, temperature=0)
    with torch.no_grad():
        model.norm.weight.mul_(-1.0)  # in place, as an optimizer step would: logits change sign
    after = generate(model, [1, 2], 10, temperature=0)
    assert after != before
    with torch.no_grad():
        assert after == model(torch.tensor([[1, 2] + after]))[0, 1:-1].argmax(-1).tolist()


@pytest.mark.parametrize("row_dots", [True, False])
def test_compiled_decode_step_matches_full_forward(row_dots, monkeypatch):
    """The default suite's torch.compile check: a tiny model's batch-1 decode steps, really
    compiled (row dots or BLAS calls, frozen weights, written-out attention), give the full forward's
    logits and eager generate's tokens. Random biases on, so the products' bias term counts. Only the
    autotuning search is skipped (minutes); the slow test below runs it, batched too."""
    quick = functools.partial(packed.compile_decode_step, autotune=False)
    monkeypatch.setattr(packed, "compile_decode_step", quick)
    monkeypatch.setattr(packed, "row_dots_faster", lambda: row_dots)
    model = _random_biases_and_gains(make_model("llama-gqa", bias=True, scale=3.0))
    tokens = random_prompt(20, seed=3)
    with torch.inference_mode():
        full = model(torch.tensor([tokens]))[0]  # (T, V)
        cache = BatchCache(packed_copy(model, compile=True), 20, 61)
        got = [cache.prefill([tokens[:8]])] + [cache.decode(torch.tensor([t])) for t in tokens[8:]]
    assert (torch.cat(got) - full[7:]).abs().max().item() <= 1e-4
    eager = generate(model, tokens[:8], 12, temperature=0)  # the same 20 slots: no recompile
    assert generate(model, tokens[:8], 12, temperature=0, compile=True) == eager


@pytest.mark.slow
def test_compiled_decode_matches_eager_and_follows_weight_changes():
    """torch.compile'd decode steps (frozen weights, autotuned GEMMs) give the eager tokens, also
    after the weights change."""
    for style in ("gpt2", "llama-gqa"):
        model = make_model(style)
        for prompts in ([[1, 2, 3], [4, 5]], [1, 2, 3]):  # batched (micro-GEMMs) and batch 1 (row dots)
            eager = generate(model, prompts, 12, temperature=0)
            assert generate(model, prompts, 12, temperature=0, compile=True) == eager
        with torch.no_grad():
            model.norm.weight.mul_(-1.0)
        eager = generate(model, prompts, 12, temperature=0)
        assert generate(model, prompts, 12, temperature=0, compile=True) == eager


def test_the_faster_product_is_measured_or_forced(monkeypatch):
    """matvec.row_dots_faster times compiled row dots against the BLAS on this machine (a bool,
    whichever won), unless MINILLM_ROW_DOT forces it."""
    from minillm.torch import matvec

    monkeypatch.delenv(matvec.ROW_DOT_ENV, raising=False)
    assert matvec.row_dots_faster.__wrapped__(rows=256, cols=256, rounds=1) in (True, False)
    for forced, expected in (("1", True), ("0", False)):
        monkeypatch.setenv(matvec.ROW_DOT_ENV, forced)
        assert matvec.row_dots_faster.__wrapped__() is expected
