"""Supervised fine-tuning in PyTorch: the pretraining Trainer with three parts swapped.

- the data: chat-template batches of a conversation source (minillm.data.sft) instead of token
  shards, with prompt and padding targets set to -100 so only the answers are learned;
- the model: the base run's weights, and for method "lora" adapters on a frozen base
  (minillm.torch.lora), so the optimizer holds the adapters alone;
- what a checkpoint holds: for LoRA, the adapter (adapter.safetensors + adapter.json, and for the
  LLaMA family peft's format in peft/) instead of model.safetensors, and only the adapter in
  trainer_state.safetensors (the base is a file of its own, named in config.json).
Everything else (the loop, resume after a kill, Ctrl-C, the NaN stop, metrics) is pretraining's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minillm import align, checkpoint, finetune
from minillm.config import TrainConfig
from minillm.data import sft
from minillm.finetune import FinetuneConfig
from minillm.interop.hf import family
from minillm.interop.peft import load_peft, save_peft
from minillm.tokenizer import load_tokenizer
from minillm.torch import lora, moe, prune
from minillm.torch.model import load_model, model_from_params
from minillm.torch.quant_format import load_quantized, quantization_record
from minillm.torch.run_data import RunData, split_batch
from minillm.torch.train import Trainer


class SFTData(RunData):
    """RunData's interface (train_batch, val_batches, micro_batch, dir, meta) over conversations."""

    def __init__(self, cfg: TrainConfig, ft: FinetuneConfig, tokenizer, rank: int = 0, world: int = 1):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.dir = Path(ft.base_run)  # the tokenizer the run copies is the base's
        micro, self.micro_batch = split_batch(cfg, world)
        # Padding is masked out of the loss and attention, so any id works where a tokenizer (an
        # imported one) has no <|pad|>.
        pad = (tokenizer.role_ids("pad") or [0])[0]
        train, val = finetune.conversations(ft.data, ft.val_every)
        train = sft.tokenize(tokenizer, train, cfg.block_size, ft.overlong)
        val = sft.tokenize(tokenizer, val, cfg.block_size, ft.overlong, log=lambda _: None)
        self.train = sft.SFTBatches(train, cfg.block_size, micro, pad, ft.layout, cfg.seed, rank, world)
        self.val = sft.SFTBatches(val, cfg.block_size, min(micro, len(val)), pad, ft.layout, cfg.seed + 1,
                                  rank, world)
        self.meta = {"source": ft.data, "train_examples": len(train), "val_examples": len(val),
                     "truncated": train.n_truncated, "skipped": train.n_skipped}


