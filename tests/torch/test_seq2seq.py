"""The encoder-decoder (minillm.torch.seq2seq) against torch.nn.Transformer with the same weights,
cached decoding against an uncached loop, and the JAX twin against PyTorch."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from minillm import beam
from minillm.checkpoint import CheckpointError, canonical_shapes
from minillm.config import ModelConfig
from minillm.torch.model import model_params, next_token_loss
from minillm.torch.seq2seq import Seq2SeqTransformer, seq2seq_from_params
from minillm.torch.seq2seq_generate import beam_search, greedy, pad_sources
from tests.torch.conftest import one_line_error

BOS, EOS = 1, 2


def config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=20, max_seq_len=16, d_model=32, n_heads=4, n_layers=2, encoder_layers=3, d_ff=48,
                  mlp="gelu_exact", positions="sinusoidal")
    return ModelConfig(**{**fields, **overrides})


def random_model(cfg: ModelConfig, seed: int = 0, std: float = 0.3) -> Seq2SeqTransformer:
    """Weights large enough that every part changes the output (norm gains and biases included)."""
    torch.manual_seed(seed)
    model = Seq2SeqTransformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def load_into_nn_transformer(ref: nn.Transformer, model: Seq2SeqTransformer) -> None:
    """Our canonical weights into nn.Transformer: fused in_proj = [q; k; v], linear1/2 = mlp.up/down,
    norm1/2(/3) in sublayer order, and its final encoder/decoder norms = encoder_norm / norm."""
    sd = model.state_dict()

    def copy(module: nn.Module, name: str) -> None:
        module.weight.data = sd[f"{name}.weight"].clone()
        if module.bias is not None:
            module.bias.data = sd[f"{name}.bias"].clone()

    def attention(mha: nn.MultiheadAttention, name: str) -> None:
        mha.in_proj_weight.data = torch.cat([sd[f"{name}.{p}.weight"] for p in "qkv"])
        if mha.in_proj_bias is not None:
            mha.in_proj_bias.data = torch.cat([sd[f"{name}.{p}.bias"] for p in "qkv"])
        copy(mha.out_proj, f"{name}.o")

    for i, layer in enumerate(ref.encoder.layers):
        attention(layer.self_attn, f"encoder.{i}.attn")
        copy(layer.linear1, f"encoder.{i}.mlp.up"), copy(layer.linear2, f"encoder.{i}.mlp.down")
        copy(layer.norm1, f"encoder.{i}.attn_norm"), copy(layer.norm2, f"encoder.{i}.mlp_norm")
    for i, layer in enumerate(ref.decoder.layers):
        attention(layer.self_attn, f"blocks.{i}.attn")
        attention(layer.multihead_attn, f"blocks.{i}.cross_attn")
        copy(layer.linear1, f"blocks.{i}.mlp.up"), copy(layer.linear2, f"blocks.{i}.mlp.down")
        copy(layer.norm1, f"blocks.{i}.attn_norm"), copy(layer.norm2, f"blocks.{i}.cross_attn_norm")
        copy(layer.norm3, f"blocks.{i}.mlp_norm")
    copy(ref.encoder.norm, "encoder_norm"), copy(ref.decoder.norm, "norm")


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    source, target = torch.randint(3, 20, (3, 9), generator=g), torch.randint(3, 20, (3, 7), generator=g)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 6:], mask[2, 3:] = False, False  # rows 1 and 2 are padded
    return source, target, mask


@pytest.mark.filterwarnings("ignore::UserWarning")  # nn.Transformer's notes on its nested-tensor path
@pytest.mark.parametrize("placement", ["pre", "post"])
@pytest.mark.parametrize("bias", [False, True])
def test_equals_nn_transformer(placement, bias):
    model = random_model(config(norm_placement=placement, bias=bias))
    ref = nn.Transformer(32, 4, 3, 2, 48, dropout=0.0, activation="gelu", batch_first=True,
                         norm_first=placement == "pre", bias=bias).eval()
    load_into_nn_transformer(ref, model)
    source, target, mask = batch()
    with torch.no_grad():
        src_x, tgt_x = model.embed(source, None), model.embed(target, None)
        expected = ref(src_x, tgt_x, tgt_mask=nn.Transformer.generate_square_subsequent_mask(7),
                       src_key_padding_mask=~mask, memory_key_padding_mask=~mask, tgt_is_causal=True)
        memory = ref.encoder(src_x, src_key_padding_mask=~mask)
        torch.testing.assert_close(model.encode(source, mask)[mask], memory[mask], atol=1e-5, rtol=0)
        torch.testing.assert_close(model(source, target, mask), model.lm_head(expected), atol=1e-5, rtol=0)


def test_padding_is_invisible():
    """A source's logits do not depend on how much padding follows it, nor on the pad ids."""
    model = random_model(config(positions="learned"))
    source, target, _ = batch()
    with torch.no_grad():
        alone = model(source[:1, :5], target[:1])
        padded = torch.cat([source[:1, :5], torch.randint(3, 20, (1, 4))], dim=1)
        mask = torch.arange(9)[None] < 5
        torch.testing.assert_close(model(padded, target[:1], mask), alone, atol=1e-5, rtol=0)


