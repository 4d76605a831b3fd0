"""Sample images from a stage-2 checkpoint (Esser et al. 2021, Sec. 3.2).

    python sample_transformer.py --checkpoint runs/transformer/checkpoints/last.pt --num-samples 16 --out samples/
    python sample_transformer.py ... --class-label dog --cfg-scale 3 --top-k 100
    python sample_transformer.py ... --grid 16 32      # larger than the training grid: sliding window

    python sample_transformer.py ... --num-samples 50000 --npz samples.npz --no-png   # for generation FID
    torchrun --nproc_per_node 8 sample_transformer.py ... --per-class 50 --npz samples.npz  # ranks split the work

Writes one PNG per sample (sample_0000.png, ...) and grid.png into --out, and with --npz all
samples as one uint8 array (N, H, W, 3) under `arr_0`, the layout generation-FID tools read
(fid.py here; the ADM evaluator). Under torchrun each process samples its share with its own
random stream (seed + rank) and rank 0 gathers and writes everything, in sample order.
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torchvision.utils import save_image

from config import check_finite, require
from distributed import is_distributed, is_main_process, setup_distributed
from errors import EnvironmentFault, UserError
from flags import option, parse_into
from transformer import VQGANTransformer, check_sampling_args
from utils import log, resolve_device, run_cli, writable_file, writable_folder


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
    per_class: Optional[int] = option(None, "class-conditional models: this many samples of every class, in class order (instead of --num-samples and --class-label)")
    npz: Optional[str] = option(None, "also write all samples to this .npz file: uint8 (N, H, W, 3) under arr_0, for generation FID")
    png: bool = option(True, "write sample_NNNN.png files and grid.png into --out (--no-png: only the --npz file)")
    raw_weights: bool = option(False, "sample with the trained weights, not their EMA (when the checkpoint has one)")
    cache: bool = option(True, "sample with the key/value cache (--no-cache: full forwards, slower; for checks)")
    compile: bool = option(False, "compile the cached token step (torch.compile: fewer, fused kernels); pays for many samples, the first batch waits for the compilation")
    seed: int = option(0, "random seed")
    device: str = option("auto", "torch device; auto = cuda when available, else cpu")
    out: str = option("samples", "output folder")

    def __post_init__(self):
        check_finite(self)
        require(self, dict(num_samples=1, batch_size=1, per_class=1))
        if not self.png and self.npz is None:
            raise UserError("--no-png leaves nothing to write: give --npz FILE too.")
        if self.npz is not None and not self.npz.endswith(".npz"):
            raise UserError(f"--npz {self.npz}: name the file NAME.npz.")
        if self.per_class is not None and self.class_label is not None:
            raise UserError("--per-class samples every class: drop --class-label.")
        check_sampling_args(self.temperature, self.top_k, self.top_p, error=UserError)
        if self.grid is not None and min(self.grid) < 1:
            raise UserError(f"--grid {' '.join(map(str, self.grid))} must be two positive sizes.")
        if self.compile and (not self.cache or self.grid is not None):
            raise UserError("--compile compiles the cached token step, which --no-cache and --grid do not use: drop "
                            "--compile or the other flag.")


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


def sample_labels(model: VQGANTransformer, args: SampleConfig) -> list[Optional[int]]:
    """The class of each sample to draw (None: unconditional), in output order."""
    if args.per_class is not None:
        if not model.conditional:
            raise UserError("--per-class needs a class-conditional model; this one is unconditional: use "
                            "--num-samples.")
        return [c for c in range(len(model.classes)) for _ in range(args.per_class)]
    return [resolve_label(model, args.class_label)] * args.num_samples


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images (B, C, H, W) in [-1, 1] -> uint8 (B, H, W, C), rounded."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def gather_samples(mine: torch.Tensor, total: int, share: int, device: torch.device,
                   chunk: int = 256) -> Optional[torch.Tensor]:
    """On rank 0, every process's samples (contiguous shares of `share`, the last one shorter) in
    order; None on the others. Gathered `chunk` samples of each share at a time, so no device
    holds more than world x chunk images at once."""
    if not is_distributed():
        return mine
    padded = torch.zeros((share, *mine.shape[1:]), dtype=mine.dtype)
    padded[:len(mine)] = mine
    world, rank = dist.get_world_size(), dist.get_rank()
    pieces: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for start in range(0, share, chunk):
        part = padded[start:start + chunk].to(device)
        parts = [torch.empty_like(part) for _ in range(world)] if rank == 0 else None
        dist.gather(part, parts, dst=0)
        if rank == 0:
            for r, p in enumerate(parts):
                pieces[r].append(p.cpu())
    return torch.cat([torch.cat(p) for p in pieces])[:total] if rank == 0 else None


def write_npz(path: str, images: np.ndarray) -> None:
    """np.savez into a temporary file beside `path`, then renamed: never a partial file. A disk
    that fails is an EnvironmentFault (one message), not a traceback."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(suffix=".npz", dir=folder)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, arr_0=images)
        os.replace(tmp, path)
    except OSError as e:
        raise EnvironmentFault(f"cannot write --npz {path} ({e.strerror or e}): the samples were drawn but not "
                               "saved; free space or choose another path, and run again.") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def main(args: SampleConfig) -> list[str]:
    """Under torchrun every process samples its share (run_cli ends the process group)."""
    device, info = setup_distributed(resolve_device(args.device))
    return sample_all(args, device, info.rank, info.world_size)


