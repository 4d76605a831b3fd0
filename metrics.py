"""Reconstruction metrics: PSNR, SSIM (Wang et al. 2004, "Image Quality Assessment: From Error
Visibility to Structural Similarity", Eq. 13 with an 11x11 Gaussian window, sigma 1.5) and rFID
(Heusel et al. 2017, FID between the Inception features of images and their reconstructions).

PSNR and SSIM are computed here on images in [-1, 1]; their tests compare with scikit-image.
The FID feature extractor is torch-fidelity's port of the TensorFlow Inception network, used
through torchmetrics, so that our rFID is comparable with published numbers.
"""
from __future__ import annotations

import os
import tempfile
from typing import Optional

import torch
import torch.nn.functional as F

from checkpoint import load_checkpoint
from errors import UserError


@torch.no_grad()
def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak 1 after mapping to [0, 1]); shape (B,)."""
    mse = (((x.float() - y.float()) / 2) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


@torch.no_grad()
def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM of (B, C, H, W) images (default data range 2 for [-1, 1]); shape (B,).
    Local statistics come from a Gaussian window over the positions where it fits entirely
    (no padding); the SSIM map is averaged over those positions and the channels."""
    b, c, h, w = x.shape
    if min(h, w) < size:
        raise ValueError(f"SSIM needs images of at least {size}x{size} pixels; got {h}x{w}.")
    g = gaussian_window(size, sigma).to(x.device, torch.float32)
    x = x.float().reshape(b * c, 1, h, w)
    y = y.float().reshape(b * c, 1, h, w)

    def blur(t):  # separable Gaussian filter, valid positions only
        return F.conv2d(F.conv2d(t, g.view(1, 1, 1, size)), g.view(1, 1, size, 1))

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.reshape(b, -1).mean(1)


INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's release asset


class InceptionFID:
    """FID (Heusel et al. 2017) between two sets of images, with the TensorFlow Inception network
    that published numbers use (torch-fidelity's port, through torchmetrics). `weights`: its
    weights file (weights-inception-2015-12-05-6726825d.pth); None downloads it once into torch's cache (the library
    checks its hash). A file given is read with the project's safe loader (no code runs), then
    handed to the library as a plain copy, because the library itself would unpickle it without
    restriction."""

    def __init__(self, weights: Optional[str], device: torch.device):
        try:
            from torchmetrics.image.fid import FrechetInceptionDistance
        except ImportError:
            raise UserError("FID needs torchmetrics and torch-fidelity: pip install -r requirements.txt.") from None
        self.device = device
        if weights is None:
            try:
                self.fid = FrechetInceptionDistance(feature=2048, normalize=True).to(device)
            except ModuleNotFoundError:
                raise UserError("FID needs torchmetrics and torch-fidelity: pip install -r requirements.txt.") from None
            except Exception as e:  # offline: the download fails (the error type depends on the library)
                raise UserError(f"the Inception weights for FID could not be downloaded ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else 'no detail'}). Run once with internet "
                                f"access, or download torch-fidelity's weights-inception-2015-12-05-6726825d.pth and pass it with "
                                "--inception-weights.") from None
            return
        state = load_checkpoint(weights, map_location="cpu")
        if not all(isinstance(v, torch.Tensor) for v in state.values()) or "Mixed_7c.branch_pool.conv.weight" not in state:
            raise UserError(f"{weights} is not the Inception state dict that torch-fidelity uses: give its file "
                            f"weights-inception-2015-12-05-6726825d.pth (a release asset of the torch-fidelity project).")
        with tempfile.TemporaryDirectory() as tmp:
            plain = os.path.join(tmp, "inception.pth")
            torch.save({k: v.contiguous() for k, v in state.items()}, plain)
            try:
                self.fid = FrechetInceptionDistance(feature=2048, normalize=True,
                                                    feature_extractor_weights_path=plain).to(device)
            except RuntimeError as e:
                raise UserError(f"{weights} does not match torch-fidelity's Inception network ({e}): give "
                                f"weights-inception-2015-12-05-6726825d.pth.") from None

    @torch.no_grad()
    def update(self, images: torch.Tensor, real: bool) -> None:
        """Images (B, 3, H, W) in [0, 1]; `real`: the reference set, else the set measured."""
        self.fid.update(images.float().clamp(0, 1).to(self.device), real=real)

    def compute(self) -> float:
        return float(self.fid.compute())


class ReconstructionFID(InceptionFID):
    """rFID between images and their reconstructions, with InceptionFID's network (`weights`
    required: evaluation never downloads)."""

    def __init__(self, weights: str, device: torch.device):
        super().__init__(weights, device)

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_rec: torch.Tensor) -> None:
        """Images in [-1, 1], 3 channels."""
        super().update((x.float() + 1) / 2, real=True)
        super().update((x_rec.float() + 1) / 2, real=False)
