"""Training the encoder-decoder (minillm.torch.seq2seq) on a seq2seq task set: the pretraining
Trainer with its data, model and loss swapped (the pattern of minillm.torch.sft's FinetuneTrainer).

`minillm train` picks it for a config with model.encoder_layers > 0; TrainConfig.data_dir then
names the task set (minillm.data.seq2seq_tasks: "builtin:shakespeare-reverse", a JSONL file, or a
directory with train.jsonl). Every 20th train example is held out for validation; the test split
is for `minillm eval --tasks`. The task's char tokenizer is written to out_dir/task/ (the "data
directory" the run's tokenizer is copied from and checked against on resume). The loop, resume
after a kill, Ctrl-C, the NaN stop and metrics are pretraining's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minillm import checkpoint
from minillm.config import TrainConfig
from minillm.data import seq2seq_tasks
from minillm.torch.model import next_token_loss
from minillm.torch.run_data import split_batch
from minillm.torch.seq2seq import Seq2SeqTransformer
from minillm.torch.train import Trainer

VAL_EVERY = 20  # every 20th train example is held out for validation


class Seq2SeqData:
    """RunData's interface (train_batch, val_batches, micro_batch, dir, meta) over a task set.
    A batch is ((source, source_mask, target_in), target_out): the model's inputs and the targets."""

    def __init__(self, cfg: TrainConfig, rank: int = 0, world: int = 1):
        self.cfg = cfg
        examples = seq2seq_tasks.load(cfg.data_dir, "train")
        tokenizer = seq2seq_tasks.task_tokenizer(examples)
        if cfg.model.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the task's "
                             f"tokenizer vocabulary ({tokenizer.vocab_size}) of {cfg.data_dir}; set "
                             f"model.vocab_size = {tokenizer.vocab_size}")
        self.dir = Path(cfg.out_dir) / "task"  # the run's tokenizer comes from here
        self.dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save(self.dir / checkpoint.TOKENIZER_FILE)  # atomic
        specials = {name: tokenizer.special_id(name) for name in ("bos", "eos", "pad")}
        train = [e for i, e in enumerate(examples) if i % VAL_EVERY]
        val = examples[::VAL_EVERY]
        micro, self.micro_batch = split_batch(cfg, world)
        encode = lambda part: seq2seq_tasks.encode_pairs(tokenizer, part, cfg.model.max_seq_len)  # noqa: E731
        self.train = seq2seq_tasks.Seq2SeqBatches(encode(train), micro, specials, cfg.seed, rank, world)
        self.val = seq2seq_tasks.Seq2SeqBatches(encode(val), micro, specials, cfg.seed + 1, rank, world)
        self.meta = {"source": cfg.data_dir, "vocab_size": tokenizer.vocab_size, "train_examples": len(train),
                     "val_examples": len(val), **specials}

    def train_batch(self, device: torch.device):
        return _to(self.train.next_batch(), device)

    def val_batches(self, device: torch.device):
        """A fixed list of eval_batches validation batches (the same at every evaluation)."""
        self.val.load_state_dict({"seed": self.val.seed, "step": 0})
        for _ in range(self.cfg.eval_batches):
            yield _to(self.val.next_batch(), device)


def _to(arrays, device: torch.device):
    source, mask, target_in, target_out = (torch.from_numpy(a).to(device) for a in arrays)
    return (source, mask, target_in), target_out


class Seq2SeqTrainer(Trainer):
    """The Trainer on a task set's (source, answer) pairs, with teacher forcing."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, quiet: bool | None = None):
        if cfg.backend != "torch" or cfg.compile:
            raise ValueError(f"model.encoder_layers > 0 trains with backend='torch' and compile=false, got "
                             f"backend={cfg.backend!r}, compile={cfg.compile}")
        super().__init__(cfg, resume, quiet)

    def make_data(self) -> Seq2SeqData:
        return Seq2SeqData(self.cfg, self.rank, self.world)

    def make_model(self) -> torch.nn.Module:
        return Seq2SeqTransformer(self.cfg.model)

    def loss(self, x, y: torch.Tensor) -> torch.Tensor:
        """Mean loss over the answers' tokens and eos; x = (source, source_mask, target_in)."""
        return next_token_loss(self.ddp(x[0], x[2], x[1]), y)

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        losses = []
        for (source, mask, target_in), target_out in self.data.val_batches(self.device):
            with self.autocast():
                losses.append(next_token_loss(self.model(source, target_in, mask), target_out).item())
        self.model.train()
        return self._mean_over_ranks(sum(losses) / len(losses))
