"""The encoder-decoder Transformer (Vaswani et al. 2017) in PyTorch: a ModelConfig with encoder_layers > 0.

source (B, S) -> token embedding + positions -> encoder_layers blocks of bidirectional self-attention
(padding masked) and MLP -> encoder_norm -> memory (B, S, D).
target (B, T) -> token embedding + positions -> n_layers blocks of causal self-attention,
cross-attention over memory and MLP -> norm -> lm_head -> logits (B, T, vocab).

Both stacks share the token embedding and the positions (and, tied, the lm_head: the paper's §3.4);
sinusoids enter at the embeddings' scale (minillm.config.SINUSOID_SCALE: why, there).
norm_placement "post" is the paper's residual, norm(x + sublayer(x)); "pre" is x + sublayer(norm(x)).
Like torch.nn.Transformer, each stack ends with a norm (encoder_norm, norm) in either placement, so
the two take each other's weights. Attention, MLP and norms are minillm.torch.layers'; only
cross-attention is new: queries from the decoder, keys/values from memory, computed once per source
(`cross_kv`) and reused at every decoding step. Parameter names: minillm.checkpoint.canonical_shapes.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from minillm.checkpoint import check_params, load_run
from minillm.config import SINUSOID_SCALE, ModelConfig
from minillm.torch.layers import Attention, make_mlp, make_norm, sdpa, sinusoidal_table
from minillm.torch.model import Transformer, _drop_tied_head, _fill_tied_head

CrossKV = list[tuple[torch.Tensor, torch.Tensor]]  # per decoder block: memory's k, v (B, K, S, hd)


class CrossAttention(Attention):
    """Attention from the decoder's positions to the encoder output: layers.Attention's q/k/v/o
    projections (n_kv_heads included), keys and values from memory, no causal mask."""

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory (B, S, D) -> k, v (B, K, S, hd): once per source, then reused at every step."""
        B, S, _ = memory.shape
        k = self.k(memory).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(memory).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],  # type: ignore[override]
                mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D); mask (B, 1, 1, S) bool, True = a real source token; None = all."""
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        y = sdpa(q, kv[0], kv[1], mask, self.dropout if self.training else 0.0, False)  # (B, H, T, hd)
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


def residual(x: torch.Tensor, sublayer: Callable, norm: nn.Module, post: bool, dropout: nn.Module):
    """One residual sublayer: the paper's post-norm norm(x + f(x)), or pre-norm x + f(norm(x))."""
    return norm(x + dropout(sublayer(x))) if post else x + dropout(sublayer(norm(x)))


class EncoderBlock(nn.Module):
    """Bidirectional self-attention (padding masked), then the MLP, each a residual sublayer."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.post = config.norm_placement == "post"
        self.attn_norm, self.attn = make_norm(config), Attention(config)
        self.mlp_norm = make_norm(config)
        self.mlp = make_mlp(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, S, D); mask (B, 1, 1, S) bool (True = a real token: every position sees those)."""
        x = residual(x, lambda h: self.attn(h, mask=mask), self.attn_norm, self.post, self.dropout)
        return residual(x, self.mlp, self.mlp_norm, self.post, self.dropout)


class DecoderBlock(EncoderBlock):
    """Causal self-attention, cross-attention over the encoder output, then the MLP."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.cross_attn_norm, self.cross_attn = make_norm(config), CrossAttention(config)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],  # type: ignore[override]
                mask: torch.Tensor | None, kv_cache=None) -> torch.Tensor:
        """x (B, T, D); kv: this block's memory keys/values; mask (B, 1, 1, S) or None; kv_cache:
        the self-attention's cache (minillm.torch.kv_cache.KVCache) when decoding step by step."""
        x = residual(x, lambda h: self.attn(h, kv_cache=kv_cache), self.attn_norm, self.post, self.dropout)
        x = residual(x, lambda h: self.cross_attn(h, kv, mask), self.cross_attn_norm, self.post, self.dropout)
        return residual(x, self.mlp, self.mlp_norm, self.post, self.dropout)


