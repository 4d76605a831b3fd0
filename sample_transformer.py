"""Sample images from a stage-2 checkpoint (Esser et al. 2021, Sec. 3.2).

    python sample_transformer.py --checkpoint runs/transformer/checkpoints/last.pt --num-samples 16 --out samples/
    python sample_transformer.py ... --class-label dog --cfg-scale 3 --top-k 100
    python sample_transformer.py ... --grid 16 32      # larger than the training grid: sliding window

Writes one PNG per sample (sample_0000.png, ...) and grid.png into --out.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch
from torchvision.utils import save_image

from config import check_finite, require
from errors import UserError
from flags import option, parse_into
from transformer import VQGANTransformer, check_sampling_args
from utils import log, resolve_device, run_cli, writable_folder


@dataclass
class SampleConfig:
    checkpoint: Optional[str] = option(None, "stage-2 checkpoint (training_transformer.py) or a taming-transformers transformer .ckpt", required=True)
    config: Optional[str] = option(None, "YAML config of a taming-transformers checkpoint (default: inferred)")
    num_samples: int = option(16, "number of images")
    class_label: Optional[str] = option(None, "class name or index for conditional models (default: none)")
    temperature: float = option(1.0, "softmax temperature")
    top_k: Optional[int] = option(None, "sample among the k most likely codes (default: all)")
    top_p: Optional[float] = option(None, "nucleus sampling mass (default: off)")
    cfg_scale: float = option(1.0, "classifier-free guidance scale (1: off)")
    grid: Optional[tuple[int, ...]] = option(None, "token grid to sample; larger than the training grid uses the sliding window (default: the training grid)", nargs=2, metavar=("H", "W"))
    batch_size: int = option(16, "images sampled at once")
    cache: bool = option(True, "sample with the key/value cache (--no-cache: full forwards, slower; for checks)")
    seed: int = option(0, "random seed")
    device: str = option("auto", "torch device; auto = cuda when available, else cpu")
    out: str = option("samples", "output folder")

    def __post_init__(self):
        check_finite(self)
        require(self, dict(num_samples=1, batch_size=1))
        check_sampling_args(self.temperature, self.top_k, self.top_p, error=UserError)
        if self.grid is not None and min(self.grid) < 1:
            raise UserError(f"--grid {' '.join(map(str, self.grid))} must be two positive sizes.")


def parse_args(argv: Optional[list[str]] = None) -> SampleConfig:
    return parse_into(SampleConfig, argv, "Sample images from a trained VQGAN transformer.")


def resolve_label(model: VQGANTransformer, label: Optional[str]) -> Optional[int]:
    """--class-label as a class index: a class name, or an index among the model's classes."""
    if label is None:
        return None
    if not model.conditional:
        raise UserError("--class-label was given but this transformer is unconditional.")
    names = f"{', '.join(model.classes[:10])}{', ...' if len(model.classes) > 10 else ''}"
    if label in model.classes:
        return model.classes.index(label)
    if not label.lstrip("-").isdigit():
        raise UserError(f"--class-label {label} is not one of this model's classes: {names}.")
    if not 0 <= int(label) < len(model.classes):
        raise UserError(f"--class-label {label} is not known to this model: it has {len(model.classes)} classes, "
                        f"0..{len(model.classes) - 1} ({names}).")
    return int(label)


def main(args: SampleConfig) -> list[str]:
    device = resolve_device(args.device)
    model = VQGANTransformer.from_checkpoint(args.checkpoint, config=args.config, map_location=device).to(device)
    label = resolve_label(model, args.class_label)
    # Check everything the model decides before writing anything.
    if args.cfg_scale != 1.0 and label is None:
        raise UserError("--cfg-scale steers samples towards a class: give --class-label too, or drop --cfg-scale.")
    if args.cfg_scale != 1.0 and not model.layout.has_null_class:
        raise UserError("--cfg-scale needs a 'no class' token, which the reference's transformers do not have: "
                        "drop --cfg-scale.")
    h, w = model.latent_shape
    if args.grid is not None and (args.grid[0] < h or args.grid[1] < w):
        raise UserError(f"--grid {args.grid[0]} {args.grid[1]} is smaller than the training grid {h} {w}.")
    writable_folder(args.out, "--out")

    generator = torch.Generator(device=device).manual_seed(args.seed)
    images = []
    for start in range(0, args.num_samples, args.batch_size):
        n = min(args.batch_size, args.num_samples - start)
        indices = model.sample(n, label, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                               cfg_scale=args.cfg_scale, use_cache=args.cache, generator=generator,
                               grid=args.grid)
        images.append(model.indices_to_images(indices).float().cpu())
    images = torch.cat(images)
    paths = []
    for i, image in enumerate(images):
        paths.append(os.path.join(args.out, f"sample_{i:04d}.png"))
        save_image((image + 1) / 2, paths[-1])
    save_image((images + 1) / 2, os.path.join(args.out, "grid.png"), nrow=math.ceil(len(images) ** 0.5), padding=2)
    log(f"wrote {len(paths)} samples and grid.png to {args.out}")
    return paths


def cli(argv=None) -> int:
    """The command line: exit code 0, or 2 for a user error (one message, no traceback)."""
    return run_cli(main, parse_args, argv)


if __name__ == "__main__":
    sys.exit(cli())
