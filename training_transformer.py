"""Stage 2: train a GPT over the codes of a frozen VQGAN (Esser et al. 2021, Sec. 3.2).

    python training_transformer.py                     # demo: continues the stage-1 demo
    python training_transformer.py --dataset-path DIR --vqgan-checkpoint runs/x/checkpoints/last.pt
    python training_transformer.py ... --conditional   # one class per first-level subfolder

Without augmentation (the default: center crops) the dataset is encoded once with the VQGAN and
the GPT trains from the cached tokens. The training step is a plain next-token cross-entropy;
`step` counts optimizer steps and drives warmup, the learning-rate schedule, logging, samples and
checkpoints. The loop around train_step is utils.train_loop, shared with stage 1.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import Dataset
from tqdm import tqdm

from checkpoint import (load_checkpoint, load_optimizer, load_scaler, load_strict, require_entries, run_rng_state,
                        set_run_rng_state)
from config import GPTConfig, TrainTransformerConfig, config_to_dict, model_config_from_dict
from data import EpochSampler, fixed_images, make_loader, run_datasets, training_batches
from distributed import DistInfo, is_main_process
from ema import EMA, evaluated_with, restore_ema
from errors import UserError
from transformer import VQGANTransformer, gpt_shape
from runconfig import parse_train_transformer
from runfolder import RunFolder, start_run
from utils import (Hooks, MeanMeter, autocast, check_global_batch, describe_batch, global_batch, interactive, log,
                   lr_at, optimizer_step, resolve_precision, run_cli, run_length, scaled_lr, seed_everything,
                   train_loop, warn)
from vqgan import VQGAN, vqgan_from_stage2

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
    for batch in tqdm(loader, desc="encoding the dataset once", disable=not (is_main_process() and interactive()), leave=False):
        x, y = split_batch(batch)
        tokens.append(model.encode_to_indices(x.to(device)).to(torch.int32).cpu())
        labels.append(torch.zeros(len(x), dtype=torch.long) if y is None else y)
    return TokenDataset(torch.cat(tokens), torch.cat(labels))


def split_batch(batch):
    """(inputs, labels or None): image datasets without classes yield bare tensors."""
    return tuple(batch) if isinstance(batch, (list, tuple)) else (batch, None)


@dataclass
class Stage2:
    """Everything one training step touches."""
    cfg: TrainTransformerConfig
    model: VQGANTransformer
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    learning_rate: float  # after --scale-lr
    total_steps: int  # the last step of the run (the cosine schedule ends there)
    model_train: nn.Module  # the DDP wrapper under torchrun, else model
    ema: Optional[EMA] = None  # --ema-decay: the average of the GPT's weights

    def eval_weights(self):
        """Validation and sample grids: eagerly under --compile, with the EMA weights swapped in
        (unless --raw-weights): ema.evaluated_with."""
        return evaluated_with(self.ema, self.model.gpt, self.cfg.raw_weights)


def to_tokens(s: Stage2, x: torch.Tensor) -> torch.Tensor:
    """A batch of cached indices, or images to encode now (augmented runs)."""
    x = x.to(s.device, non_blocking=True)
    return x.long() if not x.is_floating_point() else s.model.encode_to_indices(x)


def train_step(s: Stage2, micro: list, step: int) -> dict:
    """One optimizer step over a list of loader batches (micro-batches; their gradients are
    accumulated and synchronized across processes on the last one only)."""
    cfg = s.cfg
    for group in s.opt.param_groups:
        group["lr"] = lr_at(step, s.learning_rate, cfg.lr_warmup_steps, s.total_steps, cfg.lr_schedule)
    s.opt.zero_grad(set_to_none=True)
    meter = MeanMeter()
    for i, part in enumerate(micro):
        x, labels = split_batch(part)
        indices = to_tokens(s, x)
        labels = labels.to(s.device, non_blocking=True) if s.model.conditional else None
        last = i == len(micro) - 1
        with s.model_train.no_sync() if isinstance(s.model_train, DDP) and not last else contextlib.nullcontext():
            with autocast(s.device, s.amp_dtype):
                _, loss = s.model_train(indices, labels, pkeep=cfg.pkeep, class_dropout=cfg.class_dropout)
            s.scaler.scale(loss / len(micro)).backward()
        meter.add({"loss": loss})
    logs = meter.means()
    # No update from a non-finite loss or gradient (the loop reports it); nothing here waits for the device.
    stepped, norm = optimizer_step(s.opt, s.scaler, [logs["loss"]], clip=cfg.grad_clip)
    if norm is not None:
        logs["grad_norm"] = norm
    if s.ema is not None:
        s.ema.update(s.model.gpt, stepped)
    logs["skipped"] = (~stepped).float()
    return logs


# torch.compile's options for --compile (tests trace with backend "aot_eager" and fullgraph=True, as in stage 1)
COMPILE_OPTIONS: dict = dict(backend="inductor")


def build_stage2(cfg: TrainTransformerConfig, model: VQGANTransformer, device: torch.device, total_steps: int,
                 dist_info: DistInfo = DistInfo()) -> Stage2:
    lr, amp_dtype = scaled_lr(cfg, dist_info), resolve_precision(cfg.precision, device)
    # fused: one kernel per step, and it takes the skip decision as a tensor (optimizer_step)
    opt = torch.optim.AdamW(model.gpt.optimizer_groups(cfg.weight_decay), lr=lr, betas=(cfg.beta1, cfg.beta2),
                            fused=True)
    if cfg.compile:  # the GPT and the loss in one compiled forward (the frozen VQGAN's encoding stays outside)
        model.compile(**COMPILE_OPTIONS, **({} if cfg.compile_mode == "default" else {"mode": cfg.compile_mode}))
    # the frozen VQGAN has no trainable parameters for DDP to synchronize
    model_train = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if dist_info.enabled else model
    return Stage2(cfg=cfg, model=model, opt=opt, scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
                  device=device, amp_dtype=amp_dtype, learning_rate=lr, total_steps=total_steps, model_train=model_train,
                  ema=EMA(model.gpt, cfg.ema_decay) if cfg.ema_decay > 0 else None)


@torch.no_grad()
def evaluate_loss(s: Stage2, loader, max_batches: int = 0) -> Optional[float]:
    """Mean next-token loss over the first max_batches validation batches (all when 0)."""
    s.model.eval()
    losses = []
    with s.eval_weights():
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
def sample_grid(s: Stage2, images: torch.Tensor, labels: Optional[torch.Tensor], generator: torch.Generator
                ) -> list[torch.Tensor]:
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
    return rows


def checkpoint_dict(s: Stage2, step: int) -> dict:
    """One dict of tensors and plain values (weights_only-loadable): all that resuming needs,
    and the VQGAN, so that the checkpoint samples images on its own."""
    m = s.model
    return {"kind": "transformer", "format_version": 1, "step": step,
            "model": m.gpt.state_dict(), "model_config": config_to_dict(m.gpt.config),
            "vqgan": m.vqgan.state_dict(), "vqgan_config": config_to_dict(m.vqgan.config),
            "classes": list(m.classes), "optimizer": s.opt.state_dict(), "scaler": s.scaler.state_dict(),
            "train_config": config_to_dict(s.cfg), "rng": run_rng_state(),
            **({"ema": s.ema.state_dict()} if s.ema is not None else {})}


def load_resume(path: str) -> dict:
    """The stage-2 checkpoint to resume from, loaded to the CPU and checked (its kind and every
    entry restore() and the VQGAN need) before anything is written."""
    ckpt = load_checkpoint(path, map_location="cpu")
    if ckpt.get("kind") != "transformer":
        raise UserError(f"{path} is not a stage-2 checkpoint: --resume takes one written by training_transformer.py.")
    require_entries(ckpt, ("step", "model", "model_config", "vqgan", "vqgan_config", "classes", "optimizer", "scaler",
                           "rng"), path, "stage-2 training checkpoint")
    return ckpt


def restore(s: Stage2, ckpt: dict, path: str) -> int:
    """Every state of the checkpoint into the built stage, each checked (shape of the GPT, names,
    shapes, finite weights, optimizer state that fits) before anything is written."""
    saved = config_to_dict(model_config_from_dict(GPTConfig, ckpt["model_config"]))
    if saved != config_to_dict(s.model.gpt.config):
        raise UserError(f"{path} holds a GPT of another shape ({saved}): give the same --preset and size flags as "
                        "the original run.")
    load_strict(s.model.gpt, ckpt["model"], path)
    load_optimizer(s.opt, ckpt["optimizer"], f"{path} (optimizer)")
    note = load_scaler(s.scaler, ckpt["scaler"])
    if note:
        log(f"resuming: {note}")
    restore_ema(s.ema, s.model.gpt, ckpt, path)
    set_run_rng_state(ckpt["rng"], path)
    if not isinstance(ckpt["step"], int) or ckpt["step"] < 0:
        raise UserError(f"{path} records step {ckpt['step']!r}: the checkpoint is damaged.")
    return ckpt["step"]


def load_init(path: str) -> VQGANTransformer:
    """--init-from: the stage-2 model to fine-tune (GPT and its VQGAN; the EMA weights when the
    file has them), from one of our stage-2 checkpoints or a model folder."""
    ckpt = load_checkpoint(path)  # a checkpoint file or a model folder
    if (ckpt.get("token_layout") or {}).get("reference"):
        raise UserError(f"--init-from {path} is a taming-transformers transformer: its token layout has no 'no class' "
                        "token and shares the start token with code 0, which training here does not use. Fine-tuning "
                        "starts from a GPT trained here.")
    if ckpt.get("kind") != "transformer":
        raise UserError(f"--init-from {path} is not one of this project's stage-2 checkpoints or model folders "
                        f"(kind '{ckpt.get('kind', 'reference' if 'state_dict' in ckpt else None)}'): fine-tuning "
                        "starts from a GPT trained here (a VQGAN goes to --vqgan-checkpoint).")
    return VQGANTransformer.from_checkpoint_dict(ckpt, f"--init-from {path}")


def load_vqgan(cfg: TrainTransformerConfig, resumed: Optional[dict], resume: Optional[str],
               init: Optional[VQGANTransformer] = None) -> tuple[VQGAN, str]:
    """The frozen first stage and where it came from: a resumed run's own, whatever
    --vqgan-checkpoint says now; the --init-from model's; else --vqgan-checkpoint, or the stage-1
    demo's."""
    if resumed is not None:
        return vqgan_from_stage2(resumed, resume), resume
    if init is not None:
        return init.vqgan, cfg.init_from
    path = cfg.vqgan_checkpoint or DEMO_VQGAN_CHECKPOINT
    if cfg.vqgan_checkpoint is None and not os.path.isfile(path):
        raise UserError(f"no stage-1 checkpoint at {path}: run `python training_vqgan.py` first, "
                        "or pass --vqgan-checkpoint PATH.")
    vqgan = VQGAN.from_checkpoint(path, config=cfg.vqgan_config)
    if not vqgan.quantize.codes_initialized():
        raise UserError(f"{path} was saved inside its run's codebook warm-up (--codebook-warmup), before the "
                        "codes were initialized, so its code indices mean nothing yet: use a later checkpoint "
                        "of that run.")
    return vqgan, path


