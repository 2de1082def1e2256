"""What a fine-tuning run is, before any framework: its settings, its data and its run config.

`minillm finetune --run BASE --data SOURCE --method full|lora --out DIR` starts from a trained run
directory (BASE) and trains on conversations (SOURCE: `builtin:shakespeare-tasks` or a chat JSONL,
see minillm.data.sft) rendered with the chat template. A fine-tuning run is a TrainConfig like
pretraining (same loop, same resume, same files) plus a FinetuneConfig recorded in config.json
under "finetune", so the run always names its base. Every `--set key=value` goes to whichever of
the two configs has the key (`--set lr=1e-4`, `--set lora_rank=32`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from minillm import checkpoint
from minillm.config import TrainConfig, train_config_from_dict
from minillm.config_io import from_dict, parse_overrides
from minillm.data import sft, tasks
from minillm.files import read_json

METHODS = ("full", "lora")


@dataclasses.dataclass
class FinetuneConfig:
    base_run: str  # run directory of the pretrained model
    data: str  # "builtin:shakespeare-tasks" or a chat JSONL file
    method: str = "lora"  # "full": every weight trains; "lora": adapters on a frozen base
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "q,k,v,o,up,gate,down"  # comma-separated linear layers of each block
    loraplus_lr_ratio: float = 1.0  # LoRA+ (Hayou et al. 2024): B learns at this multiple of A's lr
    overlong: str = "truncate"  # or "skip": examples longer than block_size + 1 ids
    layout: str = "pad"  # "pad": one example per row; "pack": examples back to back
    val_every: int = 20  # every val_every-th example is held out for the validation loss

    def __post_init__(self) -> None:
        for name, choices in (("method", METHODS), ("overlong", sft.OVERLONG_POLICIES),
                              ("layout", ("pad", "pack"))):
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"FinetuneConfig.{name} must be one of {choices}, got {value!r}")
        if self.lora_rank < 1 or self.val_every < 2 or not self.loraplus_lr_ratio > 0:
            raise ValueError("FinetuneConfig.lora_rank must be >= 1, val_every >= 2, loraplus_lr_ratio > 0")

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())


# Fine-tuning defaults, measured on the built-in task set with the shakespeare-bpe-base model
# (BENCHMARKS.md): ~2 epochs of its 25k examples; full fine-tuning at 1e-3 (3e-4 learns too slowly
# here), LoRA at 3e-3 (B starts at zero; 1e-2 diverges), no weight decay on adapters.
DEFAULTS = dict(batch_size=16, max_steps=3000, warmup_steps=100, schedule="cosine", eval_interval=500,
                eval_batches=8, log_interval=50, grad_clip=1.0)
METHOD_DEFAULTS = {"full": dict(lr=1e-3, min_lr=1e-4, weight_decay=0.1),
                   "lora": dict(lr=3e-3, min_lr=3e-4, weight_decay=0.0)}


def finetune_configs(base_run: str, data: str, out_dir: str, method: str = "lora",
                     overrides: list[str] | None = None) -> tuple[TrainConfig, FinetuneConfig]:
    """(TrainConfig, FinetuneConfig) for fine-tuning `base_run`; the model config is the base's,
    block_size its max_seq_len (up to 256) unless overridden."""
    base = checkpoint.load_config(base_run)
    ft_keys = {f.name for f in dataclasses.fields(FinetuneConfig)}
    ft_pairs, train_pairs = [], []
    for pair in overrides or []:
        (ft_pairs if pair.partition("=")[0].strip() in ft_keys else train_pairs).append(pair)
    # The base is recorded as an absolute path: the run loads it from any working directory.
    ft = from_dict(FinetuneConfig, {"base_run": str(Path(base_run).resolve()), "data": str(data),
                                    "method": method, **parse_overrides(ft_pairs)})
    d = {**DEFAULTS, **METHOD_DEFAULTS[ft.method], "block_size": min(base.max_seq_len, 256),
         "data_dir": str(base_run), "out_dir": str(out_dir), "model": base.to_dict()}
    return train_config_from_dict(d, train_pairs), ft


def record(run_dir: str | Path) -> FinetuneConfig | None:
    """The FinetuneConfig a run directory was made with, or None for a pretraining run."""
    d = read_json(Path(run_dir) / checkpoint.CONFIG_FILE, checkpoint.CheckpointError)
    return from_dict(FinetuneConfig, d["finetune"]) if "finetune" in d else None


def conversations(spec: str, val_every: int) -> tuple[list[list[dict]], list[list[dict]]]:
    """(train, val) conversations of a fine-tuning source: every val_every-th example of its
    training split is held out for validation (the task set's test plays stay unseen)."""
    if spec.startswith("builtin:"):
        examples = [e["messages"] for e in tasks.load_tasks(spec, "train")]
    else:
        examples = [r["messages"] for r in sft.read_records(spec)]
    val = examples[val_every - 1::val_every]
    train = [e for i, e in enumerate(examples) if (i + 1) % val_every]
    if not val or not train:
        raise ValueError(f"{spec}: {len(examples)} examples leave no {'validation' if train else 'training'} "
                         f"example with val_every={val_every} (every Nth is held out); give more examples "
                         f"or --set val_every=N with 2 <= N <= {len(examples)}")
    return train, val
