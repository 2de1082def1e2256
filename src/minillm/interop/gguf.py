"""Export a run to llama.cpp's GGUF file (`minillm export gguf`): metadata, tokenizer, tensors.

One GGUF file holds key/value metadata (`general.*`, `<arch>.*` hyperparameters, `tokenizer.*`)
and named tensors. Two llama.cpp architectures express our configs exactly:
- "llama": rmsnorm, RoPE, SwiGLU, grouped-query attention (optional biases: llama.cpp reads them).
  llama.cpp's RoPE for this architecture rotates *adjacent* pairs (x[2j], x[2j+1]) of each head,
  the layout of the original LLaMA release; ours (and Hugging Face's) rotates x[j] with
  x[j + head_dim/2]. Both are the same rotation once each head's rows of W_q and W_k are
  reordered j -> 2j, j + head_dim/2 -> 2j + 1 (`interleave_heads`), which is the permutation
  llama.cpp's own converter applies to Hugging Face LLaMA checkpoints. Attention scores q.k are
  unchanged by a permutation applied to both q and k, so nothing else moves.
- "gpt2": layernorm, learned positions, tanh-GELU MLP, biases; Q, K, V fused into one `attn_qkv`.
Tensors keep PyTorch's [out, in] layout: the `gguf` writer reverses the shape into ggml's order
itself. Dtypes as llama.cpp's converter chooses them: "f32" everything; "f16" and "q8_0" keep
1-D tensors (norms, biases) and position embeddings in f32; q8_0 (blocks of 32 int8 with one f16
scale) needs rows that are a multiple of 32 long, else that tensor falls back to f16.
The file appears atomically: it is written under a temporary name and renamed when complete.
`import_gguf` is the inverse for files of these two architectures (f32, f16, bf16 or q8_0 tensors)
with a tokenizer that minillm's BPE reproduces: a GGUF file becomes a run directory.
"""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np

from minillm.checkpoint import check_params, save_run
from minillm.config import ModelConfig
from minillm.interop.gguf_tokenizer import add_tokenizer, tokenizer_from_fields
from minillm.interop.hf_dir import _staging
from minillm.torch.quant_format import check_float_run
from minillm.torch.sft import load_for_inference

Tensors = dict[str, np.ndarray]  # name -> array, PyTorch layout ([out, in] for a linear weight)
DTYPES = ("f32", "f16", "q8_0")
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
# What each llama.cpp architecture needs of a ModelConfig (gpt2's MLP is ggml_gelu: the tanh form).
# What llama.cpp's two architectures compute; the last four keep out what neither has (windows,
# linear attention, experts, an encoder).
_PLAIN = dict(attention="softmax", attention_window=None, n_experts=0, encoder_layers=0)
ARCHITECTURES = {
    "llama": dict(norm="rmsnorm", positions="rope", mlp="swiglu", **_PLAIN),
    "gpt2": dict(norm="layernorm", positions="learned", mlp="gelu", bias=True, **_PLAIN),
}


def architecture(config: ModelConfig) -> str:
    """The llama.cpp architecture that runs this config, or a ValueError naming the fields it lacks."""
    missing = {arch: [f"{k}={getattr(config, k)!r} (needs {v!r})" for k, v in need.items()
                      if getattr(config, k) != v] for arch, need in ARCHITECTURES.items()}
    closest = min(missing, key=lambda arch: len(missing[arch]))
    if missing[closest]:
        raise ValueError(f"llama.cpp has no architecture for this model: {', '.join(missing[closest])} "
                         f"for its {closest!r} architecture")
    return closest


