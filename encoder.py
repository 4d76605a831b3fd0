"""The VQGAN encoder E (Esser et al. 2021, Sec. 3.1): a convolutional stack that maps an image
x of shape (B, in_channels, H, W) to z of shape (B, z_channels, H/f, W/f) with
f = 2^(len(ch_mult) - 1). Layout and parameter names follow the reference so that official
weights load by name (see ../shared/reference/ARCHITECTURE.md).
"""
from typing import Sequence

import torch
import torch.nn as nn

from helper import AttnBlock, Downsample, Normalize, ResnetBlock, swish


class Encoder(nn.Module):
    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[int], in_channels: int, resolution: int,
                 z_channels: int, dropout: float = 0.0, out_norm_groups: int = 32, double_z: bool = False):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, stride=1, padding=1)

        in_ch_mult = (1, *ch_mult)
        curr_res = resolution  # attention placement follows the configured size, not the input
        self.down = nn.ModuleList()
        for i_level in range(len(ch_mult)):
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    level.attn.append(AttnBlock(in_channels=block_in))
            if i_level != len(ch_mult) - 1:
                level.downsample = Downsample(in_channels=block_in)
                curr_res //= 2
            self.down.append(level)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)
        self.mid.attn_1 = AttnBlock(in_channels=block_in)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)

        self.norm_out = Normalize(block_in, out_norm_groups)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in_channels, H, W)
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))  # (B, z_channels, H/f, W/f)