def reversal(generator: torch.Generator, rows: int = 32, length: int = 6):
    """Random sources (ids 3..19) and their reversal: target_in = bos + answer, target_out = answer + eos."""
    source = torch.randint(3, 20, (rows, length), generator=generator)
    answer = source.flip(1)
    return (source, torch.cat([torch.full((rows, 1), BOS), answer], 1),
            torch.cat([answer, torch.full((rows, 1), EOS)], 1))


@pytest.mark.parametrize("positions", ["sinusoidal", "learned"])
def test_the_decoder_reads_the_source(positions):
    """Issue 17: the sinusoids at amplitude 1 beside GPT-2-initialized embeddings (std 0.02) left the
    encoder only positions to see, so the decoder learned the answers' language but never the source:
    trained on reversal, its loss with every source swapped for another's equalled its loss with the
    right one (2.438 both, here). Now the right sources are worth more than 1 nat per token."""
    torch.manual_seed(0)
    model = Seq2SeqTransformer(config(positions=positions, n_layers=1, encoder_layers=1))  # the GPT-2 init
    source = reversal(torch.Generator().manual_seed(5), rows=8)[0]
    with torch.no_grad():
        memory = model.encode(source)  # (8, 6, D)
    spread = memory.std(0).norm(dim=-1) / memory.norm(dim=-1).mean(0)  # (6,) across sources per position
    assert float(spread.mean()) > 0.3  # was 0.04: every source encoded alike
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 20))
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        source, target_in, target_out = reversal(generator)
        loss = next_token_loss(model(source, target_in), target_out)
        opt.zero_grad(), loss.backward(), opt.step(), warmup.step()
    source, target_in, target_out = reversal(torch.Generator().manual_seed(9), rows=256)
    with torch.no_grad():
        right = float(next_token_loss(model.eval()(source, target_in), target_out))
        swapped = float(next_token_loss(model(source.roll(1, 0), target_in), target_out))
    assert swapped - right > 1.0, (right, swapped)


def uncached_greedy(model, source: list[int], steps: int) -> list[int]:
    """The reference: rerun encoder and decoder on the whole prefix for every new token."""
    out = [BOS]
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([source]), torch.tensor([out]))
            out.append(int(logits[0, -1].argmax()))
            if out[-1] == EOS:
                return out[1:-1]
    return out[1:]


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_cached_greedy_equals_uncached(placement):
    model = random_model(config(norm_placement=placement, n_kv_heads=2), std=0.5)
    sources = [[5, 6, 7, 8, 9, 10], [11, 3], [4, 4, 12, 13]]  # different lengths: padded together
    expected = [uncached_greedy(model, s, 12) for s in sources]
    assert greedy(model, sources, 12, BOS, EOS) == expected
    assert any(len(e) > 3 for e in expected)  # long enough to exercise the caches
    assert beam_search(model, sources[0], 12, BOS, EOS, num_beams=1) == expected[0]


