"""LPIPS perceptual distance (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features
as a Perceptual Metric", v0.1 "vgg"), the perceptual term of the VQGAN loss (Esser et al. 2021,
Sec. 3.1), and the loading of its weights.

Names match the reference's `loss.perceptual_loss.*` entries (scaling_layer, net.slice1..5 with
torchvision's VGG16 layer indices, lin0..lin4), so weights load by name with strict key checks.
Weights come from two places, never downloaded during import:
- the five linear layers: the `lpips` package's installed file weights/v0.1/vgg.pth (found through
  the distribution's metadata because this file shadows the package's import name);
- VGG16: torchvision's ImageNet weights (downloaded once into torch's hub cache) or a file given
  with --vgg-weights.
A taming-transformers VQGAN checkpoint given as --vgg-weights supplies both (its
`loss.perceptual_loss.*` entries).
"""
from __future__ import annotations

import importlib.metadata
import os
import socket
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from checkpoint import load_checkpoint
from errors import UserError

# torchvision's VGG16_Weights.IMAGENET1K_V1 (kept here so importing torchvision.models is not needed)
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
SLICE_ENDS = (4, 9, 16, 23, 30)  # torchvision feature indices after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
LIN_CHANNELS = (64, 128, 256, 512, 512)


class VGGWeightsUnavailable(UserError):
    pass


class ScalingLayer(nn.Module):
    """Maps inputs in [-1, 1] to the statistics VGG16 was trained on: (x - shift) / scale."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class VGG16Slices(nn.Module):
    """torchvision's VGG16 `features[:30]` cut into five slices; layer names keep the original
    indices (slice2.5 is features[5])."""

    def __init__(self):
        super().__init__()
        layers, in_ch = [], 3
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_ch, v, 3, padding=1), nn.ReLU(inplace=False)]
                in_ch = v
        start = 0
        for k, end in enumerate(SLICE_ENDS, start=1):
            setattr(self, f"slice{k}", nn.Sequential(OrderedDict((str(i), layers[i]) for i in range(start, end))))
            start = end

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for k in range(1, len(SLICE_ENDS) + 1):
            x = getattr(self, f"slice{k}")(x)
            feats.append(x)
        return feats


class NetLinLayer(nn.Module):
    """Dropout, then a 1x1 conv to one channel without bias: learned per-channel weights."""

    def __init__(self, chn_in: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(chn_in, 1, 1, stride=1, padding=0, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _unit_normalize(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """d(x, y) per image, shape (B, 1, 1, 1), for x, y in [-1, 1]. Frozen and always in eval mode
    (it is a fixed metric; its dropout must never be active)."""

    def __init__(self):
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Slices()
        for k, c in enumerate(LIN_CHANNELS):
            setattr(self, f"lin{k}", NetLinLayer(c))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:  # grayscale models: VGG wants three channels
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        fx = self.net(self.scaling_layer(x))
        fy = self.net(self.scaling_layer(y))
        total = 0.0
        for k, (a, b) in enumerate(zip(fx, fy)):
            diff = (_unit_normalize(a) - _unit_normalize(b)).pow(2)
            total = total + getattr(self, f"lin{k}")(diff).mean(dim=(2, 3), keepdim=True)
        return total  # (B, 1, 1, 1)


# ------------------------------------------------------------------------------ weight loading
def lin_weights_path() -> Path:
    """The LPIPS v0.1 vgg linear-layer weights shipped in the `lpips` package's wheel."""
    try:
        dist = importlib.metadata.distribution("lpips")
    except importlib.metadata.PackageNotFoundError:
        raise UserError("the `lpips` package is not installed; it ships the LPIPS linear-layer weights. "
                        "Install it with `pip install lpips` (it is in requirements.txt).") from None
    path = Path(dist.locate_file("lpips/weights/v0.1/vgg.pth"))
    if not path.is_file():
        raise UserError(f"the `lpips` package is installed but {path} is missing; reinstall it with "
                        "`pip install --force-reinstall lpips`.")
    return path


def vgg_cache_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(VGG16_URL)


def _vgg_unavailable(reason: str) -> VGGWeightsUnavailable:
    return VGGWeightsUnavailable(
        f"The VGG16 weights for the LPIPS perceptual loss could not be had ({reason}). Either run once "
        f"with internet access so torchvision caches them at {vgg_cache_path()}, or download "
        f"{VGG16_URL} yourself and pass it with --vgg-weights PATH, or do without LPIPS: "
        "--perceptual-loss-factor 0 when training, --no-lpips when evaluating.")


def _lpips_state_from(state: dict) -> dict:
    """Accept torchvision's vgg16 state dict (features.N.*), one in LPIPS layout (net.sliceK.N.*,
    lin*), or a taming-transformers checkpoint's state dict (loss.perceptual_loss.*); return the
    LPIPS-layout entries it has (VGG16 slices, and the linear layers when present)."""
    prefix = "loss.perceptual_loss."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    out = {}
    for key, value in state.items():
        if key.startswith(("net.slice", "lin")):
            out[key] = value
        elif key.startswith("features."):
            idx = int(key.split(".")[1])
            if idx < SLICE_ENDS[-1]:
                k = next(i for i, end in enumerate(SLICE_ENDS, start=1) if idx < end)
                out[f"net.slice{k}.{key[len('features.'):]}"] = value
    return out


def load_vgg_state(vgg_weights: Optional[str] = None, allow_download: bool = True) -> dict:
    """VGG16 features as {net.sliceK.N.*: tensor} (plus lin*.* when the file has them, as a
    reference VQGAN checkpoint does), from `vgg_weights` or torchvision's cache (downloading it
    once when allowed). Raises VGGWeightsUnavailable with the ways out."""
    if vgg_weights is not None:
        if not os.path.isfile(vgg_weights):
            raise _vgg_unavailable(f"--vgg-weights {vgg_weights} is not a file")
        ckpt = load_checkpoint(vgg_weights, map_location="cpu")
        state = _lpips_state_from(ckpt["state_dict"] if isinstance(ckpt.get("state_dict"), dict) else ckpt)
        if not any(k.startswith("net.") for k in state):
            raise _vgg_unavailable(f"{vgg_weights} holds no VGG16 weights (features.* or loss.perceptual_loss.net.*)")
        return state
    cached = vgg_cache_path()
    if cached.is_file():
        return _lpips_state_from(load_checkpoint(str(cached), map_location="cpu"))
    if not allow_download:
        raise _vgg_unavailable(f"not in the cache at {cached}")
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # an offline machine should fail in seconds, not hang
    try:
        state = torch.hub.load_state_dict_from_url(VGG16_URL, map_location="cpu", progress=True,
                                                   check_hash=True, weights_only=True)
    except Exception as e:  # no network, proxy, disk full, bad hash: all end the same way
        raise _vgg_unavailable(f"download failed: {type(e).__name__}: {e}") from None
    finally:
        socket.setdefaulttimeout(old_timeout)
    return _lpips_state_from(state)


def load_lpips(vgg_weights: Optional[str] = None, allow_download: bool = True) -> LPIPS:
    """An LPIPS module with real weights, every key checked (strict=True)."""
    model = LPIPS()
    state = load_vgg_state(vgg_weights, allow_download)
    if not any(k.startswith("lin") for k in state):  # a reference checkpoint brings its own
        state.update(load_checkpoint(str(lin_weights_path()), map_location="cpu"))
    state = {"scaling_layer.shift": model.scaling_layer.shift, "scaling_layer.scale": model.scaling_layer.scale,
             **state}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"LPIPS weights do not match the network: {e}") from None
    return model.eval()
