"""Building blocks shared by the encoder and the decoder (Esser et al. 2021, Sec. 3.1 and the
reference taming-transformers `diffusionmodules/model.py`).

Parameter names (norm1, conv1, nin_shortcut, q, k, v, proj_out, conv) are the reference's, so
official weights load by name. No I/O here.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 (autocast outputs) -> float32; float32 and float64 stay as they are, so
    that losses and codebook distances run in float32 under autocast and in float64 when the
    whole model is (the tests compare identities in float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def swish(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x), the reference's nonlinearity, as PyTorch's fused SiLU: one kernel instead
    of two and no intermediate kept for the backward."""
    return F.silu(x)


@torch.no_grad()
def lecun_init_(module: nn.Module) -> None:
    """Every Conv2d and Linear inside `module`: weights normal with std 1/sqrt(fan_in), biases 0
    (LeCun et al. 1998, "Efficient BackProp"). PyTorch's default draws weights with a third of
    that variance, so a signal shrinks by about 1/sqrt(3) at each layer that no skip connection
    bypasses; the reference's models keep PyTorch's default."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def Normalize(in_channels: int, num_groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=num_groups, num_channels=in_channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm -> swish -> conv -> norm -> swish -> dropout -> conv, plus a skip (1x1 conv when the
    width changes). The reference's time-embedding branch is absent: VQGAN never uses it."""

    def __init__(self, *, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H, W)
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        skip = self.nin_shortcut(x) if self.in_channels != self.out_channels else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, residual.

    The reference builds the (hw x hw) attention matrix by hand; scaled_dot_product_attention
    computes the same softmax(q k^T / sqrt(c)) v but lets PyTorch pick a fused kernel."""

    def __init__(self, *, in_channels: int):
        super().__init__()
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, 1)
        self.k = nn.Conv2d(in_channels, in_channels, 1)
        self.v = nn.Conv2d(in_channels, in_channels, 1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C): one head whose size is the full width c
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3) for t in (self.q(hn), self.k(hn), self.v(hn)))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, H*W, C)
        out = out.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv after padding one pixel on the right and
    bottom only (the reference's asymmetric padding; symmetric padding would shift the grid)."""

    def __init__(self, *, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, *, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
