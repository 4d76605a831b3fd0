"""Generation FID: the Fréchet Inception distance (Heusel et al. 2017) between generated images and
a reference set, with the TensorFlow Inception network that published numbers use.

    python sample_transformer.py --checkpoint last.pt --num-samples 50000 --npz samples.npz --no-png
    python fid.py --samples samples.npz --reference DIR_OF_REAL_IMAGES
    python fid.py --samples samples.npz --reference DIR --inception-weights weights-inception-2015-12-05-6726825d.pth

Each set is an .npz (uint8 (N, H, W, 3) under arr_0, as sample_transformer.py writes it) or a
folder of images (searched recursively). Images whose size differs from --size (default: the
samples' size) are resized, shortest side first, and center-cropped to it, so a folder of real
photographs is compared at the resolution the model generates. Without --inception-weights the
network's weights are downloaded once into torch's cache (the library checks their hash).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image

from config import check_finite, require
from errors import UserError
from flags import option, parse_into
from imagefiles import list_images
from metrics import INCEPTION_FILE, InceptionFID
from utils import log, resolve_device, run_cli


@dataclass
class FIDConfig:
    samples: Optional[str] = option(None, "generated images: an .npz (arr_0: uint8 N x H x W x 3) or a folder of images", required=True)
    reference: Optional[str] = option(None, "real images: a folder of images, or an .npz of the same layout", required=True)
    inception_weights: Optional[str] = option(None, f"torch-fidelity's Inception weights ({INCEPTION_FILE}) (default: downloaded once into torch's cache)")
    size: Optional[int] = option(None, "side the images are compared at, after resizing and center-cropping (default: the samples' size)")
    batch_size: int = option(50, "images per Inception forward")
    device: str = option("auto", "torch device; auto = cuda when available, else cpu")

    def __post_init__(self):
        check_finite(self)
        require(self, dict(batch_size=1, size=8))


def fit(image: np.ndarray, size: int) -> np.ndarray:
    """An (H, W, 3) uint8 image at size x size: resized (shortest side, bicubic) and center-cropped."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    pil = Image.fromarray(image)
    scale = size / min(h, w)
    pil = pil.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
    left, top = (pil.width - size) // 2, (pil.height - size) // 2
    return np.asarray(pil.crop((left, top, left + size, top + size)))


class ImageSet:
    """An .npz of uint8 images or a folder of image files, read in batches."""

    def __init__(self, path: str, what: str):
        self.path, self.what = path, what
        if path.endswith(".npz"):
            try:
                with np.load(path) as data:
                    if "arr_0" not in data:
                        raise UserError(f"{what} {path} has no arr_0 entry: write it with sample_transformer.py --npz.")
                    self.array = data["arr_0"]
            except (OSError, ValueError) as e:
                raise UserError(f"cannot read {what} {path} ({e}): give an .npz file or a folder of images.") from None
            if self.array.dtype != np.uint8 or self.array.ndim != 4 or self.array.shape[-1] != 3:
                raise UserError(f"{what} {path} holds {self.array.dtype} {self.array.shape}; FID needs uint8 "
                                "(N, H, W, 3) images under arr_0.")
            self.files = None
        else:
            if not os.path.isdir(path):
                raise UserError(f"{what} {path} is neither an .npz file nor a folder of images.")
            self.array, self.files = None, [p for p, _, _ in list_images(path)]
        if len(self) < 2:
            raise UserError(f"{what} {path} holds {len(self)} image(s); FID needs at least 2 (thousands for a "
                            "meaningful number).")

    def __len__(self) -> int:
        return len(self.array) if self.array is not None else len(self.files)

    def first_size(self) -> int:
        image = self.array[0] if self.array is not None else self.load(0)
        return min(image.shape[:2])

    def load(self, i: int) -> np.ndarray:
        try:
            with Image.open(self.files[i]) as im:
                return np.asarray(im.convert("RGB"))
        except OSError as e:
            raise UserError(f"cannot read {self.files[i]} in {self.what} ({e}): remove or replace the file.") from None

    def batches(self, size: int, batch_size: int) -> Iterator[torch.Tensor]:
        """(B, 3, size, size) float batches in [0, 1]."""
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            images = [fit(self.array[i] if self.array is not None else self.load(i), size) for i in range(start, stop)]
            yield torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def main(args: FIDConfig) -> float:
    samples, reference = ImageSet(args.samples, "--samples"), ImageSet(args.reference, "--reference")
    size = args.size or samples.first_size()
    device = resolve_device(args.device)
    fid = InceptionFID(args.inception_weights, device)
    for images in samples.batches(size, args.batch_size):
        fid.update(images, real=False)
    for images in reference.batches(size, args.batch_size):
        fid.update(images, real=True)
    value = fid.compute()
    log(f"FID {value:.3f}: {len(samples)} samples ({args.samples}) against {len(reference)} reference images "
        f"({args.reference}), at {size}x{size}")
    return value


def cli(argv=None) -> int:
    """The command line: exit code 0, or 2 for a user error (one message, no traceback)."""
    return run_cli(main, lambda a: parse_into(FIDConfig, a, "FID between generated and real images."), argv)


if __name__ == "__main__":
    sys.exit(cli())
