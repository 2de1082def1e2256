"""The quantized run directory: what `minillm quantize` writes and every loader of runs reads.

    config.json              {"model": ModelConfig fields, "quantization": {"format": "minillm-quant",
                              "version": 1, "method": "int8" | "int4" | "gptq-int4", "bits": 8 | 4,
                              "group_size": 64 (int4), "head": false, "source": the run it came from}}
    tokenizer.json           the source run's tokenizer
    quantized.safetensors    canonical names (DESIGN.md); each quantized layer's `weight` is replaced by
                             `{path}.qweight` (int8 [out, in] or uint8 [out, in / 2], two 4-bit codes a
                             byte), `{path}.scales` and, for int4, `{path}.zeros` (minillm.torch.quantize)
A quantized run has no model.safetensors, so a reader of float runs (the JAX backend, the exporters)
stops at a missing file instead of misreading integer weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minillm import checkpoint
from minillm.checkpoint import CONFIG_FILE, TOKENIZER_FILE, CheckpointError, load_tensors, save_tensors
from minillm.config import SINUSOID_SCALE, ModelConfig
from minillm.files import atomic_write_json, read_json
from minillm.tokenizer import load_tokenizer
from minillm.torch.layers import rope_tables, sinusoidal_table
from minillm.torch.model import Transformer
from minillm.torch.quantize import METHODS, Int4Linear, Int8Linear, set_module, target_linears

QUANT_FILE = "quantized.safetensors"
FORMAT, VERSION = "minillm-quant", 1


def check_float_run(run_dir: str | Path, purpose: str) -> None:
    """A one-line error when run_dir is a quantized run: `purpose` needs its float weights."""
    if (Path(run_dir) / CONFIG_FILE).is_file() and (record := quantization_record(run_dir)) is not None:
        raise ValueError(f"{run_dir} is a quantized run ({record['method']}); {purpose} needs float weights: "
                         f"use the run it was made from ({record.get('source')})")


def quantization_record(run_dir: str | Path) -> dict | None:
    """The "quantization" entry of run_dir/config.json, checked; None for a float run."""
    path = Path(run_dir) / CONFIG_FILE
    record = read_json(path, CheckpointError).get("quantization")
    if record is None:
        return None
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("version") != VERSION:
        raise CheckpointError(f"{path}: quantization is not a {FORMAT} version {VERSION} record: {record!r}")
    if record.get("method") not in METHODS:
        raise CheckpointError(f"{path}: unknown quantization method {record.get('method')!r} "
                              f"(this version reads {', '.join(METHODS)})")
    if record["method"] != "int8" and record.get("group_size") not in (32, 64, 128):
        raise CheckpointError(f"{path}: quantization group_size must be 32, 64 or 128, "
                              f"got {record.get('group_size')!r}")
    return record


def save_quantized(out_dir: str | Path, model: Transformer, tokenizer, record: dict) -> None:
    """Write a quantized model (minillm.torch.quantize swapped its layers) as a run directory.
    record: method, group_size, head, source (format and version are added here)."""
    out_dir = Path(out_dir)
    tensors = {k: v.detach().cpu().contiguous().numpy() for k, v in model.state_dict().items()}
    save_tensors(out_dir / QUANT_FILE, tensors, metadata={"format": f"{FORMAT}-{VERSION}"})
    if tokenizer is not None:
        tokenizer.save(out_dir / TOKENIZER_FILE)
    bits = 8 if record["method"] == "int8" else 4
    atomic_write_json(out_dir / CONFIG_FILE, {"model": model.config.to_dict(), "quantization": {
        "format": FORMAT, "version": VERSION, **record, "bits": bits}})


def _tensor(tensors: dict, key: str, shape: tuple, dtype: torch.dtype, source: str) -> torch.Tensor:
    if key not in tensors:
        raise CheckpointError(f"{source}: missing tensor {key!r}")
    t = torch.from_numpy(tensors.pop(key))
    if tuple(t.shape) != shape or t.dtype != dtype:
        raise CheckpointError(f"{source}: tensor {key!r} is {t.dtype} {list(t.shape)}, the config needs "
                              f"{dtype} {list(shape)}")
    return t


def _layer(tensors: dict, path: str, linear, bits: int, group_size: int | None, source: str):
    """The quantized layer at `path` from the file's tensors (popped), every shape and dtype checked."""
    out, n_in = linear.out_features, linear.in_features
    bias = None
    if linear.bias is not None:
        bias = _tensor(tensors, f"{path}.bias", (out,), torch.float32, source)
    if bits == 8:
        q = _tensor(tensors, f"{path}.qweight", (out, n_in), torch.int8, source)
        return Int8Linear(q, _tensor(tensors, f"{path}.scales", (out,), torch.float32, source), bias, n_in)
    G = n_in // group_size
    q = _tensor(tensors, f"{path}.qweight", (out, n_in // 2), torch.uint8, source)
    scales = _tensor(tensors, f"{path}.scales", (out, G), torch.float32, source)
    zeros = _tensor(tensors, f"{path}.zeros", (out, G), torch.float32, source)
    return Int4Linear(q, scales, zeros, bias, n_in)


def load_quantized(run_dir: str | Path, device: str | torch.device = "cpu"):
    """A quantized run directory -> (Transformer with quantized layers, eval mode; tokenizer or None)."""
    run_dir = Path(run_dir)
    record = quantization_record(run_dir)
    if record is None:
        raise CheckpointError(f"{run_dir / CONFIG_FILE} has no quantization record: not a quantized run")
    config = checkpoint.load_config(run_dir)
    source = str(run_dir / QUANT_FILE)
    tensors = load_tensors(run_dir / QUANT_FILE)  # CheckpointError for a missing or truncated file
    with torch.device("meta"):  # no memory, no init for float weights the file replaces
        model = Transformer(config)
    model.to_empty(device="cpu")
    _restore_tables(model, config)
    bits, group_size = (8, None) if record["method"] == "int8" else (4, record["group_size"])
    for path, linear in target_linears(model).items():
        set_module(model, path, _layer(tensors, path, linear, bits, group_size, source))
    if record.get("head"):
        model.lm_head = _layer(tensors, "lm_head", model.lm_head, 8, None, source)
    floats = {k: torch.from_numpy(v) for k, v in tensors.items()}  # embeddings, norms
    result = model.load_state_dict(floats, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith((".qweight", ".scales", ".zeros"))
               and not (k.endswith(".bias") and k.rpartition(".")[0] in _quantized_paths(model))]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{source}: " + (f"missing tensor {missing[0]!r}" if missing else
                                               f"unexpected tensor {result.unexpected_keys[0]!r}"))
    return model.to(device).eval(), _tokenizer(run_dir)


def _quantized_paths(model: Transformer) -> set[str]:
    return {path for path, m in model.named_modules() if isinstance(m, (Int8Linear, Int4Linear))}


def _restore_tables(model: Transformer, config: ModelConfig) -> None:
    """Recompute the non-persistent float tables (RoPE, sinusoids) that to_empty left uninitialised."""
    if config.positions == "rope":
        model.rope_cos, model.rope_sin = rope_tables(config.max_seq_len, config.head_dim, config.rope_theta)
    if config.positions == "sinusoidal":
        model.sin_table = SINUSOID_SCALE * sinusoidal_table(config.max_seq_len, config.d_model)


def _tokenizer(run_dir: Path):
    path = run_dir / TOKENIZER_FILE
    return load_tokenizer(path) if path.is_file() else None
