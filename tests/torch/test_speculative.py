"""Speculative decoding (minillm.torch.speculative): the target's greedy output token for token, its
sampling distribution (exact, from the target's own softmax), stops, and `minillm sample --draft`."""

import pytest
import torch

from minillm.checkpoint import save_run
from minillm.cli import main
from minillm.torch import packed, speculative
from minillm.torch.generate import generate
from minillm.torch.model import model_params
from minillm.torch.speculative import speculative_generate, verify
from tests.conftest import make_model, random_prompt

TINY = dict(vocab_size=8, max_seq_len=16, d_model=16, n_layers=1, n_heads=2)  # a vocabulary of 8
TEMPERATURE, TOP_K = 0.9, 6  # the processed distributions, not the raw softmax, must be kept


def _target():
    """A random GPT-2 style model whose greedy path is not one token repeated (most random models' is)."""
    return make_model("gpt2", max_seq_len=128, scale=5.0)


def _draft(target, agreement: str):
    """often: the target's weights plus a little noise. sometimes: an untrained model with tied
    embeddings (it predicts its last input token: right where the target repeats one). rarely: an
    untrained model with an untied head."""
    if agreement != "often":
        tied = agreement == "sometimes"
        return make_model("llama-gqa", seed=7, max_seq_len=128, scale=1.0, tie_embeddings=tied)
    draft = make_model("gpt2", max_seq_len=128)
    draft.load_state_dict(target.state_dict())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.05 * p.std() * torch.randn(p.shape, generator=g))
    return draft


def _trace_compiled_step_eagerly(monkeypatch) -> list[tuple[int, int]]:
    """What compile=True compiles ([out, in] weights, row-dot products, written-out attention), eagerly.
    Returns the list into which every call of a compiled graph appends (T, S), its shape."""
    shapes = []

    def traced(model, last_only):
        def step(tokens, *args):
            shapes.append((tokens.size(1), args[2].size(-1)))  # (T, S of the mask)
            return model(tokens, *args, last_only=last_only, manual_attention=True)
        return step

    monkeypatch.setattr(packed, "row_dots_faster", lambda: True)  # the row-dot layout on any CPU
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(packed, "compile_decode_step", lambda model: traced(model, True))
    monkeypatch.setattr(speculative, "verify_step", lambda copy: traced(copy.model, False))
    return shapes


# --- greedy: the target's output, token for token -----------------------------------------------------
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("agreement", ["often", "sometimes", "rarely"])
@pytest.mark.parametrize("compiled", [False, True])
def test_greedy_output_is_the_targets_token_for_token(k, agreement, compiled, monkeypatch):
    shapes = _trace_compiled_step_eagerly(monkeypatch) if compiled else []
    target = _target()
    draft = _draft(target, agreement)
    prompt = random_prompt(5, seed=2)
    expected = generate(target, prompt, 64, temperature=0)
    shapes.clear()
    out = speculative_generate(target, draft, prompt, 64, k=k, temperature=0, compile=compiled)
    assert out.tokens == expected
    # compiled: two shapes of graph, the decode step and the verify pass over k + 1 tokens (the draft's
    # catch-up and a short last round run as decode steps): no new shape compiles mid-generation
    assert set(shapes) == ({(1, 69), (k + 1, 69)} if compiled else set()), set(shapes)
    rounds = sum(out.accept_counts)
    assert sum((n + 1) * c for n, c in enumerate(out.accept_counts)) == 64  # every token came from a round
    accepted = sum(n * c for n, c in enumerate(out.accept_counts)) / (k * rounds)
    # the regimes really occur: full rounds, rollbacks after every kind of partial round, all rejected
    low, high = {"often": (0.6, 1.0), "sometimes": (0.2, 0.9), "rarely": (0.0, 0.3)}[agreement]
    assert low <= accepted <= high, out.accept_counts