class FinetuneTrainer(Trainer):
    """The Trainer on SFT batches from a base run; full fine-tuning or LoRA."""

    pretrained = True  # the step-0 loss is not ln(vocab_size): the loop does not flag it
    pruned, masks = None, {}  # a base from `minillm prune` with zeroed weights: its record, its masks

    def __init__(self, cfg: TrainConfig, ft: FinetuneConfig, resume: bool = False, quiet: bool | None = None):
        self.ft = ft
        saved = finetune.record(cfg.out_dir) if resume else None
        if resume and saved != ft:
            raise checkpoint.CheckpointError(f"{cfg.out_dir} was fine-tuned with other settings: "
                                             f"saved {saved}, asked for {ft}")
        self.tokenizer = load_tokenizer(Path(ft.base_run) / checkpoint.TOKENIZER_FILE)
        super().__init__(cfg, resume, quiet)
        if self.is_main:
            print(self.describe_params())

    def make_data(self) -> SFTData:
        return SFTData(self.cfg, self.ft, self.tokenizer, self.rank, self.world)

    def make_model(self) -> torch.nn.Module:
        _, params = checkpoint.load_weights(self.ft.base_run, self.cfg.model)  # checks the shapes fit
        model = model_from_params(self.cfg.model, params)
        self.pruned = prune.record_of(self.ft.base_run)  # a `minillm prune` base: keep its zeros zero
        masked = self.pruned.get("masked", []) if self.pruned and self.ft.method == "full" else []
        self.masks = prune.masks_of(model, masked)
        if self.ft.method == "lora":
            lora.add_lora(model, self.ft.lora_rank, self.ft.lora_alpha, self.ft.lora_dropout, self.ft.targets)
            lora.freeze_base(model)
        return model

    def describe_params(self) -> str:
        s = lora.trainable_summary(self.model)
        if self.ft.method == "full":
            return f"full fine-tuning: {s['trainable']:,} trainable parameters"
        return (f"LoRA rank {self.ft.lora_rank}: {s['trainable']:,} trainable parameters "
                f"({100 * s['trainable'] / s['total']:.2f}% of {s['total']:,}); AdamW state "
                f"{s['adamw_bytes_saved'] / 2**20:.1f} MiB smaller than full fine-tuning")

    def lr_scale(self, name: str) -> float:
        """LoRA+ (Hayou et al. 2024): B (zero at the start) learns loraplus_lr_ratio times faster than A."""
        return self.ft.loraplus_lr_ratio if ".lora_B." in name else 1.0

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """lm_head and the loss at trained positions only (the answers, ~15% of a batch): the same
        mean as next_token_loss over all positions, for less compute. DDP / compile: the wrapper."""
        if self.ddp is not self.model:
            return super().loss(x, y)
        trained = y != sft.IGNORE_INDEX  # (b, T)
        h = self.model.hidden(x)[trained]  # (n, D)
        return F.cross_entropy(self.model.lm_head(h).float(), y[trained]) + moe.aux_loss(self.model)

    def train_step(self) -> tuple[float, float]:
        result = super().train_step()
        prune.reapply_masks(self.model, self.masks)  # the optimizer moved pruned weights off zero
        return result

    # --- what the run directory holds -------------------------------------------------------
    def write_run_files(self, run_dir: Path) -> None:
        extra = {"finetune": vars(self.ft)}  # names the base: what resume and inference load
        if self.pruned:
            extra["prune"] = self.pruned
        checkpoint.save_run_files(run_dir, self.cfg, self.data.dir, self.data.meta, extra)

    def state_params(self) -> dict[str, np.ndarray]:
        if self.ft.method == "full":
            return super().state_params()
        trained = {n: p for n, p in self.model.named_parameters() if p.requires_grad}  # the adapter
        return {n: p.detach().float().cpu().numpy() for n, p in trained.items()}

    def restore_params(self, weights: dict) -> None:
        if self.ft.method == "full":
            return super().restore_params(weights)
        expected = {n for n, p in self.model.named_parameters() if p.requires_grad}  # the adapter's
        if set(weights) != expected:
            raise checkpoint.CheckpointError(f"{self.run_dir / checkpoint.STATE_FILE} holds other adapter "
                                             f"tensors than this run's LoRA config makes")
        self.model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)

    def save_weights(self, run_dir: Path, metadata: dict[str, str] | None = None) -> None:
        if self.ft.method == "full":
            return super().save_weights(run_dir, metadata)
        lora.save_adapter(self.model, run_dir)
        if family(self.cfg.model) == "llama":  # and in peft's format, for peft + transformers users
            save_peft(self.model, run_dir / "peft")


def load_for_inference(run_dir: str | Path, adapter: str | Path | None = None):
    """(model, tokenizer) for generation: a run's weights, or for a LoRA run its base's weights
    with its adapter. `adapter` adds an adapter directory (ours: adapter.json, or peft's:
    adapter_config.json) to a run with full weights. The adapter is merged in and the layers
    turned back into nn.Linear, so the fast decoder (minillm.torch.packed) sees plain weights.
    A quantized run (minillm.torch.quant_format) loads with its integer layers."""
    run_dir = Path(run_dir)
    ft = finetune.record(run_dir) if (run_dir / checkpoint.CONFIG_FILE).is_file() else None
    base = ft.base_run if ft is not None and ft.method == "lora" else align.adapter_base(run_dir)
    if base is not None:  # a LoRA run: an adapter on a base run, or an alignment's on its SFT run
        if adapter is not None:
            raise ValueError(f"{run_dir} is a LoRA run (an adapter on {base}); give --adapter "
                             f"with the base run instead")
        model, _ = load_for_inference(base)  # merged: an SFT run may itself be a LoRA run
        tokenizer = load_tokenizer(run_dir / checkpoint.TOKENIZER_FILE)
        adapter = run_dir
    elif (run_dir / checkpoint.CONFIG_FILE).is_file() and quantization_record(run_dir) is not None:
        if adapter is not None:  # LoRA layers over integer weights do not merge (minillm.torch.lora)
            raise ValueError(f"{run_dir} is a quantized run: quantize the run with its adapter merged in")
        return load_quantized(run_dir)
    else:
        model, tokenizer = load_model(run_dir)
    if adapter is not None:
        adapter = Path(adapter)
        if (adapter / "adapter_config.json").is_file():
            load_peft(model, adapter)
        else:
            lora.load_adapter(model, adapter)
        lora.strip_lora(model)
    return model.eval(), tokenizer
