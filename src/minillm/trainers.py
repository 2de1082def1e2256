"""Which trainer runs a config: the encoder-decoder's, JAX's or PyTorch's.

`minillm train`, `minillm sweep` and the docs' figures all start runs through `make_trainer`, then
hand the trainer to `minillm.train_loop.train`. The frameworks are imported only when chosen, so
this module (and every command that imports it) stays framework-free.
"""

from __future__ import annotations

from minillm.config import TrainConfig
from minillm.train_loop import Trainer


def make_trainer(cfg: TrainConfig, resume: bool = False, quiet: bool | None = None) -> Trainer:
    """The trainer for this config; an encoder-decoder trains on the seq2seq task set data_dir names."""
    if cfg.model.encoder_layers:
        from minillm.torch.seq2seq_train import Seq2SeqTrainer as Impl
    elif cfg.backend == "jax":
        from minillm.jax.train import Trainer as Impl
    else:
        from minillm.torch.train import Trainer as Impl
    return Impl(cfg, resume=resume, quiet=quiet)
