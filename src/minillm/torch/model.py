"""The decoder-only Transformer in PyTorch, built from a ModelConfig.

tokens (B, T) -> token embedding (+ learned or sinusoidal positions) -> n_layers pre-norm blocks
-> final norm -> lm_head -> logits (B, T, vocab). RoPE, when chosen, is applied inside attention.
`state_dict()` keys are the canonical names of DESIGN.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from minillm.checkpoint import check_params, load_run
from minillm.config import SINUSOID_SCALE, ModelConfig
from minillm.torch.layers import Block, make_norm, rope_tables, sinusoidal_table
from minillm.torch.masks import attention_mask
from minillm.torch.moe import idle_parameters, make_moe


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        if config.encoder_layers:  # the encoder-decoder has a class of its own
            raise ValueError(f"ModelConfig.encoder_layers={config.encoder_layers} is an encoder-decoder: "
                             f"minillm.torch.seq2seq.Seq2SeqTransformer, not the decoder-only Transformer")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        if config.positions == "learned":
            self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model)
        if config.positions == "sinusoidal":  # fixed tables are buffers, not parameters
            table = SINUSOID_SCALE * sinusoidal_table(config.max_seq_len, config.d_model)
            self.register_buffer("sin_table", table, persistent=False)
        if config.positions == "rope":
            cos, sin = rope_tables(config.max_seq_len, config.head_dim, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, make_moe(config)) for _ in range(config.n_layers))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:  # one tensor, two roles (Press & Wolf 2017)
            self.lm_head.weight = self.tok_emb.weight
            self.register_state_dict_post_hook(_drop_tied_head)
            self.register_load_state_dict_pre_hook(_fill_tied_head)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02) everywhere, residual output projections N(0, 0.02/sqrt(2L)) so the
        residual stream's variance does not grow with depth; biases 0, norm gains 1."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("attn.o.weight") or name.endswith("down.weight"):  # also MoE experts' down
                nn.init.normal_(p, 0.0, residual_std)
            elif name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, 0.0, 0.02)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                kv_caches: list | None = None, mask: torch.Tensor | None = None,
                keep_weights: bool = False) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab). positions: (T,) or (B, T) absolute positions,
        default 0..T-1 (a KV cache passes its offset). kv_caches: one cache per block
        (minillm.torch.kv_cache.make_model_caches: KV, ring-buffer or linear-attention state).
        mask: (T, S) or (B, 1, T, S) bool, True = may attend; None =
        causal. keep_weights: keep each block's attention weights in `block.attn.last_weights`
        (uses the plain-math attention path)."""
        return self.lm_head(self.hidden(tokens, positions, kv_caches, mask, keep_weights))

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
               kv_caches: list | None = None, mask: torch.Tensor | None = None,
               keep_weights: bool = False) -> torch.Tensor:
        """forward without lm_head: the final normed hidden states (B, T, D)."""
        x = self.embed(tokens, positions)
        rope = self.rope(positions, tokens.size(1))
        # a sliding window and ALiBi, when configured, become the mask (minillm.torch.masks)
        mask = attention_mask(self.config, tokens.size(1), positions, kv_caches, mask, x.device)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, kv_caches[i] if kv_caches is not None else None, mask, keep_weights)
        return self.norm(x)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """(B, T) ids -> (B, T, D) token embeddings plus additive positions."""
        T = tokens.size(1)
        if positions is None:
            if T > self.config.max_seq_len and self.config.positions != "alibi":  # ALiBi extrapolates
                raise ValueError(f"sequence length {T} exceeds the model's max_seq_len "
                                 f"{self.config.max_seq_len}")
            positions = torch.arange(T, device=tokens.device)
        x = self.tok_emb(tokens)  # (B, T, D)
        if self.config.positions == "learned":
            x = x + self.pos_emb(positions)
        elif self.config.positions == "sinusoidal":
            x = x + self.sin_table[positions]
        return self.drop(x)

    def rope(self, positions: torch.Tensor | None, T: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos, sin for these positions: (T, hd), or (B, 1, T, hd) for per-row positions."""
        if self.config.positions != "rope":
            return None
        if positions is None:
            return self.rope_cos[:T], self.rope_sin[:T]
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        if positions.dim() == 2:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return cos, sin

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Count each tensor once (a tied embedding is one tensor). exclude_embeddings drops the
        token and position tables (but keeps a tied table, which does the lm_head matmul)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            if not self.config.tie_embeddings:
                n -= self.tok_emb.weight.numel()
            if self.config.positions == "learned":
                n -= self.pos_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), the PaLM appendix B rule:
        6 N + 12 L D T, where N counts every parameter used in a matmul (embedding lookups are
        not), and 12 L D T is attention's QKᵀ and AV at context T (counted in full; a causal
        kernel could skip half). Forward alone is a third of it. A mixture of experts counts the
        k experts a token uses (its active parameters), not all n_experts."""
        c = self.config
        T = seq_len or c.max_seq_len
        n = self.num_parameters(exclude_embeddings=True) - idle_parameters(self)
        return 6 * n + 12 * c.n_layers * c.d_model * T


def _drop_tied_head(module, state_dict, prefix, local_metadata) -> None:
    """Canonical checkpoints hold a tied embedding once, under tok_emb.weight."""
    state_dict.pop(prefix + "lm_head.weight", None)


def _fill_tied_head(module, state_dict, prefix, *args) -> None:
    if prefix + "tok_emb.weight" in state_dict and prefix + "lm_head.weight" not in state_dict:
        state_dict[prefix + "lm_head.weight"] = state_dict[prefix + "tok_emb.weight"]


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of logits (B, T, V) against targets (B, T) (tokens shifted by one);
    targets equal to ignore_index (padding, prompt tokens in SFT) do not count."""
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=ignore_index)


# --- run directory <-> model ----------------------------------------------------------------------
def model_params(model: Transformer) -> dict:
    """Canonical name -> float32 numpy array (what minillm.checkpoint writes)."""
    return {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}


def model_from_params(config: ModelConfig, params: dict, device: str | torch.device = "cpu") -> Transformer:
    """Build a Transformer and load canonical params (numpy arrays or tensors) into it."""
    check_params(config, params)
    model = Transformer(config)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in params.items()})
    return model.to(device)


def load_model(run_dir, device: str | torch.device = "cpu"):
    """run directory -> (Transformer in eval mode, tokenizer or None)."""
    config, tokenizer, params = load_run(run_dir)
    return model_from_params(config, params, device).eval(), tokenizer
