"""Figures of one model's weights run by other code: the JAX twin of the model (jax-vs-torch.png)
and Hugging Face transformers after minillm.interop.hf.to_transformers (export-parity.png). Each
compares the logits of the trained model (ctx.run()) on one prompt with our PyTorch model's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from minillm.checkpoint import load_run
from minillm.interop.hf import to_transformers
from minillm.jax import model as jax_model
from minillm.torch.model import model_from_params
from minillm.viz.fig_model import PROMPT


def _prompt(config, tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text)[:config.max_seq_len]


@torch.inference_mode()
def jax_vs_torch(run: Path, text: str = PROMPT) -> tuple[np.ndarray, np.ndarray]:
    """The same checkpoint's logits (T, V) from minillm.torch.model and minillm.jax.model.forward."""
    config, tokenizer, params = load_run(run)
    ids = _prompt(config, tokenizer, text)
    ours = model_from_params(config, params).eval()(torch.tensor([ids]))[0].numpy()
    theirs = jax_model.forward(jax_model.params_from_canonical(params, config), config, np.array([ids]))
    return ours, np.asarray(theirs[0])


@torch.inference_mode()
def export_parity(run: Path, text: str = PROMPT) -> tuple[np.ndarray, np.ndarray]:
    """Logits (T, V) of our model and of the transformers model to_transformers made of it."""
    config, tokenizer, params = load_run(run)
    ids = torch.tensor([_prompt(config, tokenizer, text)])
    model = model_from_params(config, params).eval()
    return model(ids)[0].numpy(), to_transformers(model).eval()(ids).logits[0].float().numpy()


def draw_parity(ctx, name: str, ours: np.ndarray, theirs: np.ndarray, other: str, title: str) -> Path:
    """Left: every logit of `other` against ours (on the diagonal when they agree); right: the
    largest |difference| at each position of the prompt."""
    import matplotlib.pyplot as plt

    diff = np.abs(ours.astype(np.float64) - theirs)  # (T, V)
    fig, (scatter, per_position) = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    low, high = float(ours.min()), float(ours.max())
    scatter.plot([low, high], [low, high], color="gray", linewidth=1, label="y = x")
    scatter.scatter(ours.ravel(), theirs.ravel(), s=4, alpha=0.4, color="tab:blue", label="one logit")
    scatter.set(xlabel="logit, minillm.torch", ylabel=f"logit, {other}",
                title=f"{ours.size:,} logits ({ours.shape[0]} positions × {ours.shape[1]} tokens)")
    scatter.legend()
    if diff.max() > 0:  # float32 rounding: ~1e-7 .. 1e-5
        per_position.semilogy(diff.max(1), "o-")
        verdict = f"largest |difference|: {diff.max():.1e} (float32 rounding)"
    else:  # the same operations in the same order: not one bit differs
        per_position.plot(diff.max(1), "o-")
        verdict = "largest |difference|: 0 (equal to the last bit)"
    per_position.set(xlabel="position in the prompt", ylabel="max |difference| over the vocabulary",
                     title=verdict)
    for ax in (scatter, per_position):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return ctx.save(fig, name)


def draw_jax_vs_torch(ctx) -> Path:
    ours, theirs = jax_vs_torch(ctx.run())
    return draw_parity(ctx, "jax-vs-torch.png", ours, theirs, "minillm.jax",
                       "The same weights in PyTorch and in JAX give the same logits")


def draw_export_parity(ctx) -> Path:
    ours, theirs = export_parity(ctx.run())
    return draw_parity(ctx, "export-parity.png", ours, theirs, "transformers",
                       "After minillm.interop.hf.to_transformers: transformers' logits equal ours")


FIGURES = {
    "jax-vs-torch.png": draw_jax_vs_torch,
    "export-parity.png": draw_export_parity,
}
