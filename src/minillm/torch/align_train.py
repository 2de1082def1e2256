"""What the alignment trainers (DPO / IPO in torch/dpo_train.py, GRPO in torch/grpo_train.py) share:
the fine-tuning Trainer started from an SFT run's merged weights, a reference model (a frozen copy, or
the policy with its LoRA adapter off: no second copy), the "align" record in config.json, and
per-step diagnostics joined to the rows of metrics.jsonl. What a checkpoint holds (the full weights,
or the adapter alone), resume after a kill, Ctrl-C and the NaN stop are fine-tuning's
(minillm.torch.sft.FinetuneTrainer), hence the subclass.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import numpy as np
import torch

from minillm import align, checkpoint
from minillm.align import AlignConfig
from minillm.config import TrainConfig
from minillm.finetune import FinetuneConfig
from minillm.tokenizer import load_tokenizer
from minillm.torch import lora
from minillm.torch.model import model_from_params, model_params
from minillm.torch.sft import FinetuneTrainer, load_for_inference
from minillm.torch.train import Trainer
from minillm.viz.metrics import MetricsLog


class AlignMetricsLog(MetricsLog):
    """metrics.jsonl whose train rows carry the step's diagnostics and eval rows the validation ones:
    the loop writes its rows through the trainer's `metrics`, so no loop change is needed."""

    def __init__(self, path: Path, trainer: "AlignTrainer"):
        super().__init__(path)
        self.trainer = trainer

    def append(self, row: dict) -> None:
        extra = self.trainer.step_metrics if row.get("train_loss") is not None else self.trainer.val_metrics
        super().append({**row, **extra})


def finetune_view(ac: AlignConfig) -> FinetuneConfig:
    """What FinetuneTrainer's checkpoint hooks read (full weights or an adapter), from an AlignConfig."""
    return FinetuneConfig(base_run=ac.sft_run, data=ac.data, method="lora" if ac.lora_rank else "full",
                          lora_rank=max(ac.lora_rank, 1), lora_alpha=ac.lora_alpha,
                          lora_targets=ac.lora_targets)


def mean_metrics(rows: list[dict[str, float]], prefix: str = "") -> dict[str, float]:
    return {prefix + k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}


class AlignTrainer(FinetuneTrainer):
    """The fine-tuning Trainer from an SFT run with a reference model. A subclass names its METHODS
    and supplies make_data and loss; its `loss` appends each micro-batch's diagnostics to
    self.micro_metrics, train_step averages them into self.step_metrics, and AlignMetricsLog joins
    those (and self.val_metrics, set by `evaluate`) to the rows of metrics.jsonl."""

    METHODS: tuple[str, ...] = ()

    def __init__(self, cfg: TrainConfig, ac: AlignConfig, resume: bool = False, quiet: bool | None = None):
        if ac.method not in self.METHODS:
            raise ValueError(f"{type(self).__name__} trains {' or '.join(self.METHODS)}, not {ac.method!r}")
        self.ac, self.ft = ac, finetune_view(ac)
        saved = align.record(cfg.out_dir) if resume else None
        if resume and saved != ac:
            raise checkpoint.CheckpointError(f"{cfg.out_dir} was aligned with other settings: "
                                             f"saved {saved}, asked for {ac}")
        self.tokenizer = load_tokenizer(Path(ac.sft_run) / checkpoint.TOKENIZER_FILE)
        self.reference: torch.nn.Module | None = None  # set by make_model; None: the adapter off
        self.micro_metrics: list[dict[str, float]] = []
        self.step_metrics: dict[str, float] = {}
        self.val_metrics: dict[str, float] = {}
        Trainer.__init__(self, cfg, resume, quiet)  # FinetuneTrainer's __init__ checks a finetune record
        if self.reference is not None:
            self.reference.to(self.device)
        self.metrics = AlignMetricsLog(self.metrics.path, self)

    def make_model(self) -> torch.nn.Module:
        sft_model, _ = load_for_inference(self.ac.sft_run)  # merged: a LoRA SFT run's adapter folded in
        model = model_from_params(self.cfg.model, model_params(sft_model))  # cfg.model: e.g. its dropout
        if self.ac.lora_rank:
            lora.add_lora(model, self.ac.lora_rank, self.ac.lora_alpha, 0.0, self.ac.targets)
            lora.freeze_base(model)
        else:
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        return model.train()

    @contextlib.contextmanager
    def reference_model(self):
        """The frozen copy, or the policy with its adapter off; in eval mode (no dropout) either way."""
        if self.reference is not None:
            yield self.reference
            return
        lora.set_adapter(self.model, None)
        try:
            with self.eval_mode() as model:
                yield model
        finally:
            lora.set_adapter(self.model, "default")

    @contextlib.contextmanager
    def eval_mode(self):
        """The policy itself, in eval mode (no dropout) for the duration."""
        training = self.model.training
        self.model.eval()
        try:
            yield self.model
        finally:
            self.model.train(training)

    def write_run_files(self, run_dir: Path) -> None:
        extra = {"align": vars(self.ac)}  # names the SFT run: what resume and inference load
        checkpoint.save_run_files(run_dir, self.cfg, self.data.dir, self.data.meta, extra)

    def train_step(self) -> tuple[float, float]:
        self.micro_metrics = []
        out = super().train_step()
        self.step_metrics = mean_metrics(self.micro_metrics)  # over the grad_accum micro-batches
        return out
