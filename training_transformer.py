"""Stage 2: train a GPT over the codes of a frozen VQGAN (Esser et al. 2021, Sec. 3.2).

    python training_transformer.py                     # demo: continues the stage-1 demo
    python training_transformer.py --dataset-path DIR --vqgan-checkpoint runs/x/checkpoints/last.pt
    python training_transformer.py ... --conditional   # one class per first-level subfolder

Without augmentation (the default: center crops) the dataset is encoded once with the VQGAN and
the GPT trains from the cached tokens. The training step is a plain next-token cross-entropy;
`step` counts optimizer steps and drives warmup, cosine decay, logging, samples and checkpoints.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import Dataset
from tqdm import tqdm

from config import TrainTransformerConfig, UserError, config_to_dict, parse_train_transformer
from transformer import VQGANTransformer, gpt_shape, vqgan_from_stage2
from data import EpochSampler, SkipLog, epoch_batches, image_datasets, make_loader
from utils import (MeanMeter, RunFolder, TrainingGuard, all_finite, autocast, barrier, describe_batch,
                   global_batch, is_main_process, load_checkpoint, log, lr_at, replicas_identical, resolve_precision,
                   run_rng_state, run_cli, save_sample_grid, scaled_lr, seed_everything, set_run_rng_state,
                   setup_distributed, warn)
from vqgan import VQGAN

DEMO_VQGAN_CHECKPOINT = os.path.join("runs", "vqgan", "checkpoints", "last.pt")


class TokenDataset(Dataset):
    """Cached code indices (N, h, w) and labels (N,), addressed by EpochSampler keys."""

    def __init__(self, tokens: torch.Tensor, labels: torch.Tensor):
        self.tokens, self.labels = tokens, labels

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        return self.tokens[index], self.labels[index]


@torch.no_grad()
def encode_dataset(model: VQGANTransformer, dataset, batch_size: int, num_workers: int, device) -> TokenDataset:
    """Encode every item once with the frozen VQGAN (deterministic crops: no augmentation)."""
    loader = make_loader(dataset, EpochSampler(len(dataset), 0, shuffle=False), batch_size, num_workers, False)
    tokens, labels = [], []
    for batch in tqdm(loader, desc="encoding the dataset once", disable=not is_main_process(), leave=False):
        x, y = split_batch(batch)
        tokens.append(model.encode_to_indices(x.to(device)).to(torch.int32).cpu())
        labels.append(torch.zeros(len(x), dtype=torch.long) if y is None else y)
    return TokenDataset(torch.cat(tokens), torch.cat(labels))


def split_batch(batch):
    """(inputs, labels or None): image datasets without classes yield bare tensors."""
    return tuple(batch) if isinstance(batch, (list, tuple)) else (batch, None)


@dataclass
class Stage2:
    cfg: TrainTransformerConfig
    model: VQGANTransformer
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    total_steps: int
    learning_rate: float = 0.0  # after --scale-lr; 0: cfg.learning_rate
    model_train: Optional[nn.Module] = None  # the DDP wrapper under torchrun, else model


def to_tokens(s: Stage2, x: torch.Tensor) -> torch.Tensor:
    """A batch of cached indices, or images to encode now (augmented runs)."""
    x = x.to(s.device, non_blocking=True)
    return x.long() if not x.is_floating_point() else s.model.encode_to_indices(x)


def train_step(s: Stage2, micro: list, step: int) -> dict:
    """One optimizer step over a list of loader batches (micro-batches; their gradients are
    accumulated and synchronized across processes on the last one only)."""
    cfg = s.cfg
    lr = lr_at(step, s.learning_rate or cfg.learning_rate, cfg.lr_warmup_steps, s.total_steps, "cosine")
    for group in s.opt.param_groups:
        group["lr"] = lr
    net = s.model_train or s.model
    s.opt.zero_grad(set_to_none=True)
    meter = MeanMeter()
    for i, part in enumerate(micro):
        x, labels = split_batch(part)
        indices = to_tokens(s, x)
        labels = labels.to(s.device) if s.model.conditional else None
        last = i == len(micro) - 1
        with net.no_sync() if isinstance(net, DDP) and not last else contextlib.nullcontext():
            with autocast(s.device, s.amp_dtype):
                _, loss = net(indices, labels, pkeep=cfg.pkeep, class_dropout=cfg.class_dropout)
            s.scaler.scale(loss / len(micro)).backward()
        meter.add({"loss": loss})
    logs = meter.means()
    ok = all_finite([logs["loss"]], s.model.gpt.parameters(), check_grads=not s.scaler.is_enabled())
    logs["skipped"] = torch.tensor(0.0 if ok else 1.0)
    if not ok:  # no update from a non-finite loss or gradient
        s.opt.zero_grad(set_to_none=True)
        warn(f"step {step} skipped (no update): non-finite loss or gradients; loss={logs['loss'].item():.4g}")
        return logs
    if cfg.grad_clip > 0:
        s.scaler.unscale_(s.opt)
        logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(s.model.gpt.parameters(), cfg.grad_clip)
    s.scaler.step(s.opt)
    s.scaler.update()
    return logs


@torch.no_grad()
def evaluate_loss(s: Stage2, loader, max_batches: int = 0) -> Optional[float]:
    """Mean next-token loss over the first max_batches validation batches (all when 0)."""
    s.model.eval()
    losses = []
    for i, batch in enumerate(loader):
        if 0 < max_batches <= i:
            break
        x, labels = split_batch(batch)
        with autocast(s.device, s.amp_dtype):
            _, loss = s.model(to_tokens(s, x), labels.to(s.device) if s.model.conditional else None)
        losses.append(loss.float())
    s.model.train()
    return torch.stack(losses).mean().item() if losses else None


@torch.no_grad()
def sample_grid(s: Stage2, images: torch.Tensor, labels: Optional[torch.Tensor], path,
                generator: torch.Generator) -> None:
    """Rows: inputs, their reconstructions, completions of their top halves (with their own
    classes), new samples (one class per column, cycling, when conditional)."""
    cfg, model = s.cfg, s.model
    model.eval()
    n = images.shape[0]
    indices = model.encode_to_indices(images)
    h, w = model.latent_shape
    opts = dict(temperature=cfg.temperature, top_k=cfg.top_k, generator=generator)
    half = model.sample(n, labels if model.conditional else None, prefix=indices[:, :h // 2], **opts)
    new = model.sample(n, torch.arange(n) % len(model.classes) if model.conditional else None, **opts)
    rows = [images, model.indices_to_images(indices), model.indices_to_images(half), model.indices_to_images(new)]
    model.train()
    save_sample_grid(rows, path)


def checkpoint_dict(s: Stage2, step: int) -> dict:
    m = s.model
    return {"kind": "transformer", "format_version": 1, "step": step,
            "model": m.gpt.state_dict(), "model_config": config_to_dict(m.gpt.config),
            "vqgan": m.vqgan.state_dict(), "vqgan_config": config_to_dict(m.vqgan.config),
            "classes": list(m.classes), "optimizer": s.opt.state_dict(), "scaler": s.scaler.state_dict(),
            "train_config": config_to_dict(s.cfg), "rng": run_rng_state()}


def main(cfg: TrainTransformerConfig) -> dict:
    device, dist_info = setup_distributed(cfg.device)
    resume_path = RunFolder.resume_path(cfg.output_dir, cfg.resume)
    resumed = load_checkpoint(resume_path, map_location="cpu") if resume_path else None
    if resumed is not None and resumed.get("kind") != "transformer":
        raise UserError(f"{resume_path} is not a stage-2 checkpoint: --resume takes one written by "
                        "training_transformer.py.")

    vq_path = cfg.vqgan_checkpoint or DEMO_VQGAN_CHECKPOINT
    if resumed is not None:  # the run's own first stage, whatever --vqgan-checkpoint says now
        vqgan, vq_path = vqgan_from_stage2(resumed).to(device), resume_path
    elif cfg.vqgan_checkpoint is None and not os.path.isfile(vq_path):
        raise UserError(f"no stage-1 checkpoint at {vq_path}: run `python training_vqgan.py` first, "
                        "or pass --vqgan-checkpoint PATH.")
    else:
        vqgan = VQGAN.from_checkpoint(vq_path, config=cfg.vqgan_config, map_location=device)
    if cfg.sos_token is not None:
        warn(f"--sos-token {cfg.sos_token} is ignored: the start token has its own id after the codes and "
             "classes, so it never collides with code ids.")
    seed_everything(cfg.seed + dist_info.rank)  # per-process random streams (data order has its own seed)

    mc = vqgan.config
    # filled from the subfolders; a resumed run must find the same classes
    classes = (list(resumed["classes"]) if resumed else []) if cfg.conditional else None
    skip_log = SkipLog(Path(cfg.output_dir) / "skipped_files.txt")
    train_ds, val_ds, description = image_datasets(cfg.dataset_path, mc.resolution, mc.in_channels, cfg.augment,
                                                   cfg.val_fraction, cfg.seed, augment=cfg.augment, classes=classes,
                                                   skip_log=skip_log, max_bad_fraction=cfg.max_bad_fraction)
    classes = classes or []
    if len(train_ds) < global_batch(cfg, dist_info):
        raise UserError(f"the global batch ({cfg.batch_size} x {dist_info.world_size} processes x {cfg.grad_accum} "
                        f"accumulated) is larger than the {len(train_ds)} training images: lower --batch-size or "
                        "--grad-accum, or add images.")
    gpt_cfg = dataclasses.replace(cfg.model, **gpt_shape(mc, len(classes)))
    cfg = dataclasses.replace(cfg, model=gpt_cfg, vqgan_checkpoint=vq_path)
    model = VQGANTransformer(vqgan, gpt_cfg, classes).to(device)
    if resumed is not None and resumed["model_config"] != config_to_dict(gpt_cfg):
        raise UserError(f"{resume_path} holds a GPT of another shape ({resumed['model_config']}): give the same "
                        "--preset and size flags as the original run.")

    # Fixed images for the sample grids: the first of the validation split when there is one.
    grid_ds = val_ds if len(val_ds) else train_ds
    fixed, fixed_labels = split_batch(next(iter(make_loader(grid_ds, EpochSampler(len(grid_ds), 0, shuffle=False),
                                                            cfg.num_samples, 0, False))))
    if not cfg.augment and cfg.cache_tokens:
        train_ds = encode_dataset(model, train_ds, cfg.batch_size, cfg.num_workers, device)
        val_ds = encode_dataset(model, val_ds, cfg.batch_size, cfg.num_workers, device) if len(val_ds) else val_ds
        description += f"; tokens cached ({len(train_ds)} x {mc.latent_size}x{mc.latent_size})"
    run = RunFolder(cfg.output_dir, config_to_dict(cfg), cfg.tensorboard, cfg.keep_checkpoints)

    amp_dtype = resolve_precision(cfg.precision, device)
    sampler = EpochSampler(len(train_ds), cfg.seed, rank=dist_info.rank, world_size=dist_info.world_size)
    steps_per_epoch = sampler.per_rank // (cfg.batch_size * cfg.grad_accum)
    total_steps = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    lr = scaled_lr(cfg, dist_info)
    opt = torch.optim.AdamW(model.gpt.optimizer_groups(cfg.weight_decay), lr=lr,
                            betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")
    if cfg.compile:
        model.gpt.compile()
    model_train = (DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if dist_info.enabled
                   else model)  # the frozen VQGAN has no trainable parameters for DDP to synchronize
    s = Stage2(cfg=cfg, model=model, opt=opt, device=device, amp_dtype=amp_dtype, total_steps=total_steps,
               scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
               learning_rate=lr, model_train=model_train)
    step = 0
    if resumed is not None:
        model.gpt.load_state_dict(resumed["model"])
        opt.load_state_dict(resumed["optimizer"])
        s.scaler.load_state_dict(resumed["scaler"])
        set_run_rng_state(resumed["rng"])
        step = int(resumed["step"])

    loader = make_loader(train_ds, sampler, cfg.batch_size, cfg.num_workers, drop_last=True,
                         pin_memory=device.type == "cuda")
    val_loader = make_loader(val_ds, EpochSampler(len(val_ds), cfg.seed, shuffle=False), cfg.batch_size, 0, False)
    fixed = fixed.to(device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)

    n_params = sum(p.numel() for p in model.gpt.parameters())
    log(f"data: {description}")
    log(f"model: GPT {n_params / 1e6:.2f}M parameters, {gpt_cfg.n_layer} layers, width {gpt_cfg.n_embd}, "
        f"{gpt_cfg.block_size} tokens, vocabulary {gpt_cfg.vocab_size} ({mc.n_embed} codes"
        + (f", {len(classes)} classes" if classes else "") + f", start); VQGAN from {vq_path}; device {device}")
    log(describe_batch(cfg, dist_info))
    log(f"training to step {total_steps} ({steps_per_epoch} steps per epoch)"
        + (f"; resumed at step {step}" if step else ""))

    model.train()
    main_process = is_main_process()
    bar = tqdm(total=total_steps, initial=step, dynamic_ncols=True, disable=not main_process)
    meter, guard = MeanMeter(), TrainingGuard(cfg, run, device, skip_log)
    with guard:  # the signal handlers are restored however the loop ends
        for epoch, group in epoch_batches(step, total_steps, cfg.batch_size, sampler, loader, cfg.grad_accum):
            logs = train_step(s, group, step)
            meter.add(logs)
            step += 1
            bar.update(1)
            guard.after_step(step, bool(logs["skipped"]), lambda: checkpoint_dict(s, step))
            if step % cfg.log_every == 0 or step == total_steps:
                metrics = meter.flush()
                metrics.update(epoch=epoch, lr=lr_at(step - 1, lr, cfg.lr_warmup_steps, total_steps, "cosine"),
                               tokens_per_s=global_batch(cfg, dist_info) * gpt_cfg.block_size / metrics["step_time"])
                bar.set_postfix(loss=f"{metrics['loss']:.3f}")
                run.log_metrics(step, metrics)
            if step % cfg.sample_every == 0 or step == total_steps:
                if main_process:  # the other processes wait at the barrier
                    val = evaluate_loss(s, val_loader, cfg.val_batches)
                    if val is not None:
                        run.log_metrics(step, {"val_loss": val})
                    with autocast(device, amp_dtype):
                        sample_grid(s, fixed, fixed_labels, run.sample_dir / f"step_{step:07d}.png", generator)
                barrier()
            if guard.save_or_stop(step, step % cfg.save_every == 0 or step == total_steps,
                                  lambda: checkpoint_dict(s, step)):
                break
    bar.close()
    if dist_info.enabled:
        same = replicas_identical(model.gpt)
        (log if same else warn)(f"weights {'identical' if same else 'DIFFER'} on all {dist_info.world_size} processes")
    log(f"checkpoint: {run.last}; samples (rows: inputs, reconstructions, half completions, samples): "
        f"{run.sample_dir}")
    run.close()
    return {"step": step, "stopped_by": guard.signal}


def cli(argv=None) -> int:
    """The command line: exit code 0, or 2 for a user error (one message, no traceback)."""
    return run_cli(main, parse_train_transformer, argv)


if __name__ == "__main__":
    sys.exit(cli())
