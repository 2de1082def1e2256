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

from pathlib import Path

import numpy as np
import torch

from minillm import align
from minillm.align import AlignConfig
from minillm.config import TrainConfig
from minillm.data import rewards, tasks
from minillm.torch import grpo
from minillm.torch.align_train import AlignTrainer
from minillm.torch.evaluate import answer_tasks
from minillm.torch.logprobs import IGNORE_INDEX, token_logprobs
from minillm.torch.run_data import split_batch


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


class GRPOTrainer(AlignTrainer):
    """The Trainer on groups sampled from the policy; full weights or a LoRA adapter. `reward`: a
    Python callable (prediction, example) -> float instead of ac.reward's built-in. What a
    checkpoint holds (full weights, or the adapter alone) is fine-tuning's, hence the subclass."""

    METHODS = ("grpo",)

    def __init__(self, cfg: TrainConfig, ac: AlignConfig, resume: bool = False, quiet: bool | None = None,
                 reward=None):
        self.reward = rewards.reward_fn(reward if reward is not None else ac.reward)
        super().__init__(cfg, ac, resume, quiet)
        self.data.rollout = self.rollout
        if self.is_main:
            print(f"grpo (G = {ac.group_size}): {self.describe_params()}")

    def make_data(self) -> GroupData:
        return GroupData(self.cfg, self.ac, self.rank, self.world)

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
        with self.reference_model() if reference else self.eval_mode() as model, self.autocast():
            return token_logprobs(model, x, y)

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
