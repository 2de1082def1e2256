"""DPO / IPO training in PyTorch: the fine-tuning Trainer with the data, the model and the loss swapped.

- the data: preference pairs (minillm.data.prefs), a batch = chosen rows then rejected rows;
- the model: the SFT run's weights (merged, minillm.torch.sft.load_for_inference). With
  lora_rank > 0 a new LoRA adapter trains on them and the reference is the same model with the
  adapter off (no second copy); with lora_rank 0 every weight trains and a frozen copy is the reference;
- the loss: minillm.torch.dpo.pair_loss, whose diagnostics (reward margins and accuracy, chosen and
  rejected log-probs, KL to the reference) join each train row of metrics.jsonl, and the validation
  pairs' ones each eval row (prefixed "val_").
What a checkpoint holds (the full weights, or the adapter alone), resume after a kill, Ctrl-C and
the NaN stop are fine-tuning's (minillm.torch.sft.FinetuneTrainer), hence the subclass.
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
from minillm.data import prefs
from minillm.finetune import FinetuneConfig
from minillm.tokenizer import load_tokenizer
from minillm.torch import lora
from minillm.torch.dpo import completion_logprobs, pair_loss
from minillm.torch.model import model_from_params, model_params
from minillm.torch.run_data import RunData, split_batch
from minillm.torch.sft import FinetuneTrainer, load_for_inference
from minillm.torch.train import Trainer
from minillm.viz.metrics import MetricsLog


class PrefData(RunData):
    """RunData's interface (train_batch, val_batches, micro_batch, dir, meta) over preference pairs;
    micro_batch counts pairs (a micro-batch has twice as many rows)."""

    def __init__(self, cfg: TrainConfig, ac: AlignConfig, tokenizer, rank: int = 0, world: int = 1):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.dir = Path(ac.sft_run)  # the tokenizer the run copies is the SFT run's
        micro, self.micro_batch = split_batch(cfg, world)
        train, val = align.split_examples(prefs.read_pairs(ac.data), ac.val_every)
        if not val:
            raise ValueError(f"{ac.data}: {len(train)} pairs leave none for validation (val_every = "
                             f"{ac.val_every}); add pairs or --set val_every=N with N <= {len(train)}")
        pad = tokenizer.special_id("pad")
        train = prefs.tokenize_pairs(tokenizer, train, cfg.block_size)
        val = prefs.tokenize_pairs(tokenizer, val, cfg.block_size, log=lambda _: None)
        self.train = prefs.PrefBatches(train, cfg.block_size, micro, pad, cfg.seed, rank, world)
        self.val = prefs.PrefBatches(val, cfg.block_size, min(micro, len(val)), pad, cfg.seed + 1,
                                     rank, world)
        self.meta = {"source": ac.data, "train_pairs": len(train), "val_pairs": len(val),
                     "truncated": train.n_truncated, "skipped": train.n_skipped}


class AlignMetricsLog(MetricsLog):
    """metrics.jsonl whose train rows carry the step's diagnostics and eval rows the validation ones:
    the loop writes its rows through the trainer's `metrics`, so no loop change is needed."""

    def __init__(self, path: Path, trainer: "DPOTrainer"):
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


class StepDiagnostics:
    """Trainer mixin: `loss` appends each micro-batch's diagnostics to self.micro_metrics, and
    train_step averages them into self.step_metrics, which AlignMetricsLog joins to the step's row."""

    def train_step(self) -> tuple[float, float]:
        self.micro_metrics = []
        out = super().train_step()
        self.step_metrics = mean_metrics(self.micro_metrics)  # over the grad_accum micro-batches
        return out


class DPOTrainer(StepDiagnostics, FinetuneTrainer):
    """The Trainer on preference pairs from an SFT run: DPO or IPO, full weights or a LoRA adapter."""

    def __init__(self, cfg: TrainConfig, ac: AlignConfig, resume: bool = False, quiet: bool | None = None):
        if ac.method not in ("dpo", "ipo"):
            raise ValueError(f"DPOTrainer trains dpo or ipo, not {ac.method!r}")
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
        if self.is_main:
            print(f"{ac.method}: {self.describe_params()}")

    def make_data(self) -> PrefData:
        return PrefData(self.cfg, self.ac, self.tokenizer, self.rank, self.world)

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
        training = self.model.training
        lora.set_adapter(self.model, None)
        self.model.eval()
        try:
            yield self.model
        finally:
            lora.set_adapter(self.model, "default")
            self.model.train(training)

    def pair_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The reference's log-probs first (no graph), then the policy's and the loss."""
        kind = "ipo" if self.ac.method == "ipo" else "sigmoid"
        with torch.no_grad(), self.reference_model() as reference:
            ref_logps = completion_logprobs(reference, x, y, average=kind == "ipo")  # (2b,)
        return pair_loss(self.ddp, x, y, ref_logps, self.ac.beta, self.ac.label_smoothing, kind)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y (2b, T): b chosen rows then their b rejected rows."""
        loss, metrics = self.pair_loss(x, y)
        self.micro_metrics.append(metrics)
        return loss

    @torch.no_grad()
    def evaluate(self) -> float:
        """The mean DPO / IPO loss over a fixed set of eval_batches batches of the held-out pairs."""
        self.model.eval()
        losses, rows = [], []
        for x, y in self.data.val_batches(self.device):
            with self.autocast():
                loss, metrics = self.pair_loss(x, y)
            losses.append(loss.item())
            rows.append(metrics)
        self.model.train()
        self.val_metrics = mean_metrics(rows, "val_")
        return self._mean_over_ranks(float(np.mean(losses)))

    def write_run_files(self, run_dir: Path) -> None:
        extra = {"align": vars(self.ac)}  # names the SFT run: what resume and inference load
        checkpoint.save_run_files(run_dir, self.cfg, self.data.dir, self.data.meta, extra)
