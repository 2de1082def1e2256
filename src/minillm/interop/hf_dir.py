"""Whole directories: a minillm run -> a Hugging Face model directory, and a local transformers
checkpoint directory -> a minillm run. minillm.interop.hf converts the weights; this module adds
the files around them (tokenizer, special-token ids, generation defaults, a peft adapter) and the
rule that a failed conversion writes nothing: everything goes to a hidden directory next to the
target, which is renamed into place at the end.

Export (`export_hf`): config.json + model.safetensors (GPT2LMHeadModel or LlamaForCausalLM),
tokenizer.json + tokenizer_config.json (special tokens, the chat template) and
generation_config.json (bos / eos / pad ids; eos lists every token that ends a reply). A LoRA run
exports merged, or with adapter_mode="peft" as the base model plus a peft adapter in `adapter/`.

Import (`import_hf`): GPT-2, LLaMA, Mistral and Qwen2 checkpoints whose tokenizer.json ours
reproduces (byte-level BPE; one token per character, as a char run exports). HF numbers a
vocabulary its own way, ours is fixed (bytes, merges, special tokens:
minillm.tokenizer.hf.bpe_from_hf_any), so the embedding and lm_head rows are permuted into our
numbering: the same text gives the same tokens and the same logits. The tokenizer keeps HF's own
special-token texts, and a role map says which plays bos / eos / pad (`_roles`), so that a run
imported from GPT-2 stops at `<|endoftext|>` and exports with the same eos and bos tokens.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
from pathlib import Path
from typing import Iterator

import torch

from minillm import align, checkpoint, finetune
from minillm.files import read_json
from minillm.interop.hf import LLAMA_LIKE, config_from_hf, family, from_transformers, to_transformers
from minillm.interop.peft import load_peft, save_peft
from minillm.tokenizer import SPECIAL_TOKENS, BPETokenizer, CharTokenizer, load_tokenizer
from minillm.tokenizer.chat import save_hf_tokenizer, stop_token_ids
from minillm.tokenizer.hf import bpe_from_hf_any, char_from_hf, roles_from_hf
from minillm.torch import lora
from minillm.torch.quant_format import check_float_run
from minillm.torch.sft import load_for_inference

ADAPTER_MODES = ("merged", "peft")
ADAPTER_DIR = "adapter"  # where adapter_mode="peft" puts the peft adapter inside the export
IMPORTABLE = ("gpt2", *LLAMA_LIKE)
# Where a checkpoint says which tokens are bos / eos / pad: by text (first), then by id.
TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")
ID_FILES = ("generation_config.json", checkpoint.CONFIG_FILE)


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A hidden directory next to `out` to write into; renamed to `out` on success, removed on error."""
    if out.exists():
        raise ValueError(f"{out} already exists; give a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{secrets.token_hex(6)}.tmp"
    tmp.mkdir()
    try:
        yield tmp
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- export -------------------------------------------------------------------------------------
def _special_ids(tokenizer) -> dict[str, int | None]:
    """bos_token_id / eos_token_id / pad_token_id for transformers' configs (None: no such token);
    an imported tokenizer's role map decides (e.g. GPT-2's <|endoftext|>), else our <|bos|> ..."""
    return {f"{name}_token_id": (tokenizer.role_ids(name) or [None])[0] for name in ("bos", "eos", "pad")}


def _write_hf_model(hf_model, tokenizer, directory: Path) -> None:
    """config.json, model.safetensors, the tokenizer files and generation_config.json."""
    import transformers

    ids = _special_ids(tokenizer)
    for key, value in ids.items():
        setattr(hf_model.config, key, value)
    # every eos of the role map, and the template tokens that open another turn
    stops = list(dict.fromkeys(tokenizer.role_ids("eos") + stop_token_ids(tokenizer)))
    hf_model.generation_config = transformers.GenerationConfig(
        **{**ids, "eos_token_id": stops if len(stops) > 1 else ids["eos_token_id"]})
    hf_model.save_pretrained(directory)  # safetensors
    save_hf_tokenizer(tokenizer, directory)


def _lora_parts(run_dir: Path, adapter: str | Path | None):
    """(base run, adapter directory) of a LoRA run, or of a plain run given an adapter directory;
    the same pairing minillm.torch.sft.load_for_inference merges."""
    ft = finetune.record(run_dir) if (run_dir / checkpoint.CONFIG_FILE).is_file() else None
    base = ft.base_run if ft is not None and ft.method == "lora" else align.adapter_base(run_dir)
    if base is not None and adapter is not None:
        raise ValueError(f"{run_dir} is a LoRA run (an adapter on {base}); give --adapter with the base run")
    if base is None and adapter is None:
        raise ValueError(f"{run_dir} is not a LoRA run: adapter mode 'peft' needs one, or --adapter DIR")
    return (Path(base), run_dir) if base is not None else (run_dir, Path(adapter))


def export_hf(run_dir: str | Path, out_dir: str | Path, adapter: str | Path | None = None,
              adapter_mode: str = "merged") -> Path:
    """Write run `run_dir` (any run load_for_inference loads, plus an optional adapter) as a
    transformers directory `out_dir`, which must not exist. ValueError (nothing written) for an
    architecture transformers cannot express, naming the field."""
    if adapter_mode not in ADAPTER_MODES:
        raise ValueError(f"adapter mode must be one of {ADAPTER_MODES}, got {adapter_mode!r}")
    run_dir, out = Path(run_dir), Path(out_dir)
    if out.exists():
        raise ValueError(f"{out} already exists; give a new directory")
    if adapter_mode == "merged":
        check_float_run(run_dir, "a transformers export")
        model, tokenizer = load_for_inference(run_dir, adapter)
        hf_model, peft_model = to_transformers(model), None
    else:
        base, adapter_dir = _lora_parts(run_dir, adapter)
        peft_model, _ = load_for_inference(base)
        tokenizer = load_tokenizer(run_dir / checkpoint.TOKENIZER_FILE)  # a LoRA run's copy
        if family(peft_model.config) != "llama":
            raise ValueError("adapter mode 'peft' needs a LLaMA-style run: the GPT-2 export fuses q, k and "
                             "v into one Conv1D c_attn, which per-projection LoRA adapters cannot map to")
        hf_model = to_transformers(peft_model)  # the base, before the adapter goes on
        if (adapter_dir / "adapter_config.json").is_file():
            load_peft(peft_model, adapter_dir)
        else:
            lora.load_adapter(peft_model, adapter_dir)
    if tokenizer is None:
        raise ValueError(f"{run_dir} has no {checkpoint.TOKENIZER_FILE}; an HF export needs the tokenizer")
    with _staging(out) as tmp:
        _write_hf_model(hf_model, tokenizer, tmp)
        if peft_model is not None:
            save_peft(peft_model, tmp / ADAPTER_DIR, base_model_name_or_path=str(out.resolve()))
    return out


# --- import -------------------------------------------------------------------------------------
def _roles(model_dir: Path, data: dict) -> dict[str, list[str]]:
    """Which added tokens of tokenizer.json `data` play bos / eos / pad, from the checkpoint's own
    files (minillm.tokenizer.hf.roles_from_hf). A role our own token already plays needs no entry,
    so a minillm export imports back with the same tokenizer file."""
    def present(names: tuple[str, ...]) -> list[tuple[str, dict]]:
        return [(str(path), read_json(path)) for path in (model_dir / n for n in names) if path.is_file()]

    roles = roles_from_hf(data, present(TOKEN_FILES), present(ID_FILES))
    return {role: tokens for role, tokens in roles.items() if tokens[0] != SPECIAL_TOKENS[role]}


def _read_tokenizer(model_dir: Path) -> tuple[BPETokenizer | CharTokenizer, list[int]]:
    """Our tokenizer of a checkpoint's tokenizer.json and hf_ids (our id -> HF id): byte-level BPE,
    or a WordLevel model over single characters (what a char run exports), with its role map."""
    path = model_dir / checkpoint.TOKENIZER_FILE
    if not path.is_file():
        raise ValueError(f"{path} not found: only a fast tokenizer's tokenizer.json imports (save the "
                         "tokenizer with transformers' AutoTokenizer.save_pretrained first)")
    data = read_json(path)
    if (data.get("model") or {}).get("type") == "WordLevel":
        chars, unk, specials, hf_ids = char_from_hf(data, str(path))
        tokenizer = CharTokenizer.from_dict({"chars": chars, "unk": unk is not None,
                                             "special_tokens": specials})
    else:
        pattern, merges, specials, hf_ids = bpe_from_hf_any(data, str(path))
        tokenizer = BPETokenizer.from_dict({"pattern": pattern, "merges": merges, "special_tokens": specials})
    tokenizer.set_roles(_roles(model_dir, data), str(path))
    return tokenizer, hf_ids


def _renumber(params: dict[str, torch.Tensor], hf_ids: list[int], vocab_size: int) -> dict[str, torch.Tensor]:
    """Embedding and lm_head rows in our token numbering: row i of ours is row hf_ids[i] of theirs;
    rows no token of ours uses (the padding of a rounded-up vocabulary) follow in their order."""
    if hf_ids == list(range(len(hf_ids))):
        return params
    used = set(hf_ids)
    order = torch.tensor(hf_ids + [i for i in range(vocab_size) if i not in used])
    return {k: v[order] if k in ("tok_emb.weight", "lm_head.weight") else v for k, v in params.items()}


def import_hf(model_dir: str | Path, out_dir: str | Path) -> Path:
    """A local transformers checkpoint directory (GPT-2, LLaMA, Mistral, Qwen2; safetensors weights,
    byte-level BPE tokenizer.json) -> a minillm run directory `out_dir`, which must not exist.
    ValueError naming what is not supported, before anything is written."""
    import transformers

    model_dir, out = Path(model_dir), Path(out_dir)
    if out.exists():
        raise ValueError(f"{out} already exists; give a new directory")
    hf_json = read_json(model_dir / checkpoint.CONFIG_FILE)
    kind = hf_json.get("model_type")
    if kind not in IMPORTABLE:
        raise ValueError(f"{model_dir / checkpoint.CONFIG_FILE}: model_type {kind!r} "
                         f"({', '.join(hf_json.get('architectures') or [])}) is not supported; "
                         f"{', '.join(IMPORTABLE)} import")
    config = config_from_hf(transformers.AutoConfig.from_pretrained(model_dir))  # refuses what we lack
    tokenizer, hf_ids = _read_tokenizer(model_dir)
    if max(hf_ids) >= config.vocab_size:
        raise ValueError(f"{model_dir}: the tokenizer has id {max(hf_ids)}, the model vocab_size "
                         f"{config.vocab_size}")
    # safetensors only (never pickle); a bf16 / fp16 checkpoint becomes float32 in from_transformers
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True)
    config, params = from_transformers(hf_model)
    params = _renumber(params, hf_ids, config.vocab_size)
    with _staging(out) as tmp:
        checkpoint.save_run(tmp, config, tokenizer, {k: v.numpy() for k, v in params.items()},
                            extra_config={"imported_from": {"model": str(model_dir), "model_type": kind}})
    return out
