"""Sliding-window attention (Mistral): the mask, the ring-buffer KV cache whose memory stays at the
window however long the output, and equality with transformers' MistralForCausalLM (same weights,
same window): logits, and greedy tokens far beyond the window."""

import pytest
import torch

from minillm.config import ModelConfig
from minillm.torch.generate import generate
from minillm.torch.kv_cache import EagerBatchCache, RingKVCache, make_model_caches
from minillm.torch.layers import attention_math, sdpa
from minillm.torch.masks import attention_mask, window_mask
from tests.conftest import make_model, random_prompt

W = 6  # the window of every model here; sequences run to 5-10x it


def test_window_mask_is_the_last_w_keys_including_itself():
    expected = torch.tensor([[1, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0],
                             [1, 1, 1, 0, 0],
                             [0, 1, 1, 1, 0],
                             [0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(window_mask(torch.arange(5), torch.arange(5), 3), expected)
    assert torch.equal(window_mask(torch.arange(5), torch.arange(5), None), torch.ones(5, 5).tril().bool())


def test_window_attention_equals_a_float64_loop():
    """The model's mask through both attention paths (fused kernel, plain maths) against softmax
    over keys max(0, i - W + 1) .. i written out per query in float64."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 20, 8, dtype=torch.float64) for _ in range(3))
    mask = attention_mask(ModelConfig(attention_window=W), 20, None, None, None, torch.device("cpu"))
    expected = torch.zeros_like(q)
    for h in range(2):
        for i in range(20):
            js = list(range(max(0, i - W + 1), i + 1))
            scores = torch.stack([q[0, h, i] @ k[0, h, j] for j in js]) / 8 ** 0.5
            weights = scores.exp() / scores.exp().sum()
            expected[0, h, i] = sum(w * v[0, h, j] for w, j in zip(weights, js))
    fused = sdpa(q.float(), k.float(), v.float(), mask, 0.0, False)
    plain, _ = attention_math(q.float(), k.float(), v.float(), mask)
    assert (fused.double() - expected).abs().max().item() < 1e-5
    assert (plain.double() - expected).abs().max().item() < 1e-5


def test_ring_cache_decoding_equals_the_full_forward_far_beyond_the_window():
    model = make_model("llama-gqa", attention_window=W, max_seq_len=64)
    x = torch.tensor([random_prompt(50)] * 2)
    with torch.no_grad():
        full = model(x)
        caches = make_model_caches(model.config, 2, 64)
        assert all(isinstance(c, RingKVCache) for c in caches)
        chunks = [(0, 9), (9, 10), (10, 30), *[(t, t + 1) for t in range(30, 50)]]  # a chunk 3x the window
        steps = torch.cat([model(x[:, a:b], torch.arange(a, b), kv_caches=caches) for a, b in chunks], 1)
    assert (steps - full).abs().max().item() < 1e-5


def test_decode_memory_is_constant_once_the_window_is_full():
    model = make_model("llama-gqa", attention_window=W, max_seq_len=256)
    cache = EagerBatchCache(model, 256, 61)
    sizes, pointers = [], []
    with torch.no_grad():
        cache.prefill([random_prompt(3)])
        for t in range(10 * W):
            cache.decode(torch.tensor([t % 61]))
            layer = cache.rows[0][0]
            sizes.append(sum(c.k.nbytes + c.v.nbytes + c.positions.nbytes for c in cache.rows[0]))
            pointers.append((layer.k.data_ptr(), layer.v.data_ptr()))
    assert len(set(sizes)) == 1 and len(set(pointers)) == 1  # the same buffers, never grown or replaced
    c = model.config
    kv = c.n_layers * 2 * c.n_kv_heads * W * c.head_dim * 4  # float32 K and V of W slots
    assert sizes[0] == kv + model.config.n_layers * W * 8  # + one int64 position per slot
    # a plain KV cache for the same decode would hold every token: 10x the window and growing
    assert layer.positions.sort().values.tolist() == list(range(3 + 10 * W - W, 3 + 10 * W))


def test_config_field_is_validated_and_omitted_at_its_default():
    with pytest.raises(ValueError, match="attention_window"):
        ModelConfig(attention_window=0)
    with pytest.raises(ValueError, match="attention_window=4 needs attention='softmax'"):
        ModelConfig(attention_window=4, attention="linear", positions="none")
    assert "attention_window" not in ModelConfig().to_dict()
    assert ModelConfig.from_dict(ModelConfig(attention_window=5).to_dict()).attention_window == 5


# --- transformers' MistralForCausalLM --------------------------------------------------------------
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def mistral():
    """A random MistralForCausalLM (sliding_window=W, eager attention) and ours imported from it."""
    from minillm.interop import hf
    from minillm.torch.model import Transformer

    torch.manual_seed(0)
    config = transformers.MistralConfig(
        vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=W, tie_word_embeddings=False,
        rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None)  # no eos: no early stop
    theirs = transformers.MistralForCausalLM._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in theirs.parameters():  # peaked distributions: greedy paths without near-ties
            p.copy_(torch.randn_like(p) * (0.5 if p.dim() == 2 else 0.1) + (p.dim() == 1))
    our_config, state = hf.from_transformers(theirs)
    ours = Transformer(our_config).eval()
    ours.load_state_dict(state)
    return theirs, ours


def test_import_reads_the_window(mistral):
    _, ours = mistral
    assert ours.config.attention_window == W and ours.config.max_seq_len == 128


def test_logits_equal_mistral_beyond_the_window(mistral):
    theirs, ours = mistral
    x = torch.tensor([random_prompt(8 * W, seed=1)])
    with torch.no_grad():
        a, b = ours(x), theirs(x).logits
    assert (a - b).abs().max().item() < 1e-5
    with torch.no_grad():  # without the window Mistral would compute something else: the test can fail
        unwindowed = ours.__class__(ModelConfig(**{**ours.config.to_dict(), "attention_window": None})).eval()
        unwindowed.load_state_dict(ours.state_dict())
        assert (unwindowed(x) - b).abs().max().item() > 1e-2


def test_greedy_tokens_equal_mistral_far_beyond_the_window(mistral):
    theirs, ours = mistral
    prompt = random_prompt(4, seed=2)
    with torch.no_grad():
        expected = theirs.generate(torch.tensor([prompt]), max_new_tokens=8 * W, do_sample=False,
                                   pad_token_id=0)[0, len(prompt):].tolist()
    got = generate(ours, prompt, 8 * W, temperature=0)
    assert got == expected
    assert len(set(got)) > 3  # not a constant stream


def test_beam_search_equals_mistrals_far_beyond_the_window(mistral):
    """Beam search decodes a windowed model on the model itself (the packed decoder can't)."""
    from minillm.torch.beam import beam_search

    theirs, ours = mistral
    prompt = random_prompt(4, seed=3)
    with torch.no_grad():
        expected = theirs.generate(torch.tensor([prompt]), max_new_tokens=3 * W, num_beams=3, do_sample=False,
                                   length_penalty=1.0, pad_token_id=0)[0, len(prompt):].tolist()
    assert beam_search(ours, prompt, 3 * W, num_beams=3) == expected


def test_export_writes_a_mistral_config_with_the_window(mistral):
    from minillm.interop import hf

    theirs, ours = mistral
    exported = hf.to_transformers(ours)
    assert type(exported).__name__ == "MistralForCausalLM" and exported.config.sliding_window == W
    x = torch.tensor([random_prompt(5 * W, seed=3)])
    exported.config._attn_implementation = "eager"
    with torch.no_grad():
        assert (exported(x).logits - theirs(x).logits).abs().max().item() < 1e-5


def test_the_packed_decoder_refuses_what_it_cannot_compute():
    from minillm.torch.packed import packed_copy

    with pytest.raises(ValueError, match="attention_window=6"):
        packed_copy(make_model("llama-gqa", attention_window=W))
    model = make_model("llama-gqa", attention_window=W, max_seq_len=64)
    prompts = [random_prompt(3, seed=5), random_prompt(11, seed=6)]  # generate falls back to the model itself
    alone = [generate(model, p, 30, temperature=0) for p in prompts]
    assert generate(model, prompts, 30, temperature=0) == alone


@pytest.mark.parametrize("fields", [dict(attention_window=W), dict(attention="linear", positions="none")])
def test_eager_cache_reorder_keeps_each_row_its_own_state(fields):
    """Beam search's step: rows reordered (one kept twice) then decoded, as if each were alone."""
    model = make_model("llama-gqa", max_seq_len=64, **fields)
    prompts = [random_prompt(9, seed=7), random_prompt(4, seed=8)]
    cache = EagerBatchCache(model, 64, 61)
    with torch.no_grad():
        cache.prefill(prompts)
        cache.reorder(torch.tensor([1, 0, 1]))
        got = [cache.decode(torch.tensor([t, t + 1, t + 2])) for t in range(12)]
        for row, (prompt, offset) in enumerate([(prompts[1], 0), (prompts[0], 1), (prompts[1], 2)]):
            ids = list(prompt) + [t + offset for t in range(12)]
            full = model(torch.tensor([ids]))[0, len(prompt):]  # (12, V): after each decoded token
            assert (torch.stack([g[row] for g in got]) - full).abs().max().item() < 1e-5
