"""Knowledge distillation (Hinton, Vinyals & Dean 2015): a student learns from the data and from a
frozen teacher's temperature-softened next-token distributions.

    loss = (1 - alpha) * CE(student, data) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

The T^2 keeps the soft term's gradients the same size as T changes (they scale as 1 / T^2).
The teacher's logits are computed on the fly on the same batch, so the teacher must read the same
tokens: same tokenizer as the data (a clear error otherwise). The student is any ModelConfig from
the TOML, or (`init`) the weights of another run, e.g. a pruned copy of the teacher: then
distillation is its recovery training on pretraining data, and pruned zeros stay zero.
Everything else (the loop, resume, Ctrl-C, best/, metrics; val loss = the data's CE alone) is
pretraining's Trainer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from minillm import checkpoint
from minillm.config import TrainConfig
from minillm.files import read_json
from minillm.torch import prune
from minillm.torch.model import model_from_params
from minillm.torch.sft import load_for_inference
from minillm.torch.train import Trainer


@dataclass
class DistillConfig:
    """teacher: a run directory (any run `minillm sample` reads); alpha: weight of the teacher's
    term; temperature: T of both softmaxes; init: a run whose weights start the student."""

    teacher: str
    alpha: float = 0.5
    temperature: float = 2.0
    init: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"distill alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise ValueError(f"distill temperature must be > 0, got {self.temperature}")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, alpha: float,
                      temperature: float) -> torch.Tensor:
    """student, teacher: logits (B, T, V); targets (B, T) (-100 = not trained). The mean over
    trained positions of (1 - alpha) CE + alpha T^2 KL(teacher_T || student_T)."""
    V = student.size(-1)
    s, t, y = student.reshape(-1, V).float(), teacher.reshape(-1, V).float(), targets.reshape(-1)
    trained = y != -100
    ce = F.cross_entropy(s[trained], y[trained])
    log_p_student = F.log_softmax(s[trained] / temperature, dim=-1)  # (N, V)
    log_p_teacher = F.log_softmax(t[trained] / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")  # mean over N
    return (1 - alpha) * ce + alpha * temperature ** 2 * kl


def record(run_dir: str | Path) -> DistillConfig | None:
    """The DistillConfig a run directory was made with (None if it was not distilled)."""
    d = read_json(Path(run_dir) / checkpoint.CONFIG_FILE, checkpoint.CheckpointError)
    return DistillConfig(**d["distill"]) if "distill" in d else None


def check_same_tokenizer(teacher: str | Path, data_dir: str | Path) -> None:
    """The teacher's logits index the data's tokens only if both use one tokenizer."""
    ours, theirs = Path(data_dir) / checkpoint.TOKENIZER_FILE, Path(teacher) / checkpoint.TOKENIZER_FILE
    if read_json(theirs, checkpoint.CheckpointError) != read_json(ours, checkpoint.CheckpointError):
        raise checkpoint.CheckpointError(f"teacher {theirs} is not the tokenizer of the data ({ours}): "
                                         "distillation compares logits token by token (one tokenizer)")


class DistillTrainer(Trainer):
    """The Trainer whose loss mixes the data's CE with the KL to a frozen teacher."""

    def __init__(self, cfg: TrainConfig, dc: DistillConfig, resume: bool = False, quiet: bool | None = None):
        self.dc = dc
        if resume and record(cfg.out_dir) != dc:
            raise checkpoint.CheckpointError(f"{cfg.out_dir} was distilled with other settings: saved "
                                             f"{record(cfg.out_dir)}, asked for {dc}")
        check_same_tokenizer(dc.teacher, cfg.data_dir)
        self.teacher, _ = load_for_inference(dc.teacher)
        if self.teacher.config.vocab_size != cfg.model.vocab_size:
            raise ValueError(f"teacher vocab_size {self.teacher.config.vocab_size} != student "
                             f"model.vocab_size {cfg.model.vocab_size}")
        self.teacher.eval().requires_grad_(False)
        # the loop's step-0 check expects a loss of ln(vocab): true only of CE from scratch
        self.pretrained = dc.init is not None or dc.alpha > 0
        self.pruned, self.masks = None, {}
        super().__init__(cfg, resume, quiet)
        self.teacher.to(self.device)

    def make_model(self) -> torch.nn.Module:
        if self.dc.init is None:
            return super().make_model()
        _, params = checkpoint.load_weights(self.dc.init, self.cfg.model)
        model = model_from_params(self.cfg.model, params)
        self.pruned = prune.record_of(self.dc.init)  # a pruned student: keep its zeros zero
        self.masks = prune.masks_of(model, self.pruned.get("masked", []) if self.pruned else [])
        return model

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher = self.teacher(x)  # (b, T, V), under the trainer's autocast like the student
        return distillation_loss(self.ddp(x), teacher, y, self.dc.alpha, self.dc.temperature)

    def train_step(self) -> tuple[float, float]:
        result = super().train_step()
        prune.reapply_masks(self.model, self.masks)
        return result

    def write_run_files(self, run_dir: Path) -> None:
        extra = {"distill": dataclasses.asdict(self.dc), **({"prune": self.pruned} if self.pruned else {})}
        checkpoint.save_run_files(run_dir, self.cfg, self.data.dir, self.data.meta, extra)
