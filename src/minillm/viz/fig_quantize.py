"""quantization-error.png: how far each linear layer of the trained model (ctx.run()) moves under
minillm.torch.quantize's int8 and int4 round-to-nearest and under minillm.torch.gptq's int4.

Two errors per layer W (out, in), Q its dequantized quantization:
    weight error  ||W - Q|| / ||W||                   (Frobenius norms)
    output error  ||X Wᵀ - X Qᵀ|| / ||X Wᵀ||          X (N, in): the layer's inputs on calibration text
The output error comes from GPTQ's Hessian H = 2 XᵀX / N: ||X Δᵀ||² = N/2 · tr(Δ H Δᵀ). GPTQ trades a
larger weight error for a smaller output error, the one that matters. Each layer is quantized
alone, with its inputs from the float model (the errors do not accumulate through the blocks).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from minillm.files import read_json
from minillm.torch import gptq, quantize
from minillm.torch.model import load_model

METHODS = ("int8", "int4", "gptq-int4")
GROUP_SIZE = 32  # the only one that divides every layer of the tests' tiny model (d_model 32)


def weight_error(w: torch.Tensor, q: torch.Tensor) -> float:
    return float((w.double() - q.double()).norm() / w.double().norm())


def output_error(w: torch.Tensor, q: torch.Tensor, H: torch.Tensor) -> float:
    """||X (W - Q)ᵀ|| / ||X Wᵀ|| from H = 2 XᵀX / N (the common factor N/2 cancels)."""
    w, delta = w.double(), w.double() - q.double()
    return float(torch.sqrt(torch.trace(delta @ H @ delta.t()) / torch.trace(w @ H @ w.t())))


def calibration_dir(run: Path, fallback: Path) -> Path:
    """The data directory the run was trained on (its config says), else `fallback`."""
    saved = read_json(Path(run) / "config.json").get("train", {}).get("data_dir")
    return Path(saved) if saved and (Path(saved) / "train.bin").is_file() else fallback


@torch.inference_mode()
def quantization_errors(run: Path, data_dir: Path, n_sequences: int = 64,
                        group_size: int = GROUP_SIZE) -> dict[str, dict[str, tuple[float, float]]]:
    """Layer path -> method -> (weight error, output error), for every target layer of the blocks.
    int4 methods are absent where group_size does not divide a layer's inputs (quantize cannot)."""
    model, _ = load_model(run)
    batches = gptq.calibration_batches(str(data_dir), n_sequences, min(256, model.config.max_seq_len))
    hessians = {}
    for i in range(len(model.blocks)):  # the float model's inputs of every layer
        hessians.update(gptq.block_hessians(model, i, batches))
    errors = {}
    for path, linear in quantize.target_linears(model).items():
        w, H = linear.weight.detach(), hessians[path].H
        q = {"int8": quantize.dequantize_int8(*quantize.quantize_int8(w))}
        if w.size(1) % group_size == 0:  # the scheme as a function (Int4Linear's kernel also needs out % 16)
            q["int4"] = quantize.dequantize_int4(*quantize.quantize_int4(w, group_size))
            q["gptq-int4"] = quantize.dequantize_int4(*gptq.gptq(w, H, group_size))
        errors[path] = {m: (weight_error(w, qm), output_error(w, qm, H)) for m, qm in q.items()}
    return errors


def draw_quantization_error(ctx) -> Path:
    import matplotlib.pyplot as plt

    run = ctx.run()
    errors = quantization_errors(run, calibration_dir(run, ctx.work / "data"), 16 if ctx.quick else 128)
    paths = list(errors)
    names = [p.removeprefix("blocks.").replace(".attn.", ".").replace(".mlp.", ".") for p in paths]  # 0.q
    x, width = np.arange(len(paths)), 0.27
    fig, axes = plt.subplots(2, 1, figsize=(14, 7.5), sharex=True, layout="constrained")
    for row, (ax, kind) in enumerate(zip(axes, ("weight error ‖W − Q‖ / ‖W‖",
                                                 "output error ‖XWᵀ − XQᵀ‖ / ‖XWᵀ‖"))):
        for j, method in enumerate(METHODS):
            values = [errors[p][method][row] if method in errors[p] else np.nan for p in paths]
            ax.bar(x + (j - 1) * width, values, width, label=method)
        missing = [i for i, p in enumerate(paths) if "int4" not in errors[p]]
        for i in missing:  # layers whose input width no int4 group size divides
            ax.text(i + width / 2, 0.04, "no int4", rotation=90, ha="center", va="bottom", fontsize=9,
                    color="gray", transform=ax.get_xaxis_transform())
        ax.set(yscale="log", ylabel=f"relative {kind.split()[0]} error")
        ax.set_title(kind, fontsize=11)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(ncol=3)
    axes[1].set_xticks(x, names, rotation=90, fontsize=9, fontfamily="monospace")
    axes[1].set_xlabel("layer (block.projection); X: its inputs on calibration text")
    fig.suptitle(f"Quantization error per layer: int8, int4 round-to-nearest and GPTQ int4 "
                 f"(group size {GROUP_SIZE})")
    return ctx.save(fig, "quantization-error.png")


FIGURES = {"quantization-error.png": draw_quantization_error}
