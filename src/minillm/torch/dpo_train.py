"""DPO / IPO training in PyTorch: the fine-tuning Trainer with the data, the model and the loss swapped.

- the data: preference pairs (minillm.data.prefs), a batch = chosen rows then rejected rows;
- the model: the SFT run's weights (merged, minillm.torch.sft.load_for_inference). With
  lora_rank > 0 a new LoRA adapter trains on them and the reference is the same model with the
  adapter off (no second copy); with lora_rank 0 every weight trains and a frozen copy is the reference;
- the loss: minillm.torch.dpo.pair_loss, whose diagnostics (reward margins and accuracy, chosen and
  rejected log-probs, KL to the reference) join each train row of metrics.jsonl, and the validation
  pairs' ones each eval row (prefixed "val_").
The reference, the run record and the diagnostics plumbing are AlignTrainer's (torch/align_train.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from minillm import align
from minillm.align import AlignConfig
from minillm.config import TrainConfig
from minillm.data import prefs
from minillm.torch.align_train import AlignTrainer, mean_metrics
from minillm.torch.dpo import completion_logprobs, pair_loss
from minillm.torch.run_data import RunData, split_batch


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


class DPOTrainer(AlignTrainer):
    """The Trainer on preference pairs from an SFT run: DPO or IPO, full weights or a LoRA adapter."""

    METHODS = ("dpo", "ipo")

    def __init__(self, cfg: TrainConfig, ac: AlignConfig, resume: bool = False, quiet: bool | None = None):
        super().__init__(cfg, ac, resume, quiet)
        if self.is_main:
            print(f"{ac.method}: {self.describe_params()}")

    def make_data(self) -> PrefData:
        return PrefData(self.cfg, self.ac, self.tokenizer, self.rank, self.world)

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
