"""Evaluate a VQGAN tokenizer over a whole image set: PSNR, SSIM, LPIPS, codebook usage and
perplexity, and rFID (Heusel et al. 2017) when Inception weights are given.

    python evaluate_vqgan.py --checkpoint runs/vqgan/checkpoints/last.pt                 # demo's held-out crops
    python evaluate_vqgan.py --checkpoint last.pt --dataset-path DIR --inception-weights weights-inception-2015-12-05-6726825d.pth
    python evaluate_vqgan.py --checkpoint vqgan_imagenet_f16_16384/checkpoints/last.ckpt --config .../configs/model.yaml --dataset-path DIR

Every image of DIR (searched recursively) is resized on its shorter side and center-cropped to
the model's resolution (or --image-size). Without --dataset-path the set is fixed random crops of
the demo photographs' held-out strips (`--demo-split train`: of the parts trained on, to see which
codes the tokenizer uses on its own training distribution). Prints a table and writes OUT/metrics.json and
OUT/reconstructions.png (each original next to its reconstruction); OUT is by default
eval/<checkpoint name>/ in the run folder. A stage-2 checkpoint: the VQGAN inside it is evaluated.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torchvision.utils import save_image
from tqdm import tqdm

from codebook import code_counts
from config import check_finite, require
from data import EpochSampler, ImageDataset, build_transform, demo_images, demo_validation, make_loader
from errors import UserError
from flags import option, parse_into
from imagefiles import check_images, scan_images
from lpips import VGGWeightsUnavailable, load_lpips
from metrics import INCEPTION_FILE, ReconstructionFID, psnr, ssim
from utils import autocast, interactive, log, resolve_device, resolve_precision, run_cli, warn, writable_folder
from vqgan import VQGAN


@dataclass
class EvaluateConfig:
    checkpoint: Optional[str] = option(None, "stage-1 or stage-2 checkpoint of this project, or a taming-transformers .ckpt (a stage-2 one: its VQGAN is evaluated)", required=True)
    config: Optional[str] = option(None, "YAML config of a taming-transformers checkpoint (default: inferred)")
    dataset_path: Optional[str] = option(None, "folder of images, searched recursively (default: the demo's held-out crops)")
    demo_split: str = option("held-out", "without --dataset-path: crops of the demo photos' held-out strips, or of the parts trained on", choices=("held-out", "train"))
    image_size: Optional[int] = option(None, "side of the center crop (default: the model's resolution)")
    num_images: int = option(0, "evaluate the first N images only; for the demo set, its size (0: all; the demo 512)")
    batch_size: int = option(16, "images per batch")
    num_workers: int = option(2, "data-loading worker processes")
    vgg_weights: Optional[str] = option(None, "VGG16 weights for LPIPS (default: the checkpoint's own, if it is a taming one, else torchvision's cache or download)")
    lpips: bool = option(True, "compute LPIPS")
    inception_weights: Optional[str] = option(None, f"torch-fidelity's Inception weights ({INCEPTION_FILE}) for rFID (default: no rFID)")
    device: str = option("auto", "torch device; auto = cuda when available, else cpu")
    precision: str = option("fp32", "autocast precision", choices=("auto", "fp32", "bf16", "fp16"))
    grid_images: int = option(8, "image pairs in reconstructions.png")
    seed: int = option(0, "seed of the demo crops (0, as in training)")
    raw_weights: bool = option(False, "evaluate the trained weights, not their EMA (when the checkpoint has one)")
    out: Optional[str] = option(None, "output folder (default: eval/<checkpoint name>/ in the checkpoint's run folder, -train added for --demo-split train, -raw for --raw-weights)")

    def __post_init__(self):
        check_finite(self)
        require(self, dict(num_images=0, grid_images=0, batch_size=1, num_workers=0, image_size=11))


def parse_args(argv: Optional[list[str]] = None) -> EvaluateConfig:
    return parse_into(EvaluateConfig, argv, "Evaluate a VQGAN: reconstruction quality and codebook usage.")


def default_out(args: EvaluateConfig) -> Path:
    """A folder of its own per checkpoint (and per demo split): RUN/eval/<checkpoint name>/ for a
    checkpoint in a run folder's checkpoints/, else <name>_eval/ beside the file."""
    path = Path(args.checkpoint)
    name = (path.stem + ("-train" if args.dataset_path is None and args.demo_split == "train" else "")
            + ("-raw" if args.raw_weights else ""))
    return path.parent.parent / "eval" / name if path.parent.name == "checkpoints" else path.parent / f"{name}_eval"