def test_stop_token_ends_the_output_as_in_generate():
    target = _target()
    draft = _draft(target, "sometimes")
    prompt = random_prompt(5, seed=2)
    free = generate(target, prompt, 40, temperature=0)
    j = next(i for i in range(6, 40) if free[i] not in free[:i])  # a token first produced at step j > 5
    stop = [free[j]]
    expected = generate(target, prompt, 40, temperature=0, stop_token_ids=stop)
    assert expected == free[:j + 1]
    for k in (1, 3, 5):
        out = speculative_generate(target, draft, prompt, 40, k=k, temperature=0, stop_token_ids=stop)
        assert out.tokens == expected
    sampled = speculative_generate(target, draft, prompt, 40, k=3, seed=5, stop_token_ids=stop).tokens
    assert (sampled[-1] in stop or len(sampled) == 40) and not set(sampled[:-1]) & set(stop)
    assert speculative_generate(target, draft, prompt, 40, k=3, seed=5, stop_token_ids=stop).tokens == sampled


def test_bad_draft_or_k_is_a_clear_error():
    target = make_model("gpt2", **TINY)
    with pytest.raises(ValueError, match=r"draft's vocabulary \(9 ids\) is not the target's \(8\)"):
        speculative_generate(target, make_model("gpt2", **{**TINY, "vocab_size": 9}), [1], 4)
    with pytest.raises(ValueError, match="k .* must be >= 1, got 0"):
        speculative_generate(target, target, [1], 4, k=0)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        speculative_generate(target, target, [1] * 10, 10)


# --- sampling: the target's distribution, exactly --------------------------------------------------
def _target_distributions(model, prefixes: list[list[int]]) -> torch.Tensor:
    """The target's next-token distributions (N, V) after each prefix, in float64, from the plain
    uncached forward: softmax(logits / T) over the TOP_K largest logits."""
    with torch.no_grad():
        logits = torch.cat([model(torch.tensor([x]))[:, -1] for x in prefixes]).double()  # (N, V)
    logits = logits / TEMPERATURE
    kth = logits.sort(dim=-1, descending=True).values[:, TOP_K - 1:TOP_K]
    return torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)


def _assert_frequencies(counts: torch.Tensor, probs: torch.Tensor, what: str) -> None:
    """Observed counts of each outcome vs exact probabilities: each frequency within 5 binomial
    standard deviations (+ a hair for float32 models); impossible outcomes never observed."""
    n = counts.sum().item()
    freq, sd = counts.double() / n, (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() <= 5 * sd + 1e-4).all(), f"{what}: {freq} vs {probs}"
    assert (counts[probs == 0] == 0).all(), what


@pytest.mark.parametrize("k", [1, 5])
def test_verify_keeps_the_targets_distribution_to_a_1_percent_shift(k):
    """The rejection sampling itself, 400k rounds at once on the real models' distributions.
    Why 400k: the most likely first token has p ~ 0.3, so its frequency's sd is sqrt(0.21/4e5) =
    0.0007; the 5-sd tolerance is 0.0036, so a 1% shift (0.01) fails by more than 8 sd."""
    target, draft = make_model("gpt2", scale=6.0, **TINY), make_model("gpt2", seed=1, scale=15.0, **TINY)
    context = [3, 1, 4, 1, 5, 1, 2][:k + 1]  # p_i, q_i: the distributions after context[:i+1]
    p = _target_distributions(target, [context[:i + 1] for i in range(k + 1)]).float()  # (k+1, V)
    q = _target_distributions(draft, [context[:i + 1] for i in range(k)]).float()  # (k, V)
    B, g = 400_000, torch.Generator().manual_seed(0)
    drafted = torch.stack([torch.multinomial(q[i], B, replacement=True, generator=g) for i in range(k)], 1)
    n, nxt = verify(p.expand(B, -1, -1), q.expand(B, -1, -1), drafted, g)  # (B,), (B,)
    # P(first draft accepted) = sum_x min(p_1, q_1)(x), literally the overlap of the two distributions
    overlap = torch.minimum(p[0], q[0]).double().sum()
    assert abs((n >= 1).double().mean() - overlap) <= 5 * (overlap * (1 - overlap) / B).sqrt()
    for i in range(k + 1):  # the round's i-th token, where the round got that far, is distributed as p_{i+1}
        reached = n >= i
        token = torch.where(n[reached] > i, drafted[reached, min(i, k - 1)], nxt[reached])
        _assert_frequencies(torch.bincount(token, minlength=8), p[i].double(), f"token {i} of a round")


