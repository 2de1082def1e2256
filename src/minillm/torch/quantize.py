"""Weight-only quantization as a module swap (gpt-fast's pattern): the blocks' nn.Linear layers
become Int8Linear or Int4Linear, which keep integer weights and dequantize inside the product.

Two schemes, both round-to-nearest (RTN; minillm.torch.gptq chooses the int4 values better):
- int8, per output channel, symmetric: W[o, :] ≈ scale[o] · q[o, :], q in -127..127,
  scale[o] = max|W[o, :]| / 127. A quarter of fp32's bytes.
- int4, group-wise, asymmetric: each run of `group_size` (32/64/128) input columns of a row has its
  own scale and zero point, W ≈ (q - 8) · scale + zero with q in 0..15, scale = (max - min) / 15,
  zero = min + 8 · scale (torchao's convention, which the CPU int4 kernel reads as it is). Two values
  per byte: column 2j in the low nibble, 2j + 1 in the high one. An eighth of fp32's bytes (plus
  2 floats per group).
The state dict of a swapped layer, i.e. the file format (minillm.torch.quant_format), is
`{path}.qweight` (int8 [out, in], or uint8 [out, in / 2] for int4), `{path}.scales` (float32 [out],
or [out, in / group_size]), `{path}.zeros` (int4 only, float32 [out, in / group_size]) and
`{path}.bias` when the layer has one.

Products, the fastest of what was measured here (a 2-core AVX2 Xeon; benchmarks/compress.py):
- compiled, one token (a decode step): the dequantization written inside the row-wise dot product
  (as minillm.torch.matvec.row_dot_linear, in 8 blocks of rows: one loop, 8 accumulators);
- eager: int4 at one row, torch's CPU kernel `_weight_int4pack_mm_for_cpu` (torchao's and gpt-fast's);
  otherwise the integer matrix made float and one matmul (torch's `_weight_int8pack_mm` was slower);
- with gradients (QLoRA: LoRA on a frozen quantized base), the dequantized weight through F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minillm.torch.matvec import in_row_blocks

METHODS = ("int8", "int4", "gptq-int4")
GROUP_SIZES = (32, 64, 128)
TARGETS = ("q", "k", "v", "o", "up", "gate", "down")  # the blocks' linear layers (as minillm.torch.lora)


# --- the schemes, as functions of a weight matrix W (out, in) ---------------------------------------
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W (out, in) -> q int8 (out, in), scales float32 (out,): symmetric per output channel."""
    scales = (w.abs().amax(dim=1).float() / 127).clamp(min=1e-12)  # an all-zero row: q = 0
    q = torch.round(w.float() / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales[:, None]  # (out, in)


def int4_qparams(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W (out, in) -> scales, zeros (out, in / group_size) from each group's min and max."""
    groups = w.float().reshape(w.size(0), -1, group_size)  # (out, G, group_size)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scales = ((hi - lo) / 15).clamp(min=1e-6)
    return scales, lo + 8 * scales


def int4_round(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Round W (out, n) to its 4-bit codes given each element's scale and zero (broadcast to W)."""
    return torch.round((w.float() - zeros) / scales + 8).clamp(0, 15).to(torch.uint8)


def _per_column(t: torch.Tensor, group_size: int) -> torch.Tensor:
    return t.repeat_interleave(group_size, dim=1)  # (out, G) -> (out, in)


def quantize_int4(w: torch.Tensor, group_size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W (out, in) -> codes uint8 (out, in) in 0..15, scales, zeros (out, in / group_size)."""
    check_group_size(w.size(1), group_size)
    scales, zeros = int4_qparams(w, group_size)
    return int4_round(w, _per_column(scales, group_size), _per_column(zeros, group_size)), scales, zeros


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """codes (out, in) 0..15 and per-group scales/zeros (out, G) -> W (out, in) float32."""
    (n_out, n_in), G = codes.shape, scales.size(1)
    groups = codes.view(n_out, G, n_in // G).float()  # (out, G, group_size)
    return ((groups - 8) * scales[..., None] + zeros[..., None]).view(n_out, n_in)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(out, in) codes 0..15 -> (out, in / 2) uint8: column 2j in the low nibble, 2j + 1 in the high."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(out, in / 2) uint8 -> (out, in) codes 0..15."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(1)


def check_group_size(in_features: int, group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group size must be one of {GROUP_SIZES}, got {group_size}")
    if in_features % group_size:
        raise ValueError(f"group size {group_size} does not divide the layer's {in_features} inputs; "
                         f"choose one of {[g for g in GROUP_SIZES if in_features % g == 0] or GROUP_SIZES}")


# --- the modules ----------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """What Int8Linear and Int4Linear share: the bias, the forward over any leading shape, and
    `weight`, the dequantized matrix (out, in) for code that reads one (a float copy, made per call)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 in_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, qweight.size(0)
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out)."""
        return self.linear(x.reshape(-1, self.in_features), self.bias).view(*x.shape[:-1], self.out_features)

    def linear(self, x: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """x (N, in) -> (N, out), plus the bias b (the packed decoder passes a fused one)."""
        if torch.is_grad_enabled() and x.requires_grad:  # QLoRA: a product autograd can differentiate
            return F.linear(x, self.dequantize().to(x.dtype), b)
        if x.size(0) == 1 and torch.compiler.is_compiling():
            y = self.row_dot(x.float())  # (1, out)
        else:
            y = self.eager(x.float().contiguous())
        y = y.to(x.dtype)
        return y if b is None else y + b


class Int8Linear(QuantLinear):
    """y = x (scale · q)ᵀ + b, q int8 (out, in) per output channel."""

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "Int8Linear":
        q, scales = quantize_int8(linear.weight.detach())
        return cls(q, scales, linear.bias, linear.in_features)

    def dequantize(self) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scales)

    def eager(self, x: torch.Tensor) -> torch.Tensor:
        # (x qᵀ) · scale: torch's _weight_int8pack_mm(x, q, scales) is the same product, but 1.6x slower
        # than this at one row on this CPU (AVX2) and ~10x at 16+ rows
        return torch.mm(x, self.qweight.t().float()) * self.scales

    def row_dot(self, x: torch.Tensor) -> torch.Tensor:
        # y[o] = scale[o] · sum_i q[o, i] x[i]: reductions over the int8 rows, no float copy of W
        dots = in_row_blocks(lambda a, b: (x[:, None, :] * self.qweight[a:b]).sum(-1), self.out_features)
        return dots * self.scales  # (1, out)


class Int4Linear(QuantLinear):
    """y = x ((q - 8) · scale + zero)ᵀ + b, q 4-bit (two per byte), scale and zero per group of inputs.
    Keeps, besides its state dict, the layout torch's CPU int4 kernel reads (built once, here)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 bias: torch.Tensor | None, in_features: int):
        super().__init__(qweight, scales, bias, in_features)
        self.group_size = in_features // scales.size(1)
        self.register_buffer("zeros", zeros.float().contiguous())
        codes = unpack_int4(self.qweight).to(torch.int32)  # (out, in)
        self.register_buffer("kernel_weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1),
                             persistent=False)
        kernel_qparams = torch.stack([self.scales.t(), self.zeros.t()], dim=-1).contiguous()  # (G, out, 2)
        self.register_buffer("kernel_qparams", kernel_qparams, persistent=False)

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 64) -> "Int4Linear":
        codes, scales, zeros = quantize_int4(linear.weight.detach(), group_size)
        return cls(pack_int4(codes), scales, zeros, linear.bias, linear.in_features)

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4(unpack_int4(self.qweight), self.scales, self.zeros)

    def eager(self, x: torch.Tensor) -> torch.Tensor:
        if x.size(0) > 1:  # the kernel is made for a row or two: ~3x slower than this at 4+ rows here
            return F.linear(x, self.dequantize())
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.kernel_weight, self.group_size,
                                                          self.kernel_qparams)

    def row_dot(self, x: torch.Tensor) -> torch.Tensor:
        # sum_i x_i ((q_i - 8) s_g + z_g) = sum_g [s_g · sum_{i in g} x_i (q_i - 8) + z_g · sum_{i in g} x_i]
        G, g = self.scales.size(1), self.group_size
        xg = x.view(G, g)
        x_sums = xg.sum(-1)  # (G,): once, not per block

        def rows(a: int, b: int) -> torch.Tensor:  # output rows a..b-1 -> (1, b - a)
            codes = unpack_int4(self.qweight[a:b]).view(b - a, G, g)  # fused by Inductor
            dots = (xg * (codes.to(x.dtype) - 8)).sum(-1)  # (b - a, G)
            return ((dots * self.scales[a:b]).sum(-1) + (self.zeros[a:b] * x_sums).sum(-1))[None]

        return in_row_blocks(rows, self.out_features)  # (1, out)


def fuse(*layers: QuantLinear) -> QuantLinear:
    """Quantized layers of the same input and scheme as one, their outputs concatenated (the packed
    decoder's fused QKV): scales and zeros are per output row, so they concatenate too. No bias."""
    cat = {name: torch.cat([getattr(m, name) for m in layers]) for name in ("qweight", "scales")}
    if isinstance(layers[0], Int4Linear):
        zeros = torch.cat([m.zeros for m in layers])
        return Int4Linear(cat["qweight"], cat["scales"], zeros, None, layers[0].in_features)
    return Int8Linear(cat["qweight"], cat["scales"], None, layers[0].in_features)


# --- the swap -------------------------------------------------------------------------------------
def target_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Module path (blocks.{i}.{attn|mlp}.{name}) -> each block's nn.Linear, in model order."""
    return {path: m for path, m in model.named_modules() if isinstance(m, nn.Linear)
            and path.split(".")[-2:-1] in (["attn"], ["mlp"]) and path.rpartition(".")[2] in TARGETS}


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def quantize_rtn(model: nn.Module, bits: int = 8, group_size: int = 64, head: bool = False) -> nn.Module:
    """Swap the blocks' linear layers (and lm_head when `head`: int8, a copy when tied, the
    embedding table stays float) for their round-to-nearest quantized versions, in place."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    for path, linear in target_linears(model).items():
        quantized = Int8Linear.from_float(linear) if bits == 8 else Int4Linear.from_float(linear, group_size)
        set_module(model, path, quantized)
    if head:
        model.lm_head = Int8Linear.from_float(model.lm_head)
    return model


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model keeps on disk (its state dict)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
