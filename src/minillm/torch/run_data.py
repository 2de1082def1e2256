"""The PyTorch trainer's view of a prepared data directory (`minillm prepare`, checked by
minillm.checkpoint.check_data_dir): batches as tensors, sharded by rank.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minillm import checkpoint
from minillm.config import TrainConfig
from minillm.data.loader import BatchLoader


class RunData:
    def __init__(self, cfg: TrainConfig, rank: int = 0, world: int = 1):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.dir = Path(cfg.data_dir)
        self.meta = checkpoint.check_data_dir(self.dir, cfg.model.vocab_size)
        micro, self.micro_batch = split_batch(cfg, world)
        self.train = BatchLoader(self.dir, cfg.block_size, micro, seed=cfg.seed, rank=rank, world_size=world)
        # Validation: the same random windows at every eval, drawn from the whole val split
        # (the first windows alone would all come from one play).
        self.val = BatchLoader(self.dir, cfg.block_size, micro, split="val", seed=cfg.seed + 1,
                               rank=rank, world_size=world)

    def train_batch(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each (micro_batch, block_size) int64; y is x shifted by one token."""
        x, y = self.train.next_batch()
        return _to(x, device), _to(y, device)

    def val_batches(self, device: torch.device):
        """A fixed list of eval_batches validation batches (this rank's share)."""
        self.val.load_state_dict({"seed": self.val.seed, "step": 0})
        for _ in range(self.cfg.eval_batches):
            x, y = self.val.next_batch()
            yield _to(x, device), _to(y, device)


def split_batch(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(sequences per micro-step on all ranks together, this rank's share)."""
    micro = cfg.batch_size // cfg.grad_accum
    if micro % world:
        raise ValueError(f"micro-batch {micro} (batch_size / grad_accum) must be divisible by "
                         f"the number of ranks ({world})")
    return micro, micro // world


def _to(a, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(a).long().to(device, non_blocking=True)  # on the CPU: no copy
