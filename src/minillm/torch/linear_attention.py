"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs"): softmax(q kᵀ) replaced
by a kernel phi(q) phi(k)ᵀ with the feature map phi(x) = elu(x) + 1 (positive, so the normaliser
never vanishes). For query i:

    y_i = phi(q_i)ᵀ S_i / (phi(q_i)ᵀ z_i),   S_i = sum_{j<=i} phi(k_j) v_jᵀ,   z_i = sum_{j<=i} phi(k_j)

Two forms of the same function:
- parallel (training, prefill): A = phi(Q) phi(K)ᵀ masked to j <= i, y = A V / A 1, plus what a
  state carried in from earlier tokens contributes. Matrix products, like softmax attention.
- recurrent (decoding): the state (S, z) is updated with one phi(k) vᵀ per token; its size
  (hd x hd per head) is constant however long the sequence: no KV cache grows.
No 1/sqrt(hd) scaling (the paper has none: the normaliser divides it out).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1 > 0."""
    return F.elu(x) + 1.0


class LinearAttentionState:
    """The recurrent form's memory of one layer, in place of a KV cache: S (B, H, hd, hd) and
    z (B, H, hd), float32. Passed to Attention.forward as its kv_cache."""

    def __init__(self, batch: int, n_heads: int, head_dim: int, device: torch.device | str | None = None):
        self.S = torch.zeros(batch, n_heads, head_dim, head_dim, device=device)
        self.z = torch.zeros(batch, n_heads, head_dim, device=device)
        self.length = 0  # tokens summed so far

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep batch rows `rows` (B',) in that order (beam search)."""
        self.S, self.z = self.S.index_select(0, rows), self.z.index_select(0, rows)


def parallel_form(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, S0: torch.Tensor | None = None,
                  z0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal linear attention over T tokens at once. q, k, v (B, H, T, hd); S0 (B, H, hd, hd) and
    z0 (B, H, hd) the state of earlier tokens (None: none). Returns y (B, H, T, hd) and the state
    after the last token (S, z)."""
    phi_q, phi_k = feature_map(q), feature_map(k)  # (B, H, T, hd)
    A = (phi_q @ phi_k.transpose(-2, -1)).tril()  # (B, H, T, T): phi(q_i)·phi(k_j) for j <= i
    numerator, denominator = A @ v, A.sum(-1)  # (B, H, T, hd), (B, H, T)
    if S0 is not None:  # earlier tokens: phi(q_i)ᵀ S0 and phi(q_i)ᵀ z0
        numerator = numerator + phi_q @ S0
        denominator = denominator + (phi_q @ z0[..., None])[..., 0]
    S = phi_k.transpose(-2, -1) @ v  # (B, H, hd, hd): sum_j phi(k_j) v_jᵀ
    z = phi_k.sum(-2)  # (B, H, hd)
    if S0 is not None:
        S, z = S + S0, z + z0
    return numerator / denominator[..., None], S, z


def recurrent_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, S: torch.Tensor,
                   z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token: q, k, v (B, H, hd); S += phi(k) vᵀ, z += phi(k); y = phi(q)ᵀ S / phi(q)ᵀ z.
    Returns y (B, H, hd) and the new (S, z)."""
    phi_q, phi_k = feature_map(q), feature_map(k)
    S = S + phi_k[..., :, None] * v[..., None, :]  # (B, H, hd, hd)
    z = z + phi_k  # (B, H, hd)
    y = (phi_q[..., None, :] @ S)[..., 0, :] / (phi_q * z).sum(-1, keepdim=True)
    return y, S, z


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     state: LinearAttentionState | None = None) -> torch.Tensor:
    """Attention.forward's linear path: q (B, H, T, hd); k, v (B, K, T, hd) (K < H: each K/V head
    serves H / K query heads) -> y (B, H, T, hd). With a state: one token -> the recurrent form,
    several -> the parallel form from the state; the state is advanced. Computed in float32."""
    dtype, H = q.dtype, q.size(1)
    q, k, v = q.float(), k.float(), v.float()
    if k.size(1) != H:
        k, v = k.repeat_interleave(H // k.size(1), dim=1), v.repeat_interleave(H // v.size(1), dim=1)
    if state is None:
        return parallel_form(q, k, v)[0].to(dtype)
    if q.size(2) == 1:
        y, state.S, state.z = recurrent_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], state.S, state.z)
        y = y[:, :, None]
    else:
        y, state.S, state.z = parallel_form(q, k, v, state.S, state.z)
    state.length += q.size(2)
    return y.to(dtype)