def build_dataset(args: EvaluateConfig, size: int, channels: int) -> tuple[ImageDataset, str]:
    if args.dataset_path is None:
        n = args.num_images or 512
        train_parts, val_parts = demo_images(4 * size, min_val_width=size)
        if args.demo_split == "train":  # fixed random crops, the same for every checkpoint
            return (ImageDataset(train_parts, build_transform(size, True, resize=False), args.seed + 2, length=n,
                                 channels=channels), f"demo: {n} crops of the parts trained on")
        return demo_validation(val_parts, size, channels, args.seed, length=n), f"demo: {n} crops of the held-out strips"
    paths = check_images(scan_images(args.dataset_path))
    if args.num_images:
        paths = paths[:args.num_images]
    return (ImageDataset(paths, build_transform(size, False), args.seed, channels=channels),
            f"{args.dataset_path}: {len(paths)} images")


def setup_lpips(args: EvaluateConfig):
    """LPIPS from --vgg-weights, else the checkpoint's own perceptual loss (taming checkpoints
    carry one), else torchvision's VGG16; None, with a warning, when none is available."""
    if not args.lpips:
        return None
    if args.vgg_weights is not None:
        return load_lpips(args.vgg_weights)  # asked for explicitly: a problem is an error
    try:
        return load_lpips(args.checkpoint)
    except VGGWeightsUnavailable:
        pass
    try:
        return load_lpips(None)
    except VGGWeightsUnavailable as e:
        warn(f"LPIPS is not computed: {e}")
        return None


@torch.no_grad()
def evaluate(model: VQGAN, loader, device: torch.device, amp_dtype, perceptual=None, fid=None,
             grid_images: int = 8, show_progress: bool = True) -> tuple[dict, list]:
    """Metrics over every batch of `loader` (images in [-1, 1]) and the first `grid_images`
    (original, reconstruction) pairs."""
    n_embed = model.config.n_embed
    counts = torch.zeros(n_embed, device=device)
    values: dict[str, list] = {"psnr": [], "ssim": [], "lpips": []}
    pairs = []
    for x in tqdm(loader, desc="evaluating", disable=not (show_progress and interactive()), dynamic_ncols=True):
        x = x[0] if isinstance(x, (list, tuple)) else x
        x = x.to(device)
        with autocast(device, amp_dtype):
            z_q, indices, _ = model.encode(x)
            x_rec = model.decode(z_q)
        x_rec = x_rec.float().clamp(-1, 1)
        counts += code_counts(indices, n_embed)
        values["psnr"].append(psnr(x, x_rec).cpu())
        values["ssim"].append(ssim(x, x_rec).cpu())
        if perceptual is not None:
            values["lpips"].append(perceptual(x, x_rec).float().flatten().cpu())
        if fid is not None:
            fid.update(x, x_rec)
        if len(pairs) < grid_images:
            pairs.extend(zip(x.cpu(), x_rec.cpu()))
    if not values["psnr"]:
        raise UserError("the evaluation set is empty: give a --dataset-path with images.")
    p = counts / counts.sum()
    result = {
        "images": int(sum(len(v) for v in values["psnr"])),
        "psnr": torch.cat(values["psnr"]).mean().item(),
        "ssim": torch.cat(values["ssim"]).mean().item(),
        "lpips": torch.cat(values["lpips"]).mean().item() if values["lpips"] else None,
        "rfid": fid.compute() if fid is not None else None,
        "codebook_usage": (counts > 0).float().mean().item(),
        "codes_used": int((counts > 0).sum().item()),
        "n_embed": n_embed,
        "perplexity": torch.exp(-(p[p > 0] * p[p > 0].log()).sum()).item(),
    }
    return result, pairs[:grid_images]