def interleave_heads(w: np.ndarray, n_heads: int, inverse: bool = False) -> np.ndarray:
    """Rows of W_q / W_k (or a bias) from rotate-half to adjacent-pair RoPE layout, head by head.

    Row s * head_dim/2 + j of a head (s = 0 first half, 1 second half) moves to row 2j + s;
    `inverse` moves them back. w: (n_heads * head_dim, ...) -> same shape.
    """
    half = w.shape[0] // n_heads // 2
    split = (n_heads, half, 2) if inverse else (n_heads, 2, half)
    return w.reshape(*split, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# canonical name within a block -> llama.cpp's within blk.N ("llama" architecture)
LLAMA_BLOCK = {"attn_norm": "attn_norm", "mlp_norm": "ffn_norm", "attn.q": "attn_q", "attn.k": "attn_k",
               "attn.v": "attn_v", "attn.o": "attn_output", "mlp.gate": "ffn_gate", "mlp.up": "ffn_up",
               "mlp.down": "ffn_down"}


def llama_tensors(config: ModelConfig, sd: Tensors, inverse: bool = False) -> Tensors:
    """Canonical parameters -> llama.cpp "llama" tensor names (Q and K rows interleaved);
    `inverse`: llama.cpp's tensors -> canonical parameters."""
    top = {"tok_emb.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
           **({} if config.tie_embeddings else {"lm_head.weight": "output.weight"})}  # tied: no output
    heads = {"attn.q": config.n_heads, "attn.k": config.n_kv_heads}
    names = [(ours, theirs, None) for ours, theirs in top.items()]
    for i in range(config.n_layers):
        names += [(f"blocks.{i}.{ours}.{part}", f"blk.{i}.{theirs}.{part}", heads.get(ours))
                  for ours, theirs in LLAMA_BLOCK.items() for part in ("weight", "bias")]
    out = {}
    for ours, theirs, n_heads in names:
        source, target = (theirs, ours) if inverse else (ours, theirs)
        if source in sd:  # biases only when config.bias; mlp.gate always (swiglu)
            w = sd[source]
            out[target] = w if n_heads is None else interleave_heads(w, n_heads, inverse)
    return out


def gpt2_tensors(config: ModelConfig, sd: Tensors, inverse: bool = False) -> Tensors:
    """Canonical parameters -> llama.cpp "gpt2" tensor names (Q, K, V concatenated row-wise);
    `inverse`: llama.cpp's tensors -> canonical parameters (attn_qkv split into Q, K, V)."""
    names = {"tok_emb.weight": "token_embd.weight", "pos_emb.weight": "position_embd.weight",
             "norm.weight": "output_norm.weight", "norm.bias": "output_norm.bias",
             **({} if config.tie_embeddings else {"lm_head.weight": "output.weight"})}
    block = {"attn_norm": "attn_norm", "mlp_norm": "ffn_norm", "attn.o": "attn_output", "mlp.up": "ffn_up",
             "mlp.down": "ffn_down"}
    widths = (config.d_model, config.n_kv_heads * config.head_dim, config.n_kv_heads * config.head_dim)
    out = {}
    for i in range(config.n_layers):
        names.update({f"blocks.{i}.{ours}.{part}": f"blk.{i}.{theirs}.{part}"
                      for ours, theirs in block.items() for part in ("weight", "bias")})
        for part in ("weight", "bias"):
            qkv, parts = f"blk.{i}.attn_qkv.{part}", [f"blocks.{i}.attn.{n}.{part}" for n in "qkv"]
            if inverse:  # rows [0, D) are Q, then K, then V
                out.update(zip(parts, np.split(sd[qkv], np.cumsum(widths)[:2])))
            else:
                out[qkv] = np.concatenate([sd[name] for name in parts])
    out.update({ours: sd[theirs] for ours, theirs in names.items()} if inverse
               else {theirs: sd[ours] for ours, theirs in names.items()})
    return out


def encode_tensor(name: str, w: np.ndarray, dtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """(data, ggml type) of one tensor for the file's dtype, following llama.cpp's converter."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if dtype == "f32" or w.ndim == 1 or name == "position_embd.weight":
        return w, gguf.GGMLQuantizationType.F32
    if dtype == "q8_0" and w.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return w.astype(np.float16), gguf.GGMLQuantizationType.F16


def add_hyperparameters(writer: gguf.GGUFWriter, config: ModelConfig, arch: str) -> None:
    """The `<arch>.*` keys llama.cpp reads to build the graph."""
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.d_ff)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_vocab_size(config.vocab_size)
    if arch == "llama":
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_rope_dimension_count(config.head_dim)
    else:
        writer.add_layer_norm_eps(config.norm_eps)


@contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path next to `path` that replaces it on success and is removed on any error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export_gguf(run_dir: str | os.PathLike, out_path: str | os.PathLike, dtype: str = "f32") -> None:
    """Write the run (full weights, or a LoRA run merged into its base) as one GGUF file for llama.cpp."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    check_float_run(run_dir, "a GGUF export (its q8_0 is llama.cpp's own)")
    model, tokenizer = load_for_inference(run_dir)
    config = model.config
    arch = architecture(config)
    if tokenizer is None:
        raise ValueError(f"{run_dir} has no tokenizer.json; a GGUF file must carry its tokenizer")
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    tensors = (llama_tensors if arch == "llama" else gpt2_tensors)(config, sd)
    with _atomic_path(Path(out_path)) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            _write(writer, Path(run_dir).resolve().name, config, tokenizer, tensors, dtype)
        finally:
            writer.close()


def _write(writer: gguf.GGUFWriter, name: str, config: ModelConfig, tokenizer, tensors: Tensors,
           dtype: str) -> None:
    """Metadata, then tensors: the GGUF file's order."""
    writer.add_name(name)
    writer.add_file_type(FILE_TYPES[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_hyperparameters(writer, config, writer.arch)
    add_tokenizer(writer, tokenizer, config.vocab_size)
    for tensor_name, w in tensors.items():
        data, qtype = encode_tensor(tensor_name, w, dtype)
        quantized = qtype == gguf.GGMLQuantizationType.Q8_0  # bytes: the writer needs the type
        writer.add_tensor(tensor_name, data, raw_dtype=qtype if quantized else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()


def config_from_fields(fields: dict, tensors: Tensors, source: str) -> ModelConfig:
    """The ModelConfig of a GGUF file's `<arch>.*` keys; biases and tying read off the tensors."""
    arch = fields.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{source}: general.architecture is {arch!r}; only {sorted(ARCHITECTURES)} import")

    def key(name: str, default=None):
        value = fields.get(f"{arch}.{name}", default)
        if value is None or isinstance(value, list):
            raise ValueError(f"{source}: {arch}.{name} is {'missing' if value is None else 'per layer'}")
        if isinstance(value, float):  # stored as float32: 1e-5 reads 9.99999975e-06; take the shortest
            value = float(str(np.float32(value)))  # decimal that is the same float32, as written
        return value
    shape = dict(vocab_size=key("vocab_size", len(fields.get("tokenizer.ggml.tokens", []))),
                 max_seq_len=key("context_length"), d_model=key("embedding_length"),
                 n_layers=key("block_count"), d_ff=key("feed_forward_length"),
                 n_heads=key("attention.head_count"),
                 n_kv_heads=key("attention.head_count_kv", key("attention.head_count")),
                 tie_embeddings="output.weight" not in tensors, **ARCHITECTURES[arch])
    if arch == "gpt2":
        extra = dict(norm_eps=key("attention.layer_norm_epsilon"))
    else:
        extra = dict(norm_eps=key("attention.layer_norm_rms_epsilon"),
                     rope_theta=key("rope.freq_base", 10000.0), bias="blk.0.attn_q.bias" in tensors)
    try:
        config = ModelConfig(**shape, **extra)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    if arch == "llama" and key("rope.dimension_count", config.head_dim) != config.head_dim:
        raise ValueError(f"{source}: {arch}.rope.dimension_count is not head_dim ({config.head_dim}): "
                         "partial RoPE is not supported")
    return config


IMPORTABLE = ("F32", "F16", "BF16", "Q8_0")


def import_gguf(path: str | os.PathLike, out_run: str | os.PathLike) -> Path:
    """A GGUF file of a "llama" or "gpt2" model with a minillm-compatible BPE tokenizer -> a run
    directory `out_run` (which must not exist): config.json, tokenizer.json, model.safetensors.
    ValueError naming what is not supported, before anything is written."""
    source, out = str(path), Path(out_run)
    if out.exists():
        raise ValueError(f"{out} already exists; give a new directory")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"{source} is not a readable GGUF file: {e}") from None
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {}
    for t in reader.tensors:
        if t.tensor_type.name not in IMPORTABLE:
            raise ValueError(f"{source}: tensor {t.name} is {t.tensor_type.name}; only {IMPORTABLE} import")
        shape = tuple(int(n) for n in reversed(t.shape))  # ggml lists dims innermost first
        tensors[t.name] = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
    config = config_from_fields(fields, tensors, source)
    tokenizer = tokenizer_from_fields(fields, source)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{source}: the tokenizer has {tokenizer.vocab_size} ids but the model's "
                         f"vocab_size is {config.vocab_size}")
    convert = llama_tensors if fields["general.architecture"] == "llama" else gpt2_tensors
    try:
        params = {k: v.astype(np.float32) for k, v in convert(config, tensors, inverse=True).items()}
    except KeyError as e:
        raise ValueError(f"{source}: tensor {e} is missing") from None
    check_params(config, params, source)
    with _staging(out) as tmp:  # a hidden directory, renamed to `out` once complete
        save_run(tmp, config, tokenizer, params, extra_config={"imported_from": {"gguf": source}})
    return out
