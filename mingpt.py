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
    """Keys and values of every layer for a whole sequence, allocated once: per layer one tensor
    (B, n_head, block_size, head_dim) of each. Generating N tokens is N single-token steps.
    Separate tensors per layer, not one: a compiled step then updates each in place (a view of
    one shared tensor would be copied whole by torch.compile's functionalization)."""

    def __init__(self, config: GPTConfig, batch_size: int, device, dtype):
        shape = (batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype


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

    def fused_qkv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The query, key and value projections as one (3C, C) weight and (3C,) bias: one matmul
        instead of three (the state dict keeps the reference's three Linear layers)."""
        return (torch.cat([self.query.weight, self.key.weight, self.value.weight]),
                torch.cat([self.query.bias, self.key.bias, self.value.bias]))

    def project(self, x: torch.Tensor, qkv: Optional[tuple] = None):
        """x (B, T, C) -> q, k, v, each (B, n_head, T, head_dim), from one fused matmul."""
        b, t, c = x.shape
        weight, bias = qkv if qkv is not None else self.fused_qkv()
        q, k, v = F.linear(x, weight, bias).view(b, t, 3, self.n_head, c // self.n_head).permute(2, 0, 3, 1, 4)
        return q, k, v

    def decode(self, x: torch.Tensor, cache: KVCache, layer: int, pos: torch.Tensor, mask: torch.Tensor,
               qkv: tuple, proj: tuple):
        """One token per sequence at position `pos` (a 0-dim tensor): its key and value go into
        the cache at that position, and it attends over the whole cache with `mask` hiding the
        positions after it. Every shape is fixed, whatever the position. qkv, proj: (weight,
        bias) of the fused q/k/v and of the output projection, as GPT.decode_weights made them."""
        b, _, c = x.shape
        q, k, v = self.project(x, qkv)
        index = pos.view(1)
        cache.k[layer].index_copy_(2, index, k)
        cache.v[layer].index_copy_(2, index, v)
        y = F.scaled_dot_product_attention(q, cache.k[layer], cache.v[layer], attn_mask=mask)
        return F.linear(y.transpose(1, 2).reshape(b, 1, c), *proj)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None, layer: int = 0, start: int = 0):
        b, t, c = x.shape
        q, k, v = self.project(x)  # (B, n_head, T, head_dim) each
        dropout = self.attn_pdrop if self.training else 0.0
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:
            cache.k[layer][:, :, start:start + t] = k
            cache.v[layer][:, :, start:start + t] = v
            k, v = cache.k[layer][:, :, :start + t], cache.v[layer][:, :, :start + t]
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

    def decode(self, x, cache, layer, pos, mask, weights):
        """forward() of one token with a cache (attn.decode) and the matmul weights of
        GPT.decode_weights: the MLP is mlp[0], GELU, mlp[2] (its dropout is off in eval mode)."""
        qkv_w, qkv_b, proj_w, proj_b, fc_w, fc_b, out_w, out_b = weights
        x = x + self.attn.decode(self.ln1(x), cache, layer, pos, mask, (qkv_w, qkv_b), (proj_w, proj_b))
        return x + F.linear(F.gelu(F.linear(self.ln2(x), fc_w, fc_b)), out_w, out_b)


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

    @torch.no_grad()
    def decode_weights(self, dtype: torch.dtype) -> list:
        """Every matmul weight of the token step, in `dtype` (autocast's when it is on), made once
        for a whole sampling loop: per layer the fused q/k/v, the attention's output projection
        and the MLP's two layers (weight, bias each), then the head's weight. Autocast would cast
        the float32 weights anew at every step (reading all of them, writing a bf16 copy); casting
        them once gives the same numbers. In the model's own dtype nothing is copied."""
        def cast(*tensors):
            return tuple(t.to(dtype) for t in tensors)
        layers = []
        for block in self.blocks:
            attn, fc, out = block.attn, block.mlp[0], block.mlp[2]
            layers.append(cast(*attn.fused_qkv(), attn.proj.weight, attn.proj.bias, fc.weight, fc.bias, out.weight,
                               out.bias))
        return layers + [self.head.weight.to(dtype)]

    def decode_step(self, idx: torch.Tensor, pos: torch.Tensor, cache: KVCache, weights: list) -> torch.Tensor:
        """idx (B, 1): one token per sequence at position `pos`, a 0-dim long tensor on the
        model's device -> logits (B, vocab_size) for the next position. Keys and values of the
        positions before come from the cache; this token's are added to it. Fixed shapes and no
        host synchronisation, so one captured graph serves every position (transformer.TokenLoop).
        weights: decode_weights(). `pos` must be below block_size (not checked: that would synchronize)."""
        mask = torch.arange(self.config.block_size, device=idx.device).le(pos).view(1, 1, 1, -1)
        x = self.tok_emb(idx) + self.pos_emb[0].index_select(0, pos.view(1))  # (B, 1, C)
        for i, block in enumerate(self.blocks):
            x = block.decode(x, cache, i, pos, mask, weights[i])
        return F.linear(self.ln_f(x), weights[-1])[:, -1]

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """Weight decay on Linear weights only; biases, LayerNorms, embeddings and the position
        embedding are not decayed (minGPT's rule)."""
        decay = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear)}
        params = list(self.parameters())
        return [{"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
                {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0}]
