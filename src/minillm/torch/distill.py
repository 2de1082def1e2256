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

With a teacher cache (`teacher_cache`, minillm.torch.teacher_cache) the teacher runs once over the
training split instead, keeping its top_k next tokens per position, and the student trains on the
cache's windows with `sparse_distillation_loss`: a student step then costs about what it costs
alone (one more softmax over the vocabulary), not that plus the teacher's forward.
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
from minillm.torch import prune, teacher_cache
from minillm.torch.model import model_from_params
from minillm.torch.sft import load_for_inference
from minillm.torch.train import Trainer


@dataclass
class DistillConfig:
    """teacher: a run directory (any run `minillm sample` reads); alpha: weight of the teacher's
    term; temperature: T of both softmaxes; init: a run whose weights start the student;
    teacher_cache: a directory for the teacher's cached top_k log-probs, stored as cache_dtype
    (None: the teacher runs on every batch)."""

    teacher: str
    alpha: float = 0.5
    temperature: float = 2.0
    init: str | None = None
    teacher_cache: str | None = None
    top_k: int = 32
    cache_dtype: str = "float16"

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"distill alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise ValueError(f"distill temperature must be > 0, got {self.temperature}")
        if not (isinstance(self.top_k, int) and self.top_k >= 1):
            raise ValueError(f"distill top_k must be a positive integer, got {self.top_k!r}")
        if self.cache_dtype not in teacher_cache.DTYPES:
            raise ValueError(f"distill cache_dtype must be one of {teacher_cache.DTYPES}, "
                             f"got {self.cache_dtype!r}")


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


def sparse_distillation_loss(student: torch.Tensor, targets: teacher_cache.CachedTargets, alpha: float,
                             temperature: float) -> torch.Tensor:
    """distillation_loss with the teacher known only by its top-k tokens (a teacher cache).

    student: logits (B, T, V); targets: y (B, T), and the teacher's ids, log_p (B, T, k) and
    log_tail (B, T) at temperature T. The KL is taken between the two distributions coarsened to
    k + 1 outcomes, the teacher's top-k tokens and "any other token":

        KL = sum_i p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail),  i in top-k

    with q = softmax(student / T) (the full softmax, gathered at the ids) and q_tail its mass on
    the other V - k tokens. The teacher's probabilities are not renormalised over the top-k:
    renormalising (or dropping the tail term) has its minimum where the student puts no mass
    outside the top-k at all, which at T = 2 is far from the teacher (several % of its mass is
    there). With the tail term the minimum is q_i = p_i on the top-k and q_tail = p_tail, the
    KL is >= 0, and at k = V it is the full KL exactly (p_tail = 0).
    """
    V = student.size(-1)
    y = targets.y.reshape(-1)  # (N,)
    ids, log_p = targets.ids.reshape(len(y), -1), targets.log_p.reshape(len(y), -1).float()  # (N, k)
    log_tail = targets.log_tail.reshape(-1).float()  # (N,)
    return _SparseKD.apply(student.reshape(-1, V).float(), y, ids, log_p, log_tail, alpha, temperature)


