"""Stage 1: train a VQGAN (Esser et al. 2021, Sec. 3.1, Eq. 5-7).

    python training_vqgan.py                          # demo: tiny model on bundled photos, CPU ok
    python training_vqgan.py --dataset-path DIR       # your images; --help lists every flag

Loss of the generator (encoder, codebook, decoder):
    rec_loss_factor * L1 + perceptual_loss_factor * LPIPS + codebook_weight * q_loss
    + d_weight * disc_factor * g_loss                  (the GAN part only from --disc-start on)
with d_weight = disc_weight * ||grad_last(L1 + LPIPS)|| / (||grad_last(g_loss)|| + 1e-4).
The discriminator has its own step on detached reconstructions; neither step sends gradients
into the other's parameters. `step` counts optimizer steps and is the one clock.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from codebook import CodebookUsage
from config import TrainVQGANConfig, UserError, config_to_dict, parse_train_vqgan
from helper import at_least_float32
from discriminator import D_LOSSES, NLayerDiscriminator, adaptive_weight_from_output_grads, generator_loss
from lpips import LPIPS, VGGWeightsUnavailable, load_lpips
from metrics import psnr
from data import EpochSampler, SkipLog, epoch_batches, image_datasets, make_loader
from utils import (DistInfo, MeanMeter, RunFolder, TrainingGuard, all_finite, autocast, barrier,
                   describe_batch, global_batch, is_main_process, load_checkpoint, log, lr_at, replicas_identical,
                   resolve_precision, run_rng_state, run_cli, save_sample_grid, scaled_lr,
                   seed_everything, set_run_rng_state, setup_distributed, warn)
from vqgan import VQGAN


@dataclass
class Stage1:
    """Everything one training step touches."""
    cfg: TrainVQGANConfig
    model: VQGAN
    disc: NLayerDiscriminator
    perceptual: Optional[LPIPS]
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler_g: torch.amp.GradScaler
    scaler_d: torch.amp.GradScaler
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    usage: CodebookUsage
    learning_rate: float  # after --scale-lr
    model_train: nn.Module  # what the steps call: the DDP wrappers under torchrun, else model and disc
    disc_train: nn.Module
    total_steps: Optional[int] = None  # the last step of the run (the cosine schedule ends there)

    def disc_active(self, step: int) -> bool:
        return step >= self.cfg.disc_start and self.cfg.disc_factor > 0


def no_sync(module: nn.Module, last: bool):
    """DDP gradient synchronization only on the last micro-batch of an accumulated step."""
    return module.no_sync() if isinstance(module, DDP) and not last else contextlib.nullcontext()


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Parameters of `module` get no gradients inside the block (inputs still do)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


def apply_update(opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, losses: list, params) -> bool:
    """Step `opt` unless a loss or a gradient is non-finite (then its gradients are dropped and
    nothing changes); under fp16 the GradScaler handles overflowing gradients itself, so only
    the losses are checked there. True when it stepped."""
    ok = all_finite(losses, params, check_grads=not scaler.is_enabled())
    if ok:
        scaler.step(opt)
        scaler.update()
    else:
        opt.zero_grad(set_to_none=True)
    return ok


def generator_step(s: Stage1, x, step: int):
    """One optimizer step of encoder, codebook and decoder over one batch, or over a list of
    micro-batches whose gradients are accumulated (--grad-accum). Returns (logs, x_rec, indices),
    x_rec detached and in the form of x (a tensor, or a list of them).

    With the GAN term on, the adaptive weight needs the last layer's gradients of the NLL and of
    the GAN loss separately. The reference takes both through the whole graph (LPIPS and the
    discriminator backpropagated twice) and then backpropagates the weighted sum a third time.
    Here each loss is backpropagated once, to the reconstruction x_rec; as x_rec is the output of
    the last layer, that layer's two gradients come from those through the last layer alone; and
    the weighted sum of the two x_rec gradients (plus the codebook loss) is backpropagated once
    through decoder and encoder. The gradients are the same (a test checks it)."""
    micro = list(x) if isinstance(x, (list, tuple)) else [x]
    # The codebook techniques change codes and buffers during the forward pass; a skipped step
    # puts them back, so that it changes nothing at all.
    quantize = s.model.quantize
    before = ({k: v.clone() for k, v in quantize.state_dict().items()} if s.model.config.codebook_options()
              else None)
    s.opt_g.zero_grad(set_to_none=True)
    logs, x_recs, indices = MeanMeter(), [], []
    for i, xi in enumerate(micro):
        with no_sync(s.model_train, last=i == len(micro) - 1):
            step_logs, x_rec, idx = generator_backward(s, xi, step, 1.0 / len(micro))
        logs.add(step_logs)
        x_recs.append(x_rec)
        indices.append(idx)
    logs = logs.means()
    # The loss terms, not the weighted total: under fp16 an overflow in the adaptive weight's
    # gradients makes d_weight NaN, which is the GradScaler's to handle (skip and back off).
    terms = [logs[k] for k in ("rec_loss", "p_loss", "q_loss", "g_loss")]
    ok = apply_update(s.opt_g, s.scaler_g, terms, s.model.parameters())
    if not ok and before is not None:
        quantize.load_state_dict(before)
        if hasattr(quantize, "pop_restarted"):
            quantize.pop_restarted()  # undone: neither logged nor excluded from the usage counts
    logs["skipped"] = torch.tensor(0.0 if ok else 1.0)
    return logs, (x_recs if isinstance(x, (list, tuple)) else x_recs[0]), torch.cat(indices)


def generator_backward(s: Stage1, x: torch.Tensor, step: int, weight: float = 1.0):
    """Forward and backward of one (micro-)batch, gradients scaled by `weight` (1/K when K
    micro-batches make a step); the adaptive weight is that of this micro-batch."""
    cfg, zero = s.cfg, torch.zeros((), device=x.device)
    gan = s.disc_active(step)
    with frozen(s.disc), autocast(s.device, s.amp_dtype):
        x_rec, indices, q_loss = s.model_train(x)
        rec_loss = (at_least_float32(x) - at_least_float32(x_rec)).abs().mean()
        p_loss = at_least_float32(s.perceptual(x, x_rec)).mean() if s.perceptual is not None else zero
        nll_loss = cfg.rec_loss_factor * rec_loss + cfg.perceptual_loss_factor * p_loss
        if gan:
            # Scored inside a real+fake batch, as in the discriminator step, so that BatchNorm
            # normalizes the fakes with the same kind of statistics the discriminator learned on.
            # The unwrapped discriminator: it is frozen here, so DDP has nothing to synchronize.
            logits_fake = at_least_float32(s.disc(torch.cat([x, x_rec]))[x.shape[0]:])
            g_loss = generator_loss(logits_fake, cfg.disc_loss)
        else:  # before --disc-start the discriminator does no work at all
            g_loss = zero
    # Under fp16 the losses are scaled before differentiation, so small gradients do not
    # underflow; the ratio in the adaptive weight is unchanged by the common scale. scale() also
    # creates the GradScaler's scale tensor on first use (a tensor: no host sync).
    scale = s.scaler_g.scale(torch.ones((), device=x.device)) * weight
    if gan:
        grad_nll, = torch.autograd.grad(nll_loss * scale, x_rec, retain_graph=True)
        grad_gan, = torch.autograd.grad(g_loss * scale, x_rec, retain_graph=True)
        d_weight = cfg.disc_weight * adaptive_weight_from_output_grads(x_rec, s.model.last_layer, grad_nll, grad_gan,
                                                                      eps=1e-4 * scale)
        grad_x_rec = grad_nll + (d_weight * cfg.disc_factor).to(grad_nll.dtype) * grad_gan
        torch.autograd.backward([x_rec, cfg.codebook_weight * q_loss * scale], [grad_x_rec, None])
    else:
        d_weight = zero
        ((nll_loss + cfg.codebook_weight * q_loss) * scale).backward()
    loss = nll_loss.detach() + d_weight * cfg.disc_factor * g_loss.detach() + cfg.codebook_weight * q_loss.detach()
    logs = dict(loss=loss, rec_loss=rec_loss, p_loss=p_loss, q_loss=q_loss, g_loss=g_loss, d_weight=d_weight)
    return logs, x_rec.detach(), indices


def discriminator_step(s: Stage1, x, x_rec, step: int) -> dict:
    """One optimizer step of the PatchGAN on real images and detached reconstructions (tensors,
    or lists of micro-batches as generator_step takes and returns them)."""
    if not s.disc_active(step):
        return {}
    xs = list(x) if isinstance(x, (list, tuple)) else [x]
    recs = list(x_rec) if isinstance(x_rec, (list, tuple)) else [x_rec]
    s.opt_d.zero_grad(set_to_none=True)
    logs = MeanMeter()
    for i, (xi, ri) in enumerate(zip(xs, recs)):
        with no_sync(s.disc_train, last=i == len(xs) - 1):
            with autocast(s.device, s.amp_dtype):
                # One forward over real and fake together (the reference runs two): BatchNorm
                # statistics come from the mixed batch in both steps, and a BatchNorm module is
                # called once per step, which DistributedDataParallel requires.
                logits = at_least_float32(s.disc_train(torch.cat([xi, ri.detach()])))
                logits_real, logits_fake = logits.chunk(2)
                d_loss = s.cfg.disc_factor * D_LOSSES[s.cfg.disc_loss](logits_real, logits_fake)
            s.scaler_d.scale(d_loss / len(xs)).backward()
        logs.add(dict(d_loss=d_loss, logits_real=logits_real.detach().mean(), logits_fake=logits_fake.detach().mean()))
    logs = logs.means()
    ok = apply_update(s.opt_d, s.scaler_d, [logs["d_loss"]], s.disc.parameters())
    logs["d_skipped"] = torch.tensor(0.0 if ok else 1.0)
    return logs


def train_step(s: Stage1, x, step: int) -> dict:
    """Generator step, then discriminator step, on a batch or a list of micro-batches. Returns
    0-dim tensors (no host sync here)."""
    lr = lr_at(step, s.learning_rate, s.cfg.lr_warmup_steps, s.total_steps, s.cfg.lr_schedule)
    for opt in (s.opt_g, s.opt_d):
        for group in opt.param_groups:
            group["lr"] = lr
    logs, x_rec, indices = generator_step(s, x, step)
    if logs["skipped"]:  # a non-finite batch: the discriminator does not learn from it either
        warn(f"step {step} skipped (no update): non-finite loss or gradients; "
             + ", ".join(f"{k}={v.item():.4g}" for k, v in logs.items() if k != "skipped"))
    else:
        logs.update(discriminator_step(s, x, x_rec, step))
        if logs.get("d_skipped", 0):
            warn(f"step {step}: discriminator update skipped, non-finite d_loss={logs['d_loss'].item():.4g}")
            logs["skipped"] = logs["d_skipped"]
    restarted = s.model.quantize.pop_restarted() if s.model.config.codebook_restart_after else None
    logs.update(s.usage.update(indices, exclude=restarted))  # a restart's own use is not usage
    if restarted is not None:
        logs["codes_restarted"] = restarted.sum()
    return logs


def compile_stage1(model: VQGAN, disc: nn.Module, perceptual: Optional[nn.Module]) -> None:
    """torch.compile in place (state_dict names unchanged): encoder, decoder up to its last
    layer (see Decoder.compile_trunk), discriminator and LPIPS. The quantizer stays eager: its
    training-time codebook updates change buffers in place."""
    model.encoder.compile()
    model.decoder.compile_trunk()
    disc.compile()
    if perceptual is not None:
        perceptual.compile()


def build_stage1(cfg: TrainVQGANConfig, device: torch.device, perceptual: Optional[LPIPS],
                 dist_info: DistInfo = DistInfo()) -> Stage1:
    model = VQGAN(cfg.model).to(device)
    disc = NLayerDiscriminator(input_nc=cfg.model.out_channels, ndf=cfg.disc_ndf, n_layers=cfg.disc_layers)
    if cfg.sync_batchnorm and dist_info.enabled:
        if device.type != "cuda":
            raise UserError("--sync-batchnorm needs CUDA (SyncBatchNorm has no CPU implementation): drop it for "
                            "CPU runs.")
        disc = nn.SyncBatchNorm.convert_sync_batchnorm(disc)
    disc = disc.to(device)
    betas = (cfg.beta1, cfg.beta2)
    amp_dtype = resolve_precision(cfg.precision, device)
    fp16 = amp_dtype == torch.float16  # bf16 and fp32 need no loss scaling
    perceptual = perceptual.to(device) if perceptual else None
    if cfg.compile:
        compile_stage1(model, disc, perceptual)
    model_train, disc_train = model, disc
    if dist_info.enabled:  # wrapped separately: each has its own optimizer and backward
        ids = [device.index] if device.type == "cuda" else None
        model_train, disc_train = DDP(model, device_ids=ids), DDP(disc, device_ids=ids)
    fused = device.type == "cuda"  # one kernel per optimizer step instead of one per tensor
    lr = scaled_lr(cfg, dist_info)
    return Stage1(cfg=cfg, model=model, disc=disc, perceptual=perceptual,
                  opt_g=torch.optim.Adam(model.parameters(), lr=lr, betas=betas, fused=fused),
                  opt_d=torch.optim.Adam(disc.parameters(), lr=lr, betas=betas, fused=fused),
                  scaler_g=torch.amp.GradScaler(device.type, enabled=fp16),
                  scaler_d=torch.amp.GradScaler(device.type, enabled=fp16),
                  device=device, amp_dtype=amp_dtype, usage=CodebookUsage(cfg.model.n_embed, cfg.usage_window),
                  learning_rate=lr, model_train=model_train, disc_train=disc_train)


def checkpoint_dict(s: Stage1, step: int) -> dict:
    """One dict of tensors and plain values (weights_only-loadable): all that resuming needs."""
    return {"kind": "vqgan", "format_version": 1, "step": step,
            "model": s.model.state_dict(), "model_config": config_to_dict(s.cfg.model),
            "discriminator": s.disc.state_dict(),
            "opt_g": s.opt_g.state_dict(), "opt_d": s.opt_d.state_dict(),
            "scaler_g": s.scaler_g.state_dict(), "scaler_d": s.scaler_d.state_dict(),
            "train_config": config_to_dict(s.cfg), "rng": run_rng_state()}


def load_resume(path: str, cfg: TrainVQGANConfig) -> dict:
    """The checkpoint to resume from, checked against the flags before anything is written.
    Loaded to the CPU: load_state_dict copies to the device, and RNG states must stay on the CPU."""
    ckpt = load_checkpoint(path, map_location="cpu")
    if ckpt.get("kind") != "vqgan" or "discriminator" not in ckpt:
        raise UserError(f"{path} is not a stage-1 training checkpoint (kind '{ckpt.get('kind')}'): "
                        "--resume takes a checkpoint written by training_vqgan.py.")
    ours = config_to_dict(cfg.model)
    if ckpt["model_config"] != ours:
        diff = {k: (v, ckpt["model_config"].get(k)) for k, v in ours.items() if ckpt["model_config"].get(k) != v}
        raise UserError(f"{path} was trained with a different architecture "
                        + ", ".join(f"{k}={old} (flags say {new})" for k, (new, old) in diff.items())
                        + ": give the same --preset and model flags as the original run.")
    return ckpt


def restore(s: Stage1, ckpt: dict) -> int:
    s.model.load_state_dict(ckpt["model"])
    s.disc.load_state_dict(ckpt["discriminator"])
    s.opt_g.load_state_dict(ckpt["opt_g"])
    s.opt_d.load_state_dict(ckpt["opt_d"])
    s.scaler_g.load_state_dict(ckpt["scaler_g"])
    s.scaler_d.load_state_dict(ckpt["scaler_d"])
    set_run_rng_state(ckpt["rng"])
    return int(ckpt["step"])


def setup_perceptual(cfg: TrainVQGANConfig) -> tuple[TrainVQGANConfig, Optional[LPIPS]]:
    """LPIPS with real weights, before any training. An explicit run without VGG weights stops
    with the ways out; the demo warns once and trains without the perceptual term."""
    if cfg.perceptual_loss_factor == 0:
        return cfg, None
    try:
        return cfg, load_lpips(cfg.vgg_weights)
    except VGGWeightsUnavailable as e:
        if cfg.dataset_path is not None:
            raise
        warn(f"{e}\nThe demo continues without the perceptual term (--perceptual-loss-factor 0).")
        return dataclasses.replace(cfg, perceptual_loss_factor=0.0), None


@torch.no_grad()
def evaluate_psnr(s: Stage1, loader, max_batches: int = 0) -> Optional[float]:
    """Mean PSNR (dB) of reconstructions over the validation loader (its first max_batches
    batches when max_batches > 0)."""
    was_training = s.model.training
    s.model.eval()
    values = []
    for i, x in enumerate(loader):
        if 0 < max_batches <= i:
            break
        x = x.to(s.device, non_blocking=True)
        with autocast(s.device, s.amp_dtype):
            x_rec, _, _ = s.model(x)
        values.append(psnr(x, x_rec.clamp(-1, 1)))
    s.model.train(was_training)
    return torch.cat(values).mean().item() if values else None


def main(cfg: TrainVQGANConfig) -> dict:
    device, dist_info = setup_distributed(cfg.device)
    resume_path = RunFolder.resume_path(cfg.output_dir, cfg.resume)
    resumed = load_resume(resume_path, cfg) if resume_path else None
    seed_everything(cfg.seed + dist_info.rank)  # per-process random streams (data order has its own seed)

    mc = cfg.model
    skip_log = SkipLog(Path(cfg.output_dir) / "skipped_files.txt")
    train_ds, val_ds, description = image_datasets(cfg.dataset_path, mc.resolution, mc.in_channels, cfg.flip,
                                                   cfg.val_fraction, cfg.seed, skip_log=skip_log,
                                                   max_bad_fraction=cfg.max_bad_fraction)
    if len(train_ds) < global_batch(cfg, dist_info):
        raise UserError(f"the global batch ({cfg.batch_size} x {dist_info.world_size} processes x {cfg.grad_accum} "
                        f"accumulated) is larger than the {len(train_ds)} training images: lower --batch-size or "
                        "--grad-accum, or add images.")
    cfg, perceptual = setup_perceptual(cfg)
    run = RunFolder(cfg.output_dir, config_to_dict(cfg), cfg.tensorboard, cfg.keep_checkpoints)
    s = build_stage1(cfg, device, perceptual, dist_info)
    step = restore(s, resumed) if resumed else 0

    sampler = EpochSampler(len(train_ds), cfg.seed, rank=dist_info.rank, world_size=dist_info.world_size)
    steps_per_epoch = sampler.per_rank // (cfg.batch_size * cfg.grad_accum)
    total_steps = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    s.total_steps = total_steps
    loader = make_loader(train_ds, sampler, cfg.batch_size, cfg.num_workers, drop_last=True,
                         pin_memory=device.type == "cuda")
    val_loader = make_loader(val_ds, EpochSampler(len(val_ds), cfg.seed, shuffle=False), cfg.batch_size,
                             0, drop_last=False)
    fixed = next(iter(val_loader)) if len(val_ds) else next(iter(loader))
    fixed = fixed[:8].to(device)
    main_process = is_main_process()

    n_params = sum(p.numel() for p in s.model.parameters())
    log(f"data: {description}")
    log(f"model: {n_params / 1e6:.2f}M parameters, {mc.latent_size}x{mc.latent_size} tokens from "
        f"{mc.resolution}x{mc.resolution} images, {mc.n_embed} codes; device {device}, precision "
        f"{str(s.amp_dtype).replace('torch.', '') if s.amp_dtype else 'fp32'}; run folder {cfg.output_dir}")
    log(describe_batch(cfg, dist_info))
    log(f"training to step {total_steps} ({steps_per_epoch} steps per epoch); "
        f"discriminator from step {cfg.disc_start}" + (f"; resumed at step {step}" if step else ""))
    # Validation and sample grids on rank 0 only; the others wait at the barrier.
    psnr_before = psnr_after = evaluate_psnr(s, val_loader, cfg.val_batches) if main_process else None
    if psnr_before is not None:
        log(f"validation PSNR {'before training' if step == 0 else f'at step {step}'}: {psnr_before:.2f} dB")
    barrier()

    s.model.train()
    s.disc.train()
    bar = tqdm(total=total_steps, initial=step, dynamic_ncols=True, disable=not main_process)
    meter, guard = MeanMeter(), TrainingGuard(cfg, run, device, skip_log)
    with guard:  # the signal handlers are restored however the loop ends
        for epoch, group in epoch_batches(step, total_steps, cfg.batch_size, sampler, loader, cfg.grad_accum):
            logs = train_step(s, [x.to(device, non_blocking=True) for x in group], step)
            meter.add(logs)
            step += 1
            bar.update(1)
            guard.after_step(step, bool(logs["skipped"]), lambda: checkpoint_dict(s, step))
            if step % cfg.log_every == 0 or step == total_steps:
                metrics = meter.flush()
                metrics.update(epoch=epoch, lr=lr_at(step - 1, s.learning_rate, cfg.lr_warmup_steps, total_steps, cfg.lr_schedule),
                               images_per_s=global_batch(cfg, dist_info) / metrics["step_time"])
                bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("rec_loss", "p_loss", "q_loss", "d_weight", "usage", "usage_window")})
                run.log_metrics(step, metrics)
            if step % cfg.sample_every == 0 or step == total_steps:
                if main_process:
                    with torch.no_grad(), autocast(device, s.amp_dtype):
                        s.model.eval()
                        rec = s.model(fixed)[0]
                        s.model.train()
                    save_sample_grid([fixed, rec], run.sample_dir / f"step_{step:07d}.png")
                    psnr_after = evaluate_psnr(s, val_loader, cfg.val_batches)
                    if psnr_after is not None:
                        run.log_metrics(step, {"val_psnr": psnr_after})
                barrier()
            if guard.save_or_stop(step, step % cfg.save_every == 0 or step == total_steps,
                                  lambda: checkpoint_dict(s, step)):
                break
    bar.close()

    if dist_info.enabled:
        same = replicas_identical(s.model) and replicas_identical(s.disc, buffers=False)
        (log if same else warn)(f"weights {'identical' if same else 'DIFFER'} on all {dist_info.world_size} processes")
    if psnr_after is not None and guard.signal is None:  # measured at the last step
        log(f"validation PSNR after {step} steps: {psnr_after:.2f} dB (before: {psnr_before:.2f} dB)")
    log(f"checkpoint: {run.last}; samples: {run.sample_dir}")
    run.close()
    return {"step": step, "psnr_before": psnr_before, "psnr_after": psnr_after, "stopped_by": guard.signal}


def cli(argv=None) -> int:
    """The command line: exit code 0, or 2 for a user error (one message, no traceback)."""
    return run_cli(main, parse_train_vqgan, argv)


if __name__ == "__main__":
    sys.exit(cli())
