"""The GRPO trainer: pretraining's Trainer (and its loop) with the batch sampled by the policy itself.

- the data: prompts of a task set (every val_every-th held out), in a fixed shuffled order; each
  step's batch is batch_size prompts x group_size completions sampled from the CURRENT policy
  (minillm.torch.grpo.sample_groups), scored by the reward, turned into advantages, with the
  reference's log-probs (and, when one batch serves several steps, the sampling policy's);
- the model: the SFT run's weights (merged, minillm.torch.sft.load_for_inference), with a new LoRA
  adapter when lora_rank > 0 (the reference is then the same model with the adapter off), or
  every weight training against a frozen copy (lora_rank 0);
- the loss: minillm.torch.grpo.grpo_loss.

Exact resume: prompts and sampling seeds are pure functions of (seed, round, micro-step, rank), so
a resumed run samples what the uninterrupted one did. With grpo_iterations mu > 1 a sampled batch
serves mu optimizer steps (sampled at steps divisible by mu); a checkpoint in the middle of such a
round holds that batch (token ids, advantages, log-probs: JSON, exact for float32) in the data
state, since the policy that sampled it is gone. Each train row of metrics.jsonl carries the step's
mean reward, reward spread (the mean within-group std), completion length, KL to the reference and
clip fraction; each eval row the held-out prompts' mean greedy reward (val_reward).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from minillm import align, checkpoint
from minillm.align import AlignConfig
from minillm.config import TrainConfig
from minillm.data import rewards, tasks
from minillm.tokenizer import load_tokenizer
from minillm.torch import grpo, lora
from minillm.torch.dpo_train import AlignMetricsLog, StepDiagnostics, finetune_view
from minillm.torch.evaluate import answer_tasks
from minillm.torch.logprobs import IGNORE_INDEX, token_logprobs
from minillm.torch.model import model_from_params, model_params
from minillm.torch.run_data import split_batch
from minillm.torch.sft import FinetuneTrainer, load_for_inference
from minillm.torch.train import Trainer


class GroupData:
    """RunData's interface (train_batch, micro_batch, dir, meta, train.state_dict) over prompts whose
    completions the trainer samples: `rollout(examples, seeds) -> batch` is set by the trainer."""

    def __init__(self, cfg: TrainConfig, ac: AlignConfig, rank: int = 0, world: int = 1):
        self.cfg, self.ac, self.rank, self.world = cfg, ac, rank, world
        self.dir = Path(ac.sft_run)  # the tokenizer the run copies is the SFT run's
        self.prompts, self.micro_batch = split_batch(cfg, world)  # prompts per micro-step: all ranks, ours
        self.examples, self.val = align.split_examples(tasks.load_tasks(ac.data, "train"), ac.val_every)
        if not self.examples or not self.val:
            raise ValueError(f"{ac.data}: {len(self.examples)} training and {len(self.val)} held-out prompts "
                             f"with val_every={ac.val_every}; GRPO needs both")
        self.meta = {"source": ac.data, "train_examples": len(self.examples), "val_examples": len(self.val)}
        self.calls, self.batches = 0, {}  # train_batch calls so far; micro-step -> this round's batch
        self.rollout, self._orders = None, {}
        self.train = self  # what the Trainer checkpoints: data.train.state_dict()

    # --- which prompts and seeds: pure functions of (seed, round, micro-step, rank) ----------------
    def _order(self, epoch: int) -> np.ndarray:
        """The training prompts' order in this epoch (each prompt once per epoch)."""
        if epoch not in self._orders:
            rng = np.random.default_rng([self.cfg.seed, epoch])
            self._orders = {epoch: rng.permutation(len(self.examples))}
        return self._orders[epoch]

    def draw(self, round_: int, micro: int) -> tuple[list[dict], list[int]]:
        """(this rank's prompts, one sampling seed per completion) of a round's micro-step."""
        first = (round_ * self.cfg.grad_accum + micro) * self.prompts + self.rank * self.micro_batch
        n = len(self.examples)
        examples = [self.examples[self._order(p // n)[p % n]] for p in range(first, first + self.micro_batch)]
        seeds = np.random.SeedSequence([self.cfg.seed, round_, micro, self.rank])
        return examples, seeds.generate_state(self.micro_batch * self.ac.group_size).tolist()

    def train_batch(self, device: torch.device) -> tuple[dict, dict]:
        """(tensors of minillm.torch.grpo.collate, the batch's sampling stats) for this micro-step."""
        step, micro = divmod(self.calls, self.cfg.grad_accum)
        self.calls += 1
        round_ = step // self.ac.grpo_iterations
        if step % self.ac.grpo_iterations == 0:  # a new round: sample with the policy as it is now
            if micro == 0:
                self.batches = {}
            self.batches[micro] = self.rollout(*self.draw(round_, micro))
        batch = self.batches[micro]
        return grpo.collate(batch["rows"], device), batch["stats"]

    # --- the data's part of the resume point ---------------------------------------------------
    def state_dict(self) -> dict:
        middle = (self.calls // self.cfg.grad_accum) % self.ac.grpo_iterations != 0  # a round goes on
        batches = {str(k): v for k, v in self.batches.items()} if middle else {}
        return {"calls": self.calls, "batches": batches}

    def load_state_dict(self, state: dict) -> None:
        self.calls, self.batches = state["calls"], {int(k): v for k, v in state["batches"].items()}


class GRPOTrainer(StepDiagnostics, FinetuneTrainer):
    """The Trainer on groups sampled from the policy; full weights or a LoRA adapter. `reward`: a
    Python callable (prediction, example) -> float instead of ac.reward's built-in. What a
    checkpoint holds (full weights, or the adapter alone) is fine-tuning's, hence the subclass."""

    def __init__(self, cfg: TrainConfig, ac: AlignConfig, resume: bool = False, quiet: bool | None = None,
                 reward=None):
        if ac.method != "grpo":
            raise ValueError(f"GRPOTrainer trains method 'grpo', not {ac.method!r}")
        self.ac, self.ft = ac, finetune_view(ac)
        saved = align.record(cfg.out_dir) if resume else None
        if resume and saved != ac:
            raise checkpoint.CheckpointError(f"{cfg.out_dir} was aligned with other settings: "
                                             f"saved {saved}, asked for {ac}")
        self.reward = rewards.reward_fn(reward if reward is not None else ac.reward)
        self.tokenizer = load_tokenizer(Path(ac.sft_run) / checkpoint.TOKENIZER_FILE)
        self.reference: torch.nn.Module | None = None  # set by make_model; None: the adapter off
        self.micro_metrics: list[dict[str, float]] = []
        self.step_metrics: dict[str, float] = {}
        self.val_metrics: dict[str, float] = {}
        Trainer.__init__(self, cfg, resume, quiet)  # FinetuneTrainer's __init__ checks a finetune record
        if self.reference is not None:
            self.reference.to(self.device)
        self.data.rollout = self.rollout
        self.metrics = AlignMetricsLog(self.metrics.path, self)  # train rows carry step_metrics
        if self.is_main:
            print(f"grpo (G = {ac.group_size}): {self.describe_params()}")

    def make_data(self) -> GroupData:
        return GroupData(self.cfg, self.ac, self.rank, self.world)

    def make_model(self) -> torch.nn.Module:
        sft_model, _ = load_for_inference(self.ac.sft_run)  # the SFT weights, any adapter merged in
        model = model_from_params(self.cfg.model, model_params(sft_model))  # cfg.model: e.g. its dropout
        if self.ac.lora_rank:
            lora.add_lora(model, self.ac.lora_rank, self.ac.lora_alpha, 0.0, self.ac.targets)
            lora.freeze_base(model)
        else:
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        return model.train()

    # --- sampling: what GroupData.train_batch asks for at the start of a round --------------------
    @torch.no_grad()
    def rollout(self, examples: list[dict], seeds: list[int]) -> dict:
        """Sample a group per prompt, score, normalise, and attach the log-probs the loss compares
        with: {"rows": [...] (minillm.torch.grpo), "stats": mean reward, spread, length}."""
        ac = self.ac
        rows, scores, _ = grpo.sample_groups(self.model, self.tokenizer, examples, ac.group_size,
                                             ac.max_new_tokens, ac.temperature, seeds, self.reward)  # (P, G)
        t = grpo.collate(rows, self.device)
        ref = grpo.completion_logprobs(self.logprobs(t["x"], t["y"], reference=True), rows)
        # with mu = 1 the loss uses the policy's own log-probs, detached, as pi_old (ratio 1)
        old = grpo.completion_logprobs(self.logprobs(t["x"], t["y"]), rows) if ac.grpo_iterations > 1 \
            else None
        for i, (row, a) in enumerate(zip(rows, grpo.group_advantages(scores).flatten().tolist())):
            row.update(advantage=a, ref=ref[i], old=old[i] if old else None)
        stats = {"reward": scores.mean().item(), "reward_std": scores.std(dim=-1, correction=0).mean().item(),
                 "completion_length": float(np.mean([len(r["ids"]) - r["prompt"] for r in rows]))}
        return {"rows": rows, "stats": stats}

    def logprobs(self, x: torch.Tensor, y: torch.Tensor, reference: bool = False) -> torch.Tensor:
        """token_logprobs (b, T) of the policy, or of the reference, without dropout."""
        model = self.reference if reference and self.reference is not None else self.model
        off = reference and self.reference is None  # LoRA: the reference is the adapter switched off
        model.eval()
        try:
            if off:
                lora.set_adapter(self.model, None)
            with self.autocast():
                return token_logprobs(model, x, y)
        finally:
            if off:
                lora.set_adapter(self.model, "default")
            self.model.train()

    # --- one optimizer step ---------------------------------------------------------------------
    def loss(self, x: dict, y: dict) -> torch.Tensor:
        """grpo_loss on a collated batch x; y holds the batch's sampling stats (logged)."""
        logp = token_logprobs(self.ddp, x["x"], x["y"])  # (N, T), through DDP when on
        old = x["old_logp"] if x["old_logp"] is not None else logp.detach()
        loss, metrics = grpo.grpo_loss(logp, old, x["ref_logp"], x["advantages"], x["y"] != IGNORE_INDEX,
                                       self.ac.clip_eps, self.ac.kl_coef)
        self.micro_metrics.append({**y, **{k: v.item() for k, v in metrics.items()}})
        return loss

    @torch.no_grad()
    def evaluate(self) -> float:
        """1 - mean reward of greedy answers to the first eval_batches x batch_size held-out prompts
        (with the exact reward: the error rate), so that lower is better as for a loss."""
        examples = self.data.val[:self.cfg.eval_batches * self.cfg.batch_size]
        with grpo.plain_weights(self.model):
            answers = answer_tasks(self.model, self.tokenizer, examples,
                                   max_new_tokens=self.ac.max_new_tokens, batch_size=self.cfg.batch_size)
        mean = float(np.mean([self.reward(a, e) for a, e in zip(answers, examples)]))
        self.val_metrics = {"val_reward": mean}
        return self._mean_over_ranks(1.0 - mean)

    def write_run_files(self, run_dir: Path) -> None:
        extra = {"align": vars(self.ac)}  # names the SFT run: what resume and inference load
        checkpoint.save_run_files(run_dir, self.cfg, self.data.dir, self.data.meta, extra)