def test_decoding_encodes_once_and_feeds_one_token_per_step(monkeypatch):
    model = random_model(config(), seed=3, std=0.5)
    calls, embedded = [], []
    for name in ("encode", "cross_kv"):
        original = getattr(model, name)
        monkeypatch.setattr(model, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    model.tok_emb.register_forward_hook(lambda module, args, out: embedded.append(tuple(args[0].shape)))
    greedy(model, [[5, 6, 7], [8, 9]], 8, BOS, EOS)
    assert calls == ["encode", "cross_kv"] and embedded[0] == (2, 3)
    assert len(embedded) > 3 and set(embedded[1:]) == {(2, 1)}  # the cache holds the rest
    calls.clear(), embedded.clear()
    beam_search(model, [5, 6, 7], 8, BOS, EOS, num_beams=3)
    assert calls == ["encode", "cross_kv"] and embedded[0] == (1, 3) and set(embedded[1:]) == {(3, 1)}


def sequence_score(model, source, output, length_penalty=1.0) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([source]), torch.tensor([[BOS] + output]))
    logp = torch.log_softmax(logits[0].double(), -1)
    tokens = output + [EOS] if len(output) < 12 else output
    total = sum(float(logp[i, t]) for i, t in enumerate(tokens))
    return total / len(tokens) ** length_penalty


def test_beam_search_finds_a_better_sequence_than_greedy():
    model = random_model(config(), seed=3, std=0.5)
    source = [5, 6, 7, 8]
    best = beam_search(model, source, 12, BOS, EOS, num_beams=4)
    greedy_out = greedy(model, [source], 12, BOS, EOS)[0]
    assert sequence_score(model, source, best) >= sequence_score(model, source, greedy_out) - 1e-6


@pytest.mark.parametrize("num_beams", [2, 4])
def test_cached_beam_search_equals_uncached(num_beams):
    """minillm.beam.search driven by a model that reruns every hypothesis in full: the same output."""
    model = random_model(config(n_kv_heads=2), seed=3, std=0.5)
    source = [5, 6, 7, 8, 9]
    hypotheses = [[BOS]] * num_beams

    def log_probs() -> np.ndarray:
        with torch.no_grad():
            logits = model(torch.tensor([source] * num_beams), torch.tensor(hypotheses))[:, -1]
        return torch.log_softmax(logits.float(), -1).numpy()

    def extend(rows, tokens):
        nonlocal hypotheses
        hypotheses = [hypotheses[r] + [int(t)] for r, t in zip(rows, tokens)]
        return log_probs()

    expected = beam.search(log_probs(), extend, 12, eos_token_ids=[EOS])
    expected = expected[: expected.index(EOS)] if EOS in expected else expected
    assert beam_search(model, source, 12, BOS, EOS, num_beams=num_beams) == expected
    assert expected != greedy(model, [source], 12, BOS, EOS)[0]  # the beams did change the answer


def test_checkpoint_names_and_round_trip():
    cfg = config(bias=True, tie_embeddings=False)
    model = random_model(cfg)
    params = model_params(model)
    assert {k: tuple(v.shape) for k, v in params.items()} == canonical_shapes(cfg)
    source, target, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(seq2seq_from_params(cfg, params)(source, target, mask),
                                   model(source, target, mask), atol=0, rtol=0)
    with pytest.raises(CheckpointError, match="missing"):
        seq2seq_from_params(cfg, {k: v for k, v in params.items() if not k.startswith("encoder.")})


def test_config_fields():
    assert "encoder_layers" not in ModelConfig().to_dict()  # decoder-only config.json files unchanged
    assert config(norm_placement="post").to_dict()["norm_placement"] == "post"
    assert ModelConfig.from_dict(config().to_dict()) == config()
    for bad, needle in ((dict(encoder_layers=-1), "encoder_layers"), (dict(positions="rope"), "positions"),
                        (dict(norm_placement="mid"), "norm_placement")):
        with pytest.raises(ValueError, match=needle):
            config(**bad)
    with pytest.raises(ValueError, match="norm_placement"):
        ModelConfig(norm_placement="post")
    with pytest.raises(ValueError, match="encoder_layers"):
        Seq2SeqTransformer(ModelConfig())
    with pytest.raises(ValueError, match="max_seq_len"):
        greedy(random_model(config()), [[3] * 17], 4, BOS, EOS)
    assert pad_sources([[3, 4], [5]])[1].tolist() == [[True, True], [True, False]]