class _SparseKD(torch.autograd.Function):
    """sparse_distillation_loss as one autograd node with its gradient in closed form. For a
    small student the softmax over the vocabulary is a good part of its step, and autograd's
    chain (log_softmax, gather, the tail, the CE beside it) makes ~10 passes over (N, V) where
    this makes ~6. Per trained row, with z = s / T, q = softmax(z), d KL / d z = q - target,
    target = p on the ids and q * p_tail / q_tail on the other tokens (the student's tail,
    rescaled to the teacher's tail mass); d CE / d s = softmax(s) - onehot(y)."""

    @staticmethod
    def forward(ctx, s, y, ids, log_p, log_tail, alpha: float, temperature: float):
        trained = (y != -100).float()  # (N,) rows are weighted out, never indexed out: no (N, V) copies
        n = trained.sum()
        log_s = F.log_softmax(s, dim=-1)  # (N, V)
        log_q = log_s if temperature == 1 else F.log_softmax(s / temperature, dim=-1)
        ce = -(log_s.gather(-1, y.clamp_min(0)[:, None])[:, 0] * trained).sum() / n
        log_q_top = log_q.gather(-1, ids)  # (N, k)
        # The student's tail mass, 1 - its mass on the ids. It is ~0 up to rounding when the ids
        # cover the vocabulary (k = V, where p_tail = 0): the floor keeps its log finite. (Below
        # ~1e-6 the float32 difference is imprecise; p_tail there is ~0 too, so the term is.)
        q_tail = (1 - log_q_top.exp().sum(-1)).clamp_min(1e-8)  # (N,)
        p_tail = log_tail.exp()
        kl = (log_p.exp() * (log_p - log_q_top)).sum(-1) + torch.xlogy(p_tail, p_tail) - p_tail * q_tail.log()
        ctx.save_for_backward(log_s, log_q, y, ids, log_p, p_tail / q_tail, trained / n)
        ctx.alpha, ctx.temperature = alpha, temperature
        return (1 - alpha) * ce + alpha * temperature ** 2 * (kl * trained).sum() / n

    @staticmethod
    def backward(ctx, grad):
        log_s, log_q, y, ids, log_p, tail_ratio, weight = ctx.saved_tensors
        alpha, T = ctx.alpha, ctx.temperature
        q = log_q.exp()  # (N, V)
        g = q * (alpha * T * (1 - tail_ratio))[:, None]  # KL, off the ids (T^2 * d z / d s = T)
        g.scatter_(-1, ids, alpha * T * (q.gather(-1, ids) - log_p.exp()))  # KL, on the ids: q - p
        g.add_(q if T == 1 else log_s.exp(), alpha=1 - alpha)  # CE: softmax(s) ...
        g.scatter_add_(-1, y.clamp_min(0)[:, None], torch.full_like(weight, alpha - 1)[:, None])  # - onehot
        return g.mul_((weight * grad)[:, None]), None, None, None, None, None, None


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
        super().__init__(cfg, resume, quiet)  # make_data builds or opens the teacher cache, if any
        if dc.teacher_cache is None:
            self.teacher.to(self.device)
        else:
            self.teacher = None  # its work is done: the cache holds what the loss needs

    def make_data(self):
        if self.dc.teacher_cache is None:
            return super().make_data()
        self.teacher.to(self.device)
        wanted = teacher_cache.wanted_record(self.dc.teacher, self.teacher, self.cfg.data_dir,
                                             self.cfg.block_size, self.dc.top_k, self.dc.temperature,
                                             self.dc.cache_dtype, self.dtype)
        # one rank builds (or reuses) the cache, the others wait for it and read the result
        cache = teacher_cache.open_cache(self.dc.teacher_cache, self.teacher, wanted, self.cfg.batch_size,
                                         self.autocast, self.quiet) if self.is_main else None
        if self.world > 1:
            torch.distributed.barrier()
        cache = cache or teacher_cache.TeacherCache(self.dc.teacher_cache)
        return teacher_cache.CachedRunData(self.cfg, cache, self.rank, self.world)

    def make_model(self) -> torch.nn.Module:
        if self.dc.init is None:
            return super().make_model()
        _, params = checkpoint.load_weights(self.dc.init, self.cfg.model)
        model = model_from_params(self.cfg.model, params)
        self.pruned = prune.record_of(self.dc.init)  # a pruned student: keep its zeros zero
        self.masks = prune.masks_of(model, self.pruned.get("masked", []) if self.pruned else [])
        return model

    def loss(self, x: torch.Tensor, y) -> torch.Tensor:
        """y: the next tokens (b, T), or with a teacher cache the CachedTargets of the batch."""
        if isinstance(y, teacher_cache.CachedTargets):
            return sparse_distillation_loss(self.ddp(x), y, self.dc.alpha, self.dc.temperature)
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
