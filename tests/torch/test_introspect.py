"""minillm.torch.introspect: attention maps and the logit lens, against a model built by hand to
attend to the previous token, and against transformers' own attentions and hidden states."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minillm.config import ModelConfig
from minillm.interop.hf import to_transformers
from minillm.torch import introspect
from minillm.torch.model import Transformer
from tests.conftest import make_model, random_prompt

T = 8  # positions of the hand-built model


def previous_token_model(scale: float = 10.0) -> Transformer:
    """One block, learned positions, two heads of head_dim T. The embeddings are one-hot position
    codes (token embeddings zero), RMSNorm turns e_p into sqrt(2T) e_p; head 0's keys are that code
    and its queries the code shifted down by one (q_i = scale * x_{i+1}), so q_p · k_j is large
    exactly when j = p - 1: head 0 attends to the previous token. Head 1's queries are zero: its
    scores are all equal, so it spreads evenly over the causal prefix."""
    config = ModelConfig(vocab_size=14, max_seq_len=T, d_model=2 * T, n_layers=1, n_heads=2, norm="rmsnorm",
                         positions="learned", bias=False, tie_embeddings=False)
    model = Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.blocks[0].attn_norm.weight.fill_(1.0)
        model.norm.weight.fill_(1.0)
        model.pos_emb.weight[:, :T] = torch.eye(T)  # position p -> e_p
        attn = model.blocks[0].attn
        attn.k.weight[:T, :T] = torch.eye(T)  # head 0: k_j = code of j
        attn.q.weight[:T, :T] = scale * torch.eye(T).roll(1, dims=1)  # q_i = scale * x_{i+1}: q_p ∝ e_{p-1}
        model.lm_head.weight.normal_(0.0, 1.0)  # any logits will do here
    return model


def test_a_head_built_to_attend_to_the_previous_token_shows_the_off_diagonal_line():
    maps = introspect.attention_maps(previous_token_model(), list(range(T)))
    assert maps.shape == (1, 2, T, T) and maps.dtype == np.float32
    head0, head1 = maps[0, 0], maps[0, 1]
    assert head0.argmax(-1).tolist() == [0] + list(range(T - 1))  # row p peaks at key p - 1
    assert all(head0[p, p - 1] > 0.99 for p in range(1, T))
    even = np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]  # 1/(p+1) on keys 0..p, 0 after
    np.testing.assert_allclose(head1, even, atol=1e-6)


@pytest.mark.parametrize("style", ["gpt2", "llama-gqa"])
def test_attention_maps_equal_transformers_eager_attentions(style):
    model = make_model(style, seed=3, scale=2.0)
    ids = random_prompt(20, seed=4)
    hf = to_transformers(model)
    hf.config._attn_implementation = "eager"  # the path that materialises the weights
    with torch.no_grad():
        theirs = hf(torch.tensor([ids]), output_attentions=True).attentions  # L x (1, H, T, T)
    ours = introspect.attention_maps(model, ids)
    assert ours.shape == (model.config.n_layers, model.config.n_heads, 20, 20)
    for layer, weights in enumerate(theirs):
        np.testing.assert_allclose(ours[layer], weights[0].numpy(), atol=2e-6)


def _norm_by_hand(h: torch.Tensor, hf, style: str) -> torch.Tensor:
    """The final norm written out in float64 with transformers' weights: RMSNorm for LLaMA,
    LayerNorm (with bias) for GPT-2."""
    h = h.double()
    if style == "gpt2":
        ln = hf.transformer.ln_f
        centred = h - h.mean(-1, keepdim=True)
        return centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + ln.eps) * ln.weight.double() \
            + ln.bias.double()
    norm = hf.model.norm
    return h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight.double()


@pytest.mark.parametrize("style", ["gpt2", "llama-gqa"])
def test_logit_lens_equals_final_norm_and_head_on_transformers_hidden_states(style):
    model = make_model(style, seed=5, scale=2.0)
    ids = random_prompt(16, seed=6)
    hf = to_transformers(model)
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_hidden_states=True)
        states = out.hidden_states  # L + 1: embeddings, after each block; the last already normed by HF
        head = hf.lm_head.weight.double()
        reference = [_norm_by_hand(h[0], hf, style) @ head.T for h in states[:-1]]
        reference = torch.stack(reference + [states[-1][0].double() @ head.T])  # (L + 1, T, V)
    torch.testing.assert_close(reference[-1], out.logits[0].double(), atol=1e-4, rtol=0)  # HF's last: normed
    ours = introspect.lens_logits(model, ids)
    assert ours.shape == (model.config.n_layers + 1, 16, model.config.vocab_size)
    torch.testing.assert_close(ours.double(), reference, atol=2e-4, rtol=1e-5)
    top, probs = introspect.logit_lens(model, ids, top_k=3)
    ref_probs, ref_top = torch.softmax(reference, -1).topk(3, dim=-1)
    np.testing.assert_array_equal(top, ref_top.numpy())
    np.testing.assert_allclose(probs, ref_probs.numpy(), atol=1e-4)
    assert introspect.lens_rows(model) == ["embed", "block 0", "block 1"]


def test_logit_lens_skips_padded_vocabulary_and_checks_top_k():
    model = make_model("gpt2", seed=1)
    top, probs = introspect.logit_lens(model, [1, 2, 3], top_k=5, vocab_size=10)
    assert top.shape == (3, 3, 5) and top.max() < 10
    assert (probs.sum(-1) <= 1.0 + 1e-6).all() and (np.diff(probs, axis=-1) <= 0).all()  # most likely first
    with pytest.raises(ValueError, match="--top-k must be >= 1"):
        introspect.logit_lens(model, [1, 2], top_k=0)


def test_next_token_probs_equal_the_model_run_on_each_prefix():
    model = make_model("llama-gqa", seed=2)
    prompt, output = [3, 4, 5], [6, 7, 8, 9]
    probs = introspect.next_token_probs(model, prompt, output)
    assert probs.shape == (4, 61) and probs.dtype == np.float64
    for i in range(len(output)):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + output[:i]]))[0, -1].double()  # one prefix at a time
        np.testing.assert_allclose(probs[i], torch.softmax(logits, -1).numpy(), atol=1e-6)
    padded = introspect.next_token_probs(model, prompt, output, vocab_size=20)
    assert padded.shape == (4, 20) and np.allclose(padded.sum(-1), 1.0)
    with pytest.raises(ValueError, match="max_seq_len"):
        introspect.next_token_probs(model, list(range(40)), list(range(20)))


def test_unsupported_architectures_are_named():
    linear = ModelConfig(**{**dict(vocab_size=61, max_seq_len=48, d_model=32, n_layers=2, n_heads=4),
                            "attention": "linear"})
    with pytest.raises(ValueError, match="attention='linear'"):
        introspect.check_inspectable(linear, "attention maps")
    introspect.check_inspectable(linear, "the logit lens")  # the lens needs no attention weights
    seq2seq = ModelConfig(vocab_size=61, max_seq_len=48, d_model=32, n_layers=2, n_heads=4, encoder_layers=2)
    with pytest.raises(ValueError, match="encoder_layers=2: an encoder-decoder"):
        introspect.check_inspectable(seq2seq, "the logit lens")
