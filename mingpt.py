"""A minGPT-style decoder-only transformer (Radford et al. 2019, as used for stage 2 of Esser et
al. 2021, Sec. 3.2) with causal scaled-dot-product attention and a preallocated key/value cache.

Parameter names and shapes are the reference's GPT (`tok_emb`, `pos_emb`, `blocks.i.ln1`,
`attn.key/query/value/proj`, `mlp.0`, `mlp.2`, `ln_f`, `head`), so official transformer weights
load by name. The reference stores its causal mask as a buffer `attn.mask`; here causality comes
from the attention call, and such a buffer in a loaded state dict is accepted and ignored.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import GPTConfig


class KVCache:
    """Keys and values of every layer for a whole sequence, allocated once:
    (n_layer, B, n_head, block_size, head_dim). Generating N tokens is N single-token steps."""

    def __init__(self, config: GPTConfig, batch_size: int, device, dtype):
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.attn_pdrop = config.n_head, config.attn_pdrop
        self.key = nn.Linear(config.n_embd, config.n_embd)
        self.query = nn.Linear(config.n_embd, config.n_embd)
        self.value = nn.Linear(config.n_embd, config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_drop = nn.Dropout(config.resid_pdrop)
        self.register_load_state_dict_pre_hook(_drop_reference_mask)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None, layer: int = 0, start: int = 0):
        b, t, c = x.shape
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (lin(x).view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
                   for lin in (self.query, self.key, self.value))
        dropout = self.attn_pdrop if self.training else 0.0
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:
            cache.k[layer, :, :, start:start + t] = k
            cache.v[layer, :, :, start:start + t] = v
            k, v = cache.k[layer, :, :, :start + t], cache.v[layer, :, :, :start + t]
            mask = None
            if t > 1:  # query i (absolute start + i) may see keys 0 .. start + i
                mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(diagonal=start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(b, t, c)
        return self.resid_drop(self.proj(y))


def _drop_reference_mask(module, state_dict, prefix, *args):
    state_dict.pop(prefix + "mask", None)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.mlp = nn.Sequential(nn.Linear(config.n_embd, 4 * config.n_embd), nn.GELU(),
                                 nn.Linear(4 * config.n_embd, config.n_embd), nn.Dropout(config.resid_pdrop))

    def forward(self, x, cache=None, layer=0, start=0):
        x = x + self.attn(self.ln1(x), cache, layer, start)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(1, config.block_size, config.n_embd))
        self.drop = nn.Dropout(config.embd_pdrop)
        self.blocks = nn.Sequential(*[Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def new_cache(self, batch_size: int, dtype: Optional[torch.dtype] = None) -> KVCache:
        """A cache in the dtype keys and values will have: autocast's when it is on."""
        p = self.head.weight
        if dtype is None:
            on = torch.is_autocast_enabled(p.device.type)
            dtype = torch.get_autocast_dtype(p.device.type) if on else p.dtype
        return KVCache(self.config, batch_size, p.device, dtype)

    def forward(self, idx: torch.Tensor, cache: Optional[KVCache] = None, start: int = 0) -> torch.Tensor:
        """idx (B, T) token ids at positions start .. start+T-1 -> logits (B, T, vocab_size).
        With a cache, keys and values of earlier positions come from it and these are added."""
        b, t = idx.shape
        if start + t > self.config.block_size:
            raise ValueError(f"sequence of {start + t} tokens exceeds block_size {self.config.block_size}")
        x = self.drop(self.tok_emb(idx) + self.pos_emb[:, start:start + t])  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i, start)
        return self.head(self.ln_f(x))

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """Weight decay on Linear weights only; biases, LayerNorms, embeddings and the position
        embedding are not decayed (minGPT's rule)."""
        decay = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear)}
        params = list(self.parameters())
        return [{"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
                {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0}]