# --- the JAX twin ---------------------------------------------------------------------------------
@pytest.mark.parametrize("placement", ["pre", "post"])
def test_jax_equals_torch(placement):
    jax = pytest.importorskip("jax")
    from minillm.jax import seq2seq as jax_seq2seq
    from minillm.jax.model import params_from_canonical

    positions = "learned" if placement == "pre" else "sinusoidal"  # both kinds, at SINUSOID_SCALE too
    cfg = config(norm_placement=placement, n_kv_heads=2, bias=True, mlp="swiglu", positions=positions)
    model = random_model(cfg, std=0.5)
    params = params_from_canonical(model_params(model), cfg)
    source, target, mask = batch()
    with torch.no_grad():
        expected = model(source, target, mask).numpy()
    forward = jax.jit(lambda p, s, t, m: jax_seq2seq.forward(p, cfg, s, t, m))  # eager: an op-by-op compile
    logits = forward(params, source.numpy(), target.numpy(), mask.numpy())
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5, rtol=0)
    sources = [[5, 6, 7, 8, 9, 10], [11, 3], [4, 4, 12, 13]]
    assert jax_seq2seq.greedy(params, cfg, sources, 10, BOS, EOS) == greedy(model, sources, 10, BOS, EOS)
    if placement == "pre":  # there the beams find another answer than greedy decoding
        expected = beam_search(model, sources[0], 10, BOS, EOS, 3)
        assert jax_seq2seq.beam_search(params, cfg, sources[0], 10, BOS, EOS, 3) == expected
        assert expected != greedy(model, sources[:1], 10, BOS, EOS)[0]
    assert math.isfinite(float(np.abs(np.asarray(logits)).max()))


# --- minillm train / sample / eval --tasks on a task set -----------------------------------------
LINES = ["ab cd ef", "gh ij", "kl mn op", "qr st", "uv wx yz"]  # the first is held out for validation


def test_train_sample_eval_cli(tmp_path, capsys):
    from minillm.cli import main as cli
    from minillm.data.seq2seq_tasks import example
    from minillm.data.tasks import write_jsonl

    write_jsonl([example(line) for line in LINES], tmp_path / "task" / "train.jsonl")
    write_jsonl([example(line) for line in LINES[1:]], tmp_path / "task" / "test.jsonl")
    run = tmp_path / "run"
    (tmp_path / "c.toml").write_text(f"""
data_dir = "{tmp_path / 'task'}"
out_dir = "{run}"
batch_size = 8
block_size = 16
max_steps = 250
eval_interval = 250
eval_batches = 1
log_interval = 50
lr = 1e-2
min_lr = 1e-3
warmup_steps = 10
dtype = "float32"
[model]
vocab_size = 66
max_seq_len = 16
d_model = 32
n_layers = 1
encoder_layers = 1
n_heads = 2
positions = "learned"
mlp = "gelu_exact"
""")
    assert cli(["train", "--config", str(tmp_path / "c.toml"), "--quiet"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in rows if r.get("train_loss") is not None]
    assert losses[-1] < 0.5 * losses[0]
    assert json.loads((run / "config.json").read_text())["model"]["encoder_layers"] == 1
    capsys.readouterr()
    assert cli(["sample", "--run", str(run), "--prompt", "kl mn op", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.strip() == "op mn kl"
    assert cli(["sample", "--run", str(run), "--prompt", "kl mn op"]) == 0  # default 200 > max_seq_len 16
    out = capsys.readouterr()
    assert out.out.strip() == "op mn kl" and "capped at the model's max_seq_len=16" in out.err
    assert cli(["eval", "--run", str(run), "--tasks", str(tmp_path / "task"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["total"] == 4 and result["correct"] == 4  # the four lines it was trained on
    one_line_error(capsys, ["sample", "--run", str(run), "--prompt", "ab", "--num-samples", "2"],
                   "encoder-decoder")
    one_line_error(capsys, ["eval", "--run", str(run), "--data", str(tmp_path)], "encoder_layers=1")