class Seq2SeqTransformer(nn.Module):
    """encode(source) -> memory; decode(target, cross_kv(memory)) -> logits; forward does both."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        if not config.encoder_layers:
            raise ValueError("Seq2SeqTransformer needs ModelConfig.encoder_layers > 0 (0 is the "
                             "decoder-only minillm.torch.model.Transformer)")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        if config.positions == "learned":
            self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model)
        else:  # sinusoidal (config_arch.validate_seq2seq): a fixed table, a buffer, at SINUSOID_SCALE
            table = SINUSOID_SCALE * sinusoidal_table(config.max_seq_len, config.d_model)
            self.register_buffer("sin_table", table, False)
        self.drop = nn.Dropout(config.dropout)
        self.encoder = nn.ModuleList(EncoderBlock(config) for _ in range(config.encoder_layers))
        self.encoder_norm = make_norm(config)
        self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.n_layers))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
            self.register_state_dict_post_hook(_drop_tied_head)
            self.register_load_state_dict_pre_hook(_fill_tied_head)
        self.reset_parameters()

    # The decoder-only model's: GPT-2 init (cross_attn.o is a residual projection too), the
    # embedding of either side's tokens, the parameter count.
    reset_parameters = Transformer.reset_parameters
    embed = Transformer.embed
    num_parameters = Transformer.num_parameters

    def encode(self, source: torch.Tensor, source_mask: torch.Tensor | None = None) -> torch.Tensor:
        """source (B, S) ids, source_mask (B, S) bool (True = a real token, False = padding; None =
        no padding) -> memory (B, S, D). Rows at padded positions are computed but never attended."""
        if source_mask is None:
            source_mask = torch.ones_like(source, dtype=torch.bool)
        mask = source_mask[:, None, None, :]  # (B, 1, 1, S): every query sees the real tokens
        x = self.embed(source, None)
        for block in self.encoder:
            x = block(x, mask)
        return self.encoder_norm(x)

    def cross_kv(self, memory: torch.Tensor) -> CrossKV:
        """Each decoder block's keys and values of memory (B, S, D): computed once per source."""
        return [block.cross_attn.memory_kv(memory) for block in self.blocks]

    def decode(self, target: torch.Tensor, cross_kv: CrossKV, source_mask: torch.Tensor | None = None,
               positions: torch.Tensor | None = None, kv_caches: list | None = None) -> torch.Tensor:
        """target (B, T) ids -> logits (B, T, vocab). positions (T,): default 0..T-1 (a cache passes
        its offset); kv_caches: one KVCache per decoder block (minillm.torch.kv_cache.make_caches)."""
        mask = None if source_mask is None else source_mask[:, None, None, :]  # (B, 1, 1, S)
        y = self.embed(target, positions)
        for i, block in enumerate(self.blocks):
            y = block(y, cross_kv[i], mask, kv_caches[i] if kv_caches is not None else None)
        return self.lm_head(self.norm(y))

    def forward(self, source: torch.Tensor, target: torch.Tensor,
                source_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: source (B, S), target (B, T) (bos + answer) -> logits (B, T, vocab)."""
        return self.decode(target, self.cross_kv(self.encode(source, source_mask)), source_mask)


# --- run directory <-> model ----------------------------------------------------------------------
def seq2seq_from_params(config: ModelConfig, params: dict,
                        device: str | torch.device = "cpu") -> Seq2SeqTransformer:
    """Build a Seq2SeqTransformer and load canonical params (numpy arrays or tensors) into it."""
    check_params(config, params)
    model = Seq2SeqTransformer(config)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in params.items()})
    return model.to(device)


def load_seq2seq(run_dir, device: str | torch.device = "cpu"):
    """run directory -> (Seq2SeqTransformer in eval mode, tokenizer or None)."""
    config, tokenizer, params = load_run(run_dir)
    return seq2seq_from_params(config, params, device).eval(), tokenizer
