"""What an alignment run is, before any framework: its settings and its run config.

`minillm align --run SFT_RUN --method dpo|ipo|grpo --data SOURCE --out DIR` starts from a fine-tuned
run (full or LoRA; its weights, merged, are both the start and the frozen reference) and trains on
preference pairs (DPO, IPO: a JSONL of minillm.data.prefs) or on a scored task set (GRPO: sampled
completions scored by a reward). An alignment run is a TrainConfig like pretraining (same loop, same
resume, same files) plus an AlignConfig recorded in config.json under "align", so the run always
names its SFT run. Every `--set key=value` goes to whichever of the two configs has the key.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from minillm import checkpoint
from minillm.config import TrainConfig, train_config_from_dict
from minillm.config_io import from_dict, parse_overrides
from minillm.files import read_json

METHODS = ("dpo", "ipo", "grpo")
REWARDS = ("exact", "partial")


@dataclasses.dataclass(frozen=True)
class AlignConfig:
    sft_run: str  # absolute path of the SFT run: the start and the reference (merged weights)
    data: str  # dpo/ipo: preference JSONL; grpo: a task set spec (minillm.data.tasks.load_tasks)
    method: str = "dpo"  # "dpo" | "ipo" | "grpo"
    lora_rank: int = 0  # 0: every weight trains (reference: a frozen copy); > 0: a new LoRA adapter
    lora_alpha: float = 16.0  # on the SFT weights, the reference is the same model with it off
    lora_targets: str = "q,k,v,o,up,gate,down"
    beta: float = 0.1  # DPO beta; IPO tau
    label_smoothing: float = 0.0  # conservative DPO: the share of pairs assumed mislabelled
    group_size: int = 8  # GRPO: G completions per prompt
    kl_coef: float = 0.04  # GRPO beta (KL penalty to the reference)
    clip_eps: float = 0.2  # GRPO ratio clip
    grpo_iterations: int = 1  # GRPO mu: optimizer steps per sampled batch
    max_new_tokens: int = 32  # GRPO sampling length
    temperature: float = 1.0  # GRPO sampling temperature
    reward: str = "exact"  # "exact" | "partial" (minillm.data.rewards)
    val_every: int = 20  # every val_every-th example is held out for validation

    def __post_init__(self) -> None:
        for name, choices in (("method", METHODS), ("reward", REWARDS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"AlignConfig.{name} must be one of {choices}, got {getattr(self, name)!r}")
        checks = (("lora_rank", self.lora_rank >= 0), ("beta", self.beta > 0),
                  ("label_smoothing", 0.0 <= self.label_smoothing < 0.5),
                  ("group_size", self.group_size >= 2), ("grpo_iterations", self.grpo_iterations >= 1),
                  ("max_new_tokens", self.max_new_tokens >= 1), ("val_every", self.val_every >= 2),
                  ("clip_eps", self.clip_eps > 0), ("kl_coef", self.kl_coef >= 0),
                  ("temperature", self.temperature > 0))
        for name, ok in checks:
            if not ok:
                raise ValueError(f"AlignConfig.{name} is out of range: {getattr(self, name)!r}")

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())


# Defaults of a short alignment run; lr by method and by what trains (a LoRA adapter starts at
# zero and needs a larger step than the full weights). Measured on the built-in task set
# (BENCHMARKS.md, issue 13): full-weight DPO at 5e-4 collapses (chosen log-probs fall, exact match
# 20.5% -> 7.8%), at 1e-4 it holds; LoRA DPO at 2e-3 lost 4 points (5e-4: scaled down alike, not
# yet measured); GRPO at 1e-3 runs its KL to 0.15-0.37 and loses accuracy.
DEFAULTS = dict(max_steps=300, warmup_steps=10, batch_size=16, schedule="cosine", eval_interval=50,
                eval_batches=4, log_interval=10, grad_clip=1.0, weight_decay=0.0)
LEARNING_RATES = {("dpo", False): 1e-4, ("dpo", True): 5e-4, ("grpo", False): 3e-4, ("grpo", True): 1e-3}


def align_configs(sft_run: str, data: str, out_dir: str, method: str = "dpo",
                  overrides: list[str] | None = None) -> tuple[TrainConfig, AlignConfig]:
    """(TrainConfig, AlignConfig) for aligning `sft_run`: batch_size counts pairs (DPO, IPO) or
    prompts (GRPO: group_size x batch_size sequences); the model config is the SFT run's."""
    if not (Path(sft_run) / checkpoint.CONFIG_FILE).is_file():
        raise FileNotFoundError(f"SFT run not found: {sft_run} has no {checkpoint.CONFIG_FILE}")
    model = checkpoint.load_config(sft_run)
    align_keys = {f.name for f in dataclasses.fields(AlignConfig)}
    align_pairs, train_pairs = [], []
    for pair in overrides or []:
        (align_pairs if pair.partition("=")[0].strip() in align_keys else train_pairs).append(pair)
    # Runs and files are recorded as absolute paths: a resume or `minillm sample` works from anywhere.
    source = data if str(data).startswith("builtin:") else str(Path(data).resolve())
    ac = from_dict(AlignConfig, {"sft_run": str(Path(sft_run).resolve()), "data": source, "method": method,
                                 **parse_overrides(align_pairs)})
    lr = LEARNING_RATES["grpo" if ac.method == "grpo" else "dpo", ac.lora_rank > 0]
    d = {**DEFAULTS, "lr": lr, "min_lr": lr / 10, "block_size": min(model.max_seq_len, 256),
         "data_dir": str(sft_run), "out_dir": str(out_dir), "model": model.to_dict()}
    return train_config_from_dict(d, train_pairs), ac


def record(run_dir: str | Path) -> AlignConfig | None:
    """The AlignConfig a run directory was made with, or None for any other run."""
    d = read_json(Path(run_dir) / checkpoint.CONFIG_FILE, checkpoint.CheckpointError)
    return from_dict(AlignConfig, d["align"]) if "align" in d else None


def split_examples(examples: list, val_every: int) -> tuple[list, list]:
    """(train, val): every val_every-th example is held out for validation."""
    return ([e for i, e in enumerate(examples) if (i + 1) % val_every], examples[val_every - 1::val_every])


def adapter_base(run_dir: str | Path) -> str | None:
    """For an alignment run with a LoRA adapter: the SFT run whose merged weights the adapter sits
    on (what minillm.torch.sft.load_for_inference loads first); None for any other run."""
    if not (Path(run_dir) / checkpoint.CONFIG_FILE).is_file():
        return None
    ac = record(run_dir)
    return ac.sft_run if ac is not None and ac.lora_rank else None
