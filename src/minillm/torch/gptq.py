"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): int4 codes chosen to keep each layer's *output* on real inputs, not its weights.

A layer y = x Wᵀ is quantized to minimise ||X Wᵀ - X Qᵀ||² over calibration inputs X (N, in). The
loss's Hessian in each row of W is H = 2 XᵀX / N, the same for every row. Columns are quantized one
at a time; the rounding error of column i is spread over the not-yet-quantized columns j > i
through the inverse Hessian (Optimal Brain Surgeon), so the later columns compensate for it:
    err = (w_i - q_i) / [H⁻¹]_ii,   W[:, j] -= err · [H⁻¹]_ij   (j > i)
Three details from the paper make it fast and stable: the rows of H⁻¹ needed in that order are the
rows of the upper Cholesky factor of H⁻¹ (computed once); updates are applied lazily, a block of 128
columns at a time (one matrix product for the rest of W per block); and H gets λ = 1% of its mean
diagonal added ("dampening"). Group-wise scales and zeros are taken from the partly updated
weights when the group's first column comes up, so they fit what is actually rounded.
Memory stays bounded: H (in, in) is accumulated batch by batch, never X itself.
`quantize_model` runs the model block by block: block i is calibrated on the outputs of the already
quantized blocks before it (the errors of earlier blocks are part of what later ones see).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn

from minillm.data.loader import read_tokens
from minillm.torch import quantize
from minillm.torch.quantize import Int4Linear, int4_qparams, int4_round, pack_int4, set_module, target_linears


class Hessian:
    """H = 2/N · Σ x xᵀ over every input row x (in,) seen so far, updated as a running mean (float64)."""

    def __init__(self, in_features: int):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """x (..., in): a batch of inputs of the layer."""
        x = x.detach().reshape(-1, x.size(-1)).double()  # (m, in)
        m = x.size(0)
        self.H *= self.n / (self.n + m)
        self.n += m
        self.H += (2 / self.n) * (x.t() @ x)


def gptq(w: torch.Tensor, H: torch.Tensor, group_size: int = 64, damp: float = 0.01,
         block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W (out, in) and its Hessian H (in, in) -> codes uint8 (out, in) 0..15, scales, zeros (out, in/group)
    in minillm.torch.quantize's int4 scheme (dequantize_int4 reads them)."""
    quantize.check_group_size(w.size(1), group_size)
    W = w.detach().double().clone()  # (out, in), updated in place as columns are quantized
    H = H.double().clone()
    dead = H.diagonal() == 0  # inputs that were always zero: their weights do not matter
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * H.diagonal().mean() * torch.eye(len(H), dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    n_out, n_in = W.shape
    codes = torch.zeros(n_out, n_in, dtype=torch.uint8)
    scales = torch.zeros(n_out, n_in // group_size, dtype=torch.float64)
    zeros = torch.zeros_like(scales)
    block_size = max(group_size, block_size // group_size * group_size)  # a group never straddles blocks
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:  # the group's scale and zero, from the weights as updated so far
                g = col // group_size
                s, z = int4_qparams(W1[:, i:i + group_size], group_size)
                scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
            s, z = scales[:, col // group_size, None], zeros[:, col // group_size, None]  # (out, 1)
            q = int4_round(W1[:, i:i + 1], s, z)  # (out, 1)
            codes[:, col] = q[:, 0]
            err = (W1[:, i] - ((q.double() - 8) * s + z)[:, 0]) / Hinv1[i, i]  # (out,)
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # the lazy update of every later column, once per block
    return codes, scales.float(), zeros.float()


class _Stop(Exception):
    """Raised after the block being calibrated: the rest of the forward pass is not needed."""


def _stop(*_):
    raise _Stop


def block_hessians(model: nn.Module, index: int, batches: Iterable[torch.Tensor]) -> dict[str, Hessian]:
    """Path -> Hessian of every target linear layer of block `index`, over the calibration batches
    (token ids (B, T)), the blocks before it as they are now (already quantized)."""
    linears = {p: m for p, m in target_linears(model).items() if p.startswith(f"blocks.{index}.")}
    hessians = {p: Hessian(m.in_features) for p, m in linears.items()}
    handles = [m.register_forward_hook(lambda mod, inp, out, h=hessians[p]: h.add(inp[0]))
               for p, m in linears.items()]
    handles.append(model.blocks[index].register_forward_hook(_stop))
    try:
        with torch.no_grad():
            for tokens in batches:
                try:
                    model(tokens)
                except _Stop:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def quantize_model(model: nn.Module, batches: list[torch.Tensor], group_size: int = 64,
                   damp: float = 0.01, log=print) -> nn.Module:
    """Swap every block's linear layers for GPTQ int4 ones, block by block, in place. batches: the
    calibration token ids, a list of (B, T) tensors (a few hundred sequences of the training data)."""
    for i in range(len(model.blocks)):
        hessians = block_hessians(model, i, batches)
        for path, linear in target_linears(model).items():
            if path in hessians:
                codes, scales, zeros = gptq(linear.weight.detach(), hessians[path].H, group_size, damp)
                set_module(model, path, Int4Linear(pack_int4(codes), scales, zeros, linear.bias,
                                                   linear.in_features))
        log(f"GPTQ: block {i + 1}/{len(model.blocks)} quantized")
    return model


def calibration_batches(data_dir: str, n_sequences: int = 256, length: int = 256, batch_size: int = 16,
                        seed: int = 0) -> list[torch.Tensor]:
    """n_sequences random windows of `length` tokens of data_dir/train.bin (the training data, as
    the paper calibrates on), as (B, T) int64 batches. Seeded: the same calibration every time."""
    tokens = read_tokens(Path(data_dir) / "train.bin")
    if len(tokens) <= length:
        raise ValueError(f"{data_dir}/train.bin holds {len(tokens)} tokens, too few for {length}-token "
                         f"calibration windows")
    starts = np.random.default_rng(seed).integers(0, len(tokens) - length, n_sequences)
    windows = torch.from_numpy(np.stack([tokens[s:s + length] for s in starts]).astype(np.int64))
    return list(windows.split(batch_size))