def sample_all(args: SampleConfig, device: torch.device, rank: int, world: int) -> list[str]:
    model = VQGANTransformer.from_checkpoint(args.checkpoint, config=args.config, map_location=device,
                                             raw=args.raw_weights).to(device)
    labels = sample_labels(model, args)
    # Check everything the model decides before writing anything.
    if args.cfg_scale != 1.0 and labels[0] is None:
        raise UserError("--cfg-scale steers samples towards a class: give --class-label (or --per-class) too, or "
                        "drop --cfg-scale.")
    if args.cfg_scale != 1.0 and not model.layout.has_null_class:
        raise UserError("--cfg-scale needs a 'no class' token, which the reference's transformers do not have: "
                        "drop --cfg-scale.")
    h, w = model.latent_shape
    if args.grid is not None and (args.grid[0] < h or args.grid[1] < w):
        raise UserError(f"--grid {args.grid[0]} {args.grid[1]} is smaller than the training grid {h} {w}.")
    if args.png:
        writable_folder(args.out, "--out")
    if args.npz is not None:
        writable_file(args.npz, "--npz")

    share = math.ceil(len(labels) / world)  # this process's samples: a contiguous share
    mine = labels[rank * share:(rank + 1) * share]
    generator = torch.Generator(device=device).manual_seed(args.seed + rank)
    images = []
    for start in range(0, len(mine), args.batch_size):
        batch = mine[start:start + args.batch_size]
        cond = None if batch[0] is None else batch
        indices = model.sample(len(batch), cond, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                               cfg_scale=args.cfg_scale, use_cache=args.cache, generator=generator,
                               grid=args.grid, compile=args.compile)
        images.append(to_uint8(model.indices_to_images(indices)))
    c = model.vqgan.config.out_channels
    side = (args.grid[0] * model.vqgan.config.downsample_factor, args.grid[1] * model.vqgan.config.downsample_factor) \
        if args.grid is not None else (model.vqgan.config.resolution,) * 2
    images = torch.cat(images) if images else torch.zeros((0, *side, c), dtype=torch.uint8)
    images = gather_samples(images, len(labels), share, device)
    paths = []
    if images is None or not is_main_process():
        return paths
    if args.npz is not None:
        write_npz(args.npz, images.numpy())
        log(f"wrote {args.npz}: uint8 {tuple(images.shape)} under arr_0")
    if args.png:
        chw = images.permute(0, 3, 1, 2).float() / 255
        for i, image in enumerate(chw):
            paths.append(os.path.join(args.out, f"sample_{i:04d}.png"))
            save_image(image, paths[-1])
        save_image(chw, os.path.join(args.out, "grid.png"), nrow=math.ceil(len(chw) ** 0.5), padding=2)
        log(f"wrote {len(paths)} samples and grid.png to {args.out}")
    return paths


def cli(argv=None) -> int:
    """The command line: exit code 0, or 2 for a user error (one message, no traceback)."""
    return run_cli(main, parse_args, argv)


if __name__ == "__main__":
    sys.exit(cli())
