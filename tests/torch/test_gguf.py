"""GGUF export read back with the `gguf` package's own reader (no llama.cpp needed): every tensor in
llama.cpp's names and layout, the hyperparameters, the tokenizer metadata, f16 and q8_0 encodings,
clear errors, atomic writes; and `import_gguf` back to a run directory.
tests/torch/test_gguf_llama_cpp.py runs the exported files in llama.cpp itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minillm.checkpoint import load_run, save_run
from minillm.tokenizer import chat
from minillm.tokenizer.bpe import GPT4_SPLIT_PATTERN, BPETokenizer
from minillm.tokenizer.char import CharTokenizer
from minillm.tokenizer.hf import bytes_to_unicode
from tests.conftest import make_model
from tests.torch.conftest import one_line_error

gguf = pytest.importorskip("gguf")
from minillm.cli import main as cli  # noqa: E402
from minillm.interop import gguf_tokenizer  # noqa: E402  (these two need the gguf package)
from minillm.interop.gguf import export_gguf, import_gguf  # noqa: E402

TEXT = "".join(f"{a} saw {n} {b}s by the {c}, didn't {a}? 'Yes' said {a}.\n"
               for a in ("Anne", "Bob", "Cleo") for n in (2, 17, 365) for b in ("cat", "moon")
               for c in ("gate", "river")) * 3
LLAMA = dict(d_model=64, n_heads=4, n_kv_heads=2, max_seq_len=96, rope_theta=50000.0, tie_embeddings=False)


def _run(tmp_path, style: str, tokenizer=None, pad: int = 3, **overrides):
    """A run directory: a random peaked model (tests.conftest.make_model) and a BPE tokenizer."""
    tok = tokenizer or BPETokenizer().train(TEXT, 330)
    model = make_model(style, vocab_size=tok.vocab_size + pad, **overrides)
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    save_run(tmp_path / "run", model.config, tok, sd)
    return tmp_path / "run", model.config, tok, sd


def _read(path) -> tuple[dict, dict]:
    """(metadata key -> value, tensor name -> ReaderTensor) of a GGUF file."""
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


def _pairs_order(n_heads: int, head_dim: int) -> list[int]:
    """Row j of each head in adjacent-pair layout comes from row j//2 (+ head_dim/2 if j is odd)."""
    return [h * head_dim + j // 2 + (j % 2) * head_dim // 2 for h in range(n_heads) for j in range(head_dim)]


def test_llama_f32_round_trips_every_tensor_and_hyperparameter(tmp_path):
    run, cfg, _, sd = _run(tmp_path, "llama-gqa", **LLAMA, bias=True)
    export_gguf(run, tmp_path / "m.gguf")
    fields, tensors = _read(tmp_path / "m.gguf")
    assert {k: v for k, v in fields.items() if k.startswith("llama.")} == {
        "llama.context_length": 96, "llama.embedding_length": 64, "llama.block_count": 2,
        "llama.feed_forward_length": cfg.d_ff, "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2, "llama.vocab_size": cfg.vocab_size,
        "llama.attention.layer_norm_rms_epsilon": pytest.approx(1e-5), "llama.rope.freq_base": 50000.0,
        "llama.rope.dimension_count": 16}
    assert fields["general.architecture"] == "llama" and fields["general.file_type"] == 0
    expected = {"token_embd.weight": "tok_emb.weight", "output.weight": "lm_head.weight",
                "output_norm.weight": "norm.weight"}
    block = {"attn_norm.weight": "attn_norm.weight", "ffn_norm.weight": "mlp_norm.weight",
             **{f"{g}.{p}": f"{o}.{p}" for g, o in (("attn_q", "attn.q"), ("attn_k", "attn.k"),
                                                      ("attn_v", "attn.v"), ("attn_output", "attn.o"),
                                                      ("ffn_gate", "mlp.gate"), ("ffn_up", "mlp.up"),
                                                      ("ffn_down", "mlp.down")) for p in ("weight", "bias")}}
    for i in range(cfg.n_layers):
        expected.update({f"blk.{i}.{g}": f"blocks.{i}.{o}" for g, o in block.items()})
    assert set(tensors) == set(expected) and len(expected) == len(sd)
    heads = {"attn_q": cfg.n_heads, "attn_k": cfg.n_kv_heads}
    for name, ours in expected.items():
        t = tensors[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert [int(n) for n in t.shape] == list(reversed(sd[ours].shape))  # ggml lists dims innermost first
        kind = name.split(".")[-2]
        want = sd[ours][_pairs_order(heads[kind], cfg.head_dim)] if kind in heads else sd[ours]
        np.testing.assert_array_equal(np.asarray(t.data).reshape(sd[ours].shape), want)


def _rope(x: np.ndarray, theta: float, interleaved: bool) -> np.ndarray:
    """RoPE in float64 on (T, head_dim): rotate-half pairs (j, j + d/2), or adjacent pairs (2j, 2j+1)."""
    T, d = x.shape
    angle = np.arange(T)[:, None] * theta ** (-np.arange(0, d, 2) / d)[None, :]  # (T, d/2)
    first, second = (x[:, 0::2], x[:, 1::2]) if interleaved else (x[:, : d // 2], x[:, d // 2:])
    rotated = (first * np.cos(angle) - second * np.sin(angle), first * np.sin(angle) + second * np.cos(angle))
    out = np.empty_like(x)
    if interleaved:
        out[:, 0::2], out[:, 1::2] = rotated
    else:
        out[:, : d // 2], out[:, d // 2:] = rotated
    return out


def test_interleaved_q_k_give_our_attention_scores_under_llama_cpp_rope(tmp_path):
    """Permuted W_q, W_k under adjacent-pair RoPE (llama.cpp's "llama") score as ours under rotate-half."""
    run, cfg, _, sd = _run(tmp_path, "llama-gqa", **LLAMA)
    export_gguf(run, tmp_path / "m.gguf")
    _, tensors = _read(tmp_path / "m.gguf")
    x = np.random.default_rng(0).standard_normal((12, cfg.d_model))
    d, group = cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    for kind, interleaved in (("ours", False), ("gguf", True)):
        if kind == "ours":
            wq, wk = sd["blocks.1.attn.q.weight"], sd["blocks.1.attn.k.weight"]
        else:
            wq, wk = (np.asarray(tensors[f"blk.1.attn_{n}.weight"].data, dtype=np.float64) for n in "qk")
        q, k = x @ wq.T.astype(np.float64), x @ wk.T.astype(np.float64)
        scores = np.stack([_rope(q[:, h * d:(h + 1) * d], cfg.rope_theta, interleaved)
                           @ _rope(k[:, (h // group) * d:(h // group + 1) * d], cfg.rope_theta, interleaved).T
                           for h in range(cfg.n_heads)])
        if kind == "ours":
            ours = scores
    np.testing.assert_allclose(scores, ours, rtol=1e-9, atol=1e-9)
    assert np.abs(ours).max() > 1.0  # the check compares real, non-trivial scores


def test_tokenizer_metadata(tmp_path):
    run, cfg, tok, _ = _run(tmp_path, "llama-gqa", **LLAMA)
    export_gguf(run, tmp_path / "m.gguf")
    fields, _ = _read(tmp_path / "m.gguf")
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "dbrx"
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == cfg.vocab_size == tok.vocab_size + 3
    char_byte = {c: b for b, c in bytes_to_unicode().items()}
    n_ordinary = tok.vocab_size - len(tok.special_tokens)
    for i in range(n_ordinary):  # each token's text spells its bytes in GPT-2's printable alphabet
        assert bytes(char_byte[c] for c in tokens[i]) == tok.token_bytes(i) and types[i] == 1
    specials = {s: i for s, i in tok.special_tokens.items()}
    assert {tokens[i]: i for i in range(n_ordinary, tok.vocab_size)} == specials
    assert types[n_ordinary:] == [3] * len(specials) + [5] * 3  # control, then unused padding
    assert tokens[tok.vocab_size:] == [f"[PAD{i}]" for i in range(tok.vocab_size, cfg.vocab_size)]
    merges = fields["tokenizer.ggml.merges"]
    assert len(merges) == len(tok.merges) and len(merges) > 20
    for k, merge in enumerate(merges):
        left, right = merge.split(" ")
        assert tokens.index(left + right) == 256 + k  # merge k makes id 256 + k, as our BPE
        assert (tokens.index(left), tokens.index(right)) == tok.merges[k]
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.padding_token_id"]) == (specials["<|bos|>"], specials["<|eos|>"],
                                                            specials["<|pad|>"])
    assert fields["tokenizer.ggml.add_bos_token"] is False and fields["tokenizer.ggml.add_eos_token"] is False


def test_chat_template_renders_our_ids_in_plain_jinja(tmp_path):
    jinja2 = pytest.importorskip("jinja2")
    run, _, tok, _ = _run(tmp_path, "llama-gqa", **LLAMA)
    export_gguf(run, tmp_path / "m.gguf")
    fields, _ = _read(tmp_path / "m.gguf")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who saw 17 cats?"},
                {"role": "assistant", "content": "Anne did."}, {"role": "user", "content": "Where?"}]
    text = jinja2.Environment().from_string(fields["tokenizer.chat_template"]).render(
        messages=messages, add_generation_prompt=True)
    assert tok.encode(text, allowed_special="all") == chat.render(tok, messages, add_generation_prompt=True)


def test_gpt2_style_run_fuses_qkv(tmp_path):
    tok = BPETokenizer("gpt2").train(TEXT, 300)
    run, cfg, _, sd = _run(tmp_path, "gpt2", tokenizer=tok, pad=0, max_seq_len=40)
    export_gguf(run, tmp_path / "m.gguf")
    fields, tensors = _read(tmp_path / "m.gguf")
    assert fields["general.architecture"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["gpt2.attention.layer_norm_epsilon"] == pytest.approx(cfg.norm_eps)
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    np.testing.assert_array_equal(tensors["position_embd.weight"].data, sd["pos_emb.weight"])
    D = cfg.d_model
    for part in ("weight", "bias"):
        qkv = np.asarray(tensors[f"blk.1.attn_qkv.{part}"].data)
        for j, n in enumerate("qkv"):
            np.testing.assert_array_equal(qkv[j * D:(j + 1) * D], sd[f"blocks.1.attn.{n}.{part}"])
    np.testing.assert_array_equal(tensors["blk.0.ffn_norm.bias"].data, sd["blocks.0.mlp_norm.bias"])


def test_f16_halves_matrices_and_keeps_norms_in_f32(tmp_path):
    run, _, _, sd = _run(tmp_path, "llama-gqa", **LLAMA)
    export_gguf(run, tmp_path / "m.gguf", dtype="f16")
    fields, tensors = _read(tmp_path / "m.gguf")
    assert fields["general.file_type"] == 1
    F16, F32 = gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32
    assert tensors["blk.0.attn_norm.weight"].tensor_type == F32
    for name, ours in (("token_embd.weight", "tok_emb.weight"),
                       ("blk.1.ffn_down.weight", "blocks.1.mlp.down.weight")):
        assert tensors[name].tensor_type == F16
        np.testing.assert_array_equal(tensors[name].data, torch.tensor(sd[ours]).half().numpy())


@pytest.mark.parametrize("d_model", [64, 48])
def test_q8_0_blocks_dequantize_within_their_bound(tmp_path, d_model):
    """Rows that are a multiple of 32 long become q8_0 blocks; others (d_model=48) fall back to f16."""
    run, _, _, sd = _run(tmp_path, "llama-gqa", **{**LLAMA, "d_model": d_model})
    export_gguf(run, tmp_path / "m.gguf", dtype="q8_0")
    fields, tensors = _read(tmp_path / "m.gguf")
    assert fields["general.file_type"] == 7
    t, ours = tensors["blk.0.ffn_up.weight"], sd["blocks.0.mlp.up.weight"]
    assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    if d_model % 32:
        assert t.tensor_type == gguf.GGMLQuantizationType.F16
        return
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert t.data.nbytes == ours.size // 32 * 34  # per block: an f16 scale and 32 int8
    back = gguf.quants.dequantize(np.asarray(t.data), gguf.GGMLQuantizationType.Q8_0).reshape(ours.shape)
    blocks, err = ours.reshape(-1, 32), np.abs(back - ours).reshape(-1, 32)
    # scale d = max|x| / 127; rounding to the nearest step errs by d/2, the f16 scale by 127 d 2^-11
    bound = np.abs(blocks).max(axis=1, keepdims=True) / 127 * (0.5 + 127 * 2.0 ** -11) * (1 + 1e-6)
    assert (err <= bound).all() and err.max() > 0


@pytest.mark.parametrize("change, needle", [
    (dict(positions="sinusoidal"), "positions='sinusoidal'"),
    (dict(mlp="gelu_exact"), "mlp='gelu_exact'"),
    (dict(bias=False), "bias=False"),
    (dict(llama=True, attention_window=8), "attention_window=8"),
    (dict(llama=True, attention="linear"), "attention='linear'"),
    (dict(llama=True, n_experts=4, experts_per_token=2), "n_experts=4"),
])
def test_architectures_llama_cpp_lacks_are_refused_by_name(tmp_path, change, needle):
    change = dict(change)
    style, extra = ("llama-gqa", LLAMA) if change.pop("llama", False) else ("gpt2", dict(max_seq_len=40))
    run, *_ = _run(tmp_path, style, **extra, **change)
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        export_gguf(run, tmp_path / "m.gguf")
    assert list(tmp_path.glob("*m.gguf*")) == []


@pytest.mark.parametrize("tokenizer, needle", [
    (CharTokenizer().train(TEXT), "char-level"),
    (BPETokenizer(r"\w+|\s+|[^\w\s]+").train(TEXT, 300), "pre-tokenizer"),
])
def test_tokenizers_llama_cpp_cannot_reproduce_are_refused(tmp_path, tokenizer, needle):
    run, *_ = _run(tmp_path, "llama-gqa", tokenizer=tokenizer, **LLAMA)
    with pytest.raises(ValueError, match=needle):
        export_gguf(run, tmp_path / "m.gguf")
    assert list(tmp_path.glob("*m.gguf*")) == []


def test_bad_dtype_and_failed_write_leave_the_old_file(tmp_path, monkeypatch):
    run, *_ = _run(tmp_path, "llama-gqa", **LLAMA)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    with pytest.raises(ValueError, match="dtype must be one of"):
        export_gguf(run, out, dtype="q4")

    def fail(writer, **kwargs):  # the disk fills up halfway through the tensors
        writer.fout[0].write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(run, out)
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "run"]


@pytest.mark.parametrize("style, dtype", [("llama-gqa", "f32"), ("gpt2", "f32"), ("llama-gqa", "f16"),
                                          ("llama-gqa", "q8_0")])
def test_import_gguf_gives_back_the_run(tmp_path, style, dtype):
    extra = dict(LLAMA, bias=True) if style == "llama-gqa" else dict(max_seq_len=40)
    run, cfg, tok, sd = _run(tmp_path, style, tokenizer=BPETokenizer("gpt2").train(TEXT, 300), **extra)
    export_gguf(run, tmp_path / "m.gguf", dtype=dtype)
    assert import_gguf(tmp_path / "m.gguf", tmp_path / "back") == tmp_path / "back"
    config, tokenizer, params = load_run(tmp_path / "back")
    assert config == cfg and tokenizer.to_dict() == tok.to_dict() and set(params) == set(sd)
    for name, w in sd.items():
        if dtype == "f32" or w.ndim == 1:
            np.testing.assert_array_equal(params[name], w)
        elif dtype == "f16":
            np.testing.assert_array_equal(params[name], w.astype(np.float16).astype(np.float32))
        else:  # q8_0: within half a step (max|row block| / 127) and some f16-scale slack
            assert np.abs(params[name] - w).max() <= np.abs(w).max() / 127 * 0.57


def test_import_gguf_refuses_what_it_cannot_express(tmp_path, monkeypatch):
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="junk.gguf is not a readable GGUF file"):
        import_gguf(tmp_path / "junk.gguf", tmp_path / "out")
    writer = gguf.GGUFWriter(tmp_path / "phi.gguf", "phi2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        write()
    writer.close()
    with pytest.raises(ValueError, match="general.architecture is 'phi2'"):
        import_gguf(tmp_path / "phi.gguf", tmp_path / "out")
    # LLaMA 3's "llama-bpe" takes whole chunks found in the vocabulary without merging: not our BPE
    run, *_ = _run(tmp_path, "llama-gqa", **LLAMA)
    monkeypatch.setitem(gguf_tokenizer.PRE_TOKENIZERS, GPT4_SPLIT_PATTERN, "llama-bpe")
    export_gguf(run, tmp_path / "llama3.gguf")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="tokenizer.ggml.pre is 'llama-bpe'"):
        import_gguf(tmp_path / "llama3.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    with pytest.raises(ValueError, match="run already exists"):
        import_gguf(tmp_path / "llama3.gguf", run)


def test_cli_export_then_import_gguf(tmp_path, capsys):
    """`minillm export gguf` and `minillm import gguf` do what the two functions do, and a file that is
    not GGUF is a one-line error with nothing written."""
    run, cfg, tok, sd = _run(tmp_path, "llama-gqa", tokenizer=BPETokenizer("gpt2").train(TEXT, 300), **LLAMA)
    assert cli(["export", "gguf", "--run", str(run), "--out", str(tmp_path / "m.gguf")]) == 0
    assert cli(["import", "gguf", "--file", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "back")]) == 0
    config, tokenizer, params = load_run(tmp_path / "back")
    assert config == cfg and tokenizer.to_dict() == tok.to_dict()
    for name, w in sd.items():
        np.testing.assert_array_equal(params[name], w)
    capsys.readouterr()
    (tmp_path / "junk.gguf").write_bytes(b"junk")
    one_line_error(capsys, ["import", "gguf", "--file", str(tmp_path / "junk.gguf"), "--out",
                            str(tmp_path / "out")], "junk.gguf is not a readable GGUF file")
    assert not (tmp_path / "out").exists()
