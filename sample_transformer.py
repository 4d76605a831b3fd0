"""Sample images from a stage-2 checkpoint (Esser et al. 2021, Sec. 3.2).

    python sample_transformer.py --checkpoint runs/transformer/checkpoints/last.pt --num-samples 16 --out samples/
    python sample_transformer.py ... --class-label dog --cfg-scale 3 --top-k 100
    python sample_transformer.py ... --grid 16 32      # larger than the training grid: sliding window

Writes one PNG per sample (sample_0000.png, ...) and grid.png into --out.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Optional

import torch
from torchvision.utils import save_image

from config import UserError
from transformer import VQGANTransformer, check_sampling_args
from utils import log, resolve_device, run_cli


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Sample images from a trained VQGAN transformer.")
    p.add_argument("--checkpoint", required=True, help="stage-2 checkpoint (training_transformer.py) or a taming-transformers transformer .ckpt")
    p.add_argument("--config", default=None, help="YAML config of a taming-transformers checkpoint (default: inferred)")
    p.add_argument("--num-samples", type=int, default=16, help="number of images (default: 16)")
    p.add_argument("--class-label", default=None, help="class name or index for conditional models (default: none)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default: 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely codes (default: all)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: off)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (default: 1.0, off)")
    p.add_argument("--grid", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="token grid to sample; larger than the training grid uses the sliding window (default: training grid)")
    p.add_argument("--batch-size", type=int, default=16, help="images sampled at once (default: 16)")
    p.add_argument("--no-cache", action="store_true", help="sample without the key/value cache (slower; for checks)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--device", default="auto", help="torch device (default: cuda when available)")
    p.add_argument("--out", default="samples", help="output folder (default: samples)")
    return p.parse_args(argv)


def resolve_label(model: VQGANTransformer, label: Optional[str]) -> Optional[int]:
    if label is None:
        return None
    if not model.conditional:
        raise UserError("--class-label was given but this transformer is unconditional.")
    if label in model.classes:
        return model.classes.index(label)
    if label.lstrip("-").isdigit():
        return int(label)
    raise UserError(f"--class-label {label} is not one of this model's classes: {', '.join(model.classes)}.")


def main(args: argparse.Namespace) -> list[str]:
    device = resolve_device(args.device)
    model = VQGANTransformer.from_checkpoint(args.checkpoint, config=args.config, map_location=device).to(device)
    label = resolve_label(model, args.class_label)
    # Check everything before writing anything.
    model.labels_tensor(label, 1, device)
    check_sampling_args(args.temperature, args.top_k, args.top_p)
    h, w = model.latent_shape
    if args.grid is not None and (args.grid[0] < h or args.grid[1] < w):
        raise UserError(f"--grid {args.grid[0]} {args.grid[1]} is smaller than the training grid {h} {w}.")
    if args.num_samples < 1 or args.batch_size < 1:
        raise UserError("--num-samples and --batch-size must be at least 1.")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {args.out} ({e.strerror}): choose a writable --out.") from None

    generator = torch.Generator(device=device).manual_seed(args.seed)
    images = []
    for start in range(0, args.num_samples, args.batch_size):
        n = min(args.batch_size, args.num_samples - start)
        indices = model.sample(n, label, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                               cfg_scale=args.cfg_scale, use_cache=not args.no_cache, generator=generator,
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
