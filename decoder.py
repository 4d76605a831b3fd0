"""The VQGAN decoder G (Esser et al. 2021, Sec. 3.1): maps quantized latents of shape
(B, z_channels, h, w) back to images (B, out_channels, h*f, w*f). Parameter names follow the
reference; note its storage order: `up.0` is the highest-resolution level although it runs last.
"""
from typing import Sequence

import torch
import torch.nn as nn

from helper import AttnBlock, Normalize, ResnetBlock, Upsample, swish


class Decoder(nn.Module):
    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[int], out_channels: int, resolution: int,
                 z_channels: int, dropout: float = 0.0, out_norm_groups: int = 32):
        super().__init__()
        num_levels = len(ch_mult)
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (num_levels - 1)

        self.conv_in = nn.Conv2d(z_channels, block_in, 3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)
        self.mid.attn_1 = AttnBlock(in_channels=block_in)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)

        levels = [None] * num_levels
        for i_level in reversed(range(num_levels)):  # built lowest resolution first, as it runs
            block_out = ch * ch_mult[i_level]
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    level.attn.append(AttnBlock(in_channels=block_in))
            if i_level != 0:
                level.upsample = Upsample(in_channels=block_in)
                curr_res *= 2
            levels[i_level] = level
        self.up = nn.ModuleList(levels)  # stored highest resolution first (reference order)

        self.norm_out = Normalize(block_in, out_norm_groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, stride=1, padding=1)

    def compile_trunk(self, **options) -> None:
        """torch.compile (with these options) everything but conv_out. The adaptive GAN weight
        differentiates through conv_out alone; inside a compiled graph, that would re-run the
        whole compiled backward."""
        self._trunk = torch.compile(self.trunk, **options)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, z_channels, h, w)
        h = self._trunk(z) if getattr(self, "_trunk", None) is not None else self.trunk(z)
        return self.conv_out(h)  # (B, out_channels, h*f, w*f)

    def trunk(self, z: torch.Tensor) -> torch.Tensor:
        """Everything before conv_out: (B, z_channels, h, w) -> (B, ch*ch_mult[0], h*f, w*f)."""
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return swish(self.norm_out(h))