def format_table(result: dict) -> str:
    rows = [("images", f"{result['images']}"),
            ("PSNR (dB)", f"{result['psnr']:.2f}"),
            ("SSIM", f"{result['ssim']:.4f}"),
            ("LPIPS", "n/a" if result["lpips"] is None else f"{result['lpips']:.4f}"),
            ("rFID", "n/a (--inception-weights)" if result["rfid"] is None else f"{result['rfid']:.2f}"),
            ("codebook usage", f"{100 * result['codebook_usage']:.1f}% ({result['codes_used']} of {result['n_embed']})"),
            ("perplexity", f"{result['perplexity']:.1f}")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(args: EvaluateConfig) -> dict:
    device = resolve_device(args.device)
    amp_dtype = resolve_precision(args.precision, device)
    if args.inception_weights is not None and not os.path.isfile(args.inception_weights):
        raise UserError(f"--inception-weights {args.inception_weights} is not a file: give the path of "
                        f"{INCEPTION_FILE} (torch-fidelity's Inception weights).")
    model = VQGAN.from_checkpoint(args.checkpoint, config=args.config, raw=args.raw_weights).to(device).eval()
    cfg = model.config
    size = args.image_size or cfg.resolution
    if size % cfg.downsample_factor:
        raise UserError(f"--image-size {size} is not a multiple of the model's downsampling factor "
                        f"{cfg.downsample_factor}.")
    if size < 11:
        raise UserError(f"--image-size {size} is too small for SSIM's 11x11 window: use at least 11.")
    dataset, description = build_dataset(args, size, cfg.in_channels)
    fid = None
    if args.inception_weights is not None:
        if cfg.out_channels != 3:
            raise UserError("rFID needs RGB images; this model has "
                            f"{cfg.out_channels} output channel(s): drop --inception-weights.")
        fid = ReconstructionFID(args.inception_weights, device)
    perceptual = setup_lpips(args)
    if perceptual is not None and cfg.out_channels != 3:
        warn("LPIPS needs RGB images; it is not computed for this model.")
        perceptual = None
    perceptual = perceptual.to(device) if perceptual is not None else None
    out = writable_folder(args.out or default_out(args), "--out")  # before the work, not after

    log(f"data: {description}; {size}x{size} crops")
    loader = make_loader(dataset, EpochSampler(len(dataset), args.seed, shuffle=False), args.batch_size,
                         args.num_workers, drop_last=False, pin_memory=device.type == "cuda")
    result, pairs = evaluate(model, loader, device, amp_dtype, perceptual, fid, args.grid_images)
    result = {"checkpoint": str(args.checkpoint), "dataset": description, "image_size": size, **result}
    print(format_table(result), flush=True)
    broken = [k for k, v in result.items() if isinstance(v, float) and not math.isfinite(v)]
    if broken:  # a failure, not a result
        raise UserError(f"{', '.join(broken)} came out as {', '.join(str(result[k]) for k in broken)} for "
                        f"{args.checkpoint}: the model's reconstructions are not finite; nothing was written.")
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    if pairs:
        images = torch.stack([img for pair in pairs for img in pair])
        save_image((images + 1) / 2, str(out / "reconstructions.png"), nrow=4, padding=2)
    log(f"wrote {out / 'metrics.json'} and {out / 'reconstructions.png'}")
    return result


def cli(argv=None) -> int:
    """The command line: exit code 0, or 2 for a user error (one message, no traceback)."""
    return run_cli(main, parse_args, argv)


if __name__ == "__main__":
    sys.exit(cli())