def main(cfg: TrainTransformerConfig) -> dict:
    with contextlib.ExitStack() as scope:
        stop, device, dist_info, resume = start_run(cfg, scope)
        resumed = load_resume(resume) if resume else None
        init = load_init(cfg.init_from) if cfg.init_from is not None and resumed is None else None
        if init is not None:  # fine-tuning: the file's GPT shape and classes
            cfg = dataclasses.replace(cfg, model=init.gpt.config, conditional=init.conditional)
        vqgan, vq_path = load_vqgan(cfg, resumed, resume, init)
        vqgan = vqgan.to(device)
        if cfg.sos_token is not None:
            warn(f"--sos-token {cfg.sos_token} is ignored: the start token has its own id after the codes and "
                 "classes, so it never collides with code ids.")
        seed_everything(cfg.seed + dist_info.rank)  # per-process random streams (data order has its own seed)

        mc = vqgan.config
        # filled from the subfolders; a resumed run must find the same classes
        known = resumed["classes"] if resumed else init.classes if init is not None else []
        classes = list(known) if cfg.conditional else None
        train_ds, val_ds, description, skip_log, index = run_datasets(cfg, mc.resolution, mc.in_channels, cfg.augment,
                                                                      augment=cfg.augment, classes=classes)
        classes = classes or []
        check_global_batch(cfg, dist_info, len(train_ds))
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **gpt_shape(mc, len(classes))),
                                  vqgan_checkpoint=vq_path)
        model = VQGANTransformer(vqgan, cfg.model, classes).to(device)
        steps_per_epoch, total_steps = run_length(cfg, len(train_ds), dist_info)
        s = build_stage2(cfg, model, device, total_steps, dist_info)
        step = restore(s, resumed, resume) if resumed else 0
        if init is not None:
            load_strict(model.gpt, init.gpt.state_dict(), f"--init-from {cfg.init_from}")
            if s.ema is not None:
                s.ema.reset(model.gpt)
        fixed, fixed_labels = split_batch(fixed_images(train_ds, val_ds, cfg.num_samples))
        if not cfg.augment and cfg.cache_tokens:
            train_ds = encode_dataset(model, train_ds, cfg.batch_size, cfg.num_workers, device)
            val_ds = encode_dataset(model, val_ds, cfg.batch_size, cfg.num_workers, device) if len(val_ds) else val_ds
            description += f"; tokens cached ({len(train_ds)} x {mc.latent_size}x{mc.latent_size})"
        # Every check has passed: only now is the run folder written (and locked).
        run = scope.enter_context(RunFolder.of(cfg, resuming=resumed is not None))
        skip_log.start_writing()
        if is_main_process():
            index.start_writing()
        val_loader = make_loader(val_ds, EpochSampler(len(val_ds), cfg.seed, shuffle=False), cfg.batch_size, 0, False)
        fixed = fixed.to(device)
        generator = torch.Generator(device=device).manual_seed(cfg.seed)

        log(f"data: {description}")
        log(f"model: GPT {sum(p.numel() for p in model.gpt.parameters()) / 1e6:.2f}M parameters, {cfg.model.n_layer} "
            f"layers, width {cfg.model.n_embd}, {cfg.model.block_size} tokens, vocabulary {cfg.model.vocab_size} "
            f"({mc.n_embed} codes" + (f", {len(classes)} classes" if classes else "") + f", start); VQGAN from "
            f"{vq_path}; device {device}")
        log(describe_batch(cfg, dist_info))
        log(f"training to step {total_steps} ({steps_per_epoch} steps per epoch)"
            + (f"; resumed at step {step}" if step else "") + (f"; fine-tuning {cfg.init_from}" if init else "")
            + (f"; EMA of the weights, decay {cfg.ema_decay:g}" if s.ema is not None else ""))

        def evaluate(at: int) -> dict:
            """Validation loss (logged even when the grid fails), then the sample grid of the fixed images."""
            val = evaluate_loss(s, val_loader, cfg.val_batches)
            if val is not None:
                run.log_metrics(at, {"val_loss": val})
            with autocast(device, s.amp_dtype), s.eval_weights():
                run.save_samples(sample_grid(s, fixed, fixed_labels, generator), at)
            return {}

        model.train()
        per_step = global_batch(cfg, dist_info) * cfg.model.block_size
        hooks = Hooks(train_step=lambda micro, at: train_step(s, micro, at), checkpoint=lambda at: checkpoint_dict(s, at),
                      evaluate=evaluate, lr=lambda at: lr_at(at, s.learning_rate, cfg.lr_warmup_steps, total_steps,
                                                             cfg.lr_schedule),
                      rate=("tokens_per_s", per_step), shown=("loss",),
                      replicas=[(model.gpt, True)] + ([(s.ema, False)] if s.ema else []))
        batches = training_batches(train_ds, cfg, dist_info, device, step, total_steps)
        step, stopped_by, failed = train_loop(cfg, run, hooks, batches, step, total_steps, skip_log, stop)
        log(f"checkpoint: {run.last}; samples (rows: inputs, reconstructions, half completions, samples): "
            f"{run.sample_dir}")
        return {"step": step, "stopped_by": stopped_by, "failed_evaluations": failed}


def cli(argv=None) -> int:
    """The command line: exit code 0, or 2 for a user error (one message, no traceback)."""
    return run_cli(main, parse_train_transformer, argv)


if __name__ == "__main__":
    sys.exit(cli())