@pytest.mark.parametrize("k, samples", [(1, 4000), (5, 2000)])
def test_sampled_first_tokens_follow_the_targets_distribution(k, samples):
    """End to end (caches, rollback, the filters): the joint distribution of the first two tokens
    over `samples` calls equals the target's, p(x1) p(x2 | x1) from its own softmax. At ~1-3 ms
    a call this detects shifts of a few percent; the 1% power is the 400k-round test above, on
    the verify() this calls."""
    target, draft = make_model("gpt2", scale=6.0, **TINY), make_model("gpt2", seed=1, scale=15.0, **TINY)
    prompt = [3, 1]
    first = _target_distributions(target, [prompt])[0]  # (V,)
    second = _target_distributions(target, [prompt + [a] for a in range(8)])  # (V, V): row x1
    joint = (first[:, None] * second).flatten()  # (64,) P(x1, x2)
    torch.manual_seed(0)  # seed=None draws from torch's global generator
    counts = torch.zeros(64, dtype=torch.long)
    for _ in range(samples):  # max_new_tokens k + 1: a first round can draft all k tokens
        out = speculative_generate(target, draft, prompt, k + 1, k=k, temperature=TEMPERATURE, top_k=TOP_K)
        counts[out.tokens[0] * 8 + out.tokens[1]] += 1
    _assert_frequencies(counts, joint, "first two tokens")


# --- the command line --------------------------------------------------------------------------------
TEXT = "hello world. the quick brown fox jumps over the lazy dog.\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A target run, a smaller draft run with the same tokenizer, and one with another tokenizer."""
    from minillm.tokenizer.char import CharTokenizer

    root = tmp_path_factory.mktemp("speculative")
    tok, other = CharTokenizer().train(TEXT), CharTokenizer().train(TEXT + "XYZ")
    for name, tokenizer, seed in (("target", tok, 0), ("draft", tok, 1), ("other", other, 1)):
        model = make_model("gpt2", seed=seed, vocab_size=tokenizer.vocab_size, max_seq_len=64,
                           n_layers=2 if name == "target" else 1)
        save_run(root / name, model.config, tokenizer, model_params(model))
    return {name: str(root / name) for name in ("target", "draft", "other")}


def test_cli_draft_prints_the_targets_greedy_text(runs, capsys):
    args = ["sample", "--run", runs["target"], "--prompt", "the ", "--max-new-tokens", "40",
            "--temperature", "0"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert len(set(plain[4:].strip())) >= 4, plain  # a varied text, not one character repeated
    for extra in (["--draft-k", "3"], ["--stream", "--num-samples", "2"]):
        assert main(args + ["--draft", runs["draft"], *extra]) == 0
        expected = plain if "--num-samples" not in extra else plain + "---------------\n" + plain
        assert capsys.readouterr().out == expected
    sampled = args[:-1] + ["0.8", "--seed", "3", "--num-samples", "2", "--draft", runs["draft"]]
    assert main(sampled) == 0
    out = capsys.readouterr().out
    assert out.count("---------------") == 1 and main(sampled) == 0 and capsys.readouterr().out == out


def test_cli_draft_with_another_tokenizer_is_a_one_line_error(runs, capsys):
    args = ["sample", "--run", runs["target"], "--prompt", "the ", "--max-new-tokens", "5"]
    assert main(args + ["--draft", runs["other"]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"minillm sample: error: --draft {runs['other']}: ") and "tokenizer" in err, err
    assert main(args + ["--draft", runs["draft"], "--num-beams", "2"]) == 2
    assert "--draft works with plain sampling only" in capsys.readouterr().err
