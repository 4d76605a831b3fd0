"""Stage 1: train a VQGAN (Esser et al. 2021, Sec. 3.1, Eq. 5-7).

    python training_vqgan.py                          # demo: tiny model on bundled photos, CPU ok
    python training_vqgan.py --dataset-path DIR       # your images; --help lists every flag

One optimizer step: the generator step (encoder, codebook, decoder) minimizes the objective of
losses.py with the discriminator frozen; after it succeeds the codebook's own update runs
(EMA, k-means, restarts: codebook.py); then the discriminator step learns from real images and
detached reconstructions. Neither step sends gradients into the other's parameters, and each
optimizer zeroes its own. `step` counts optimizer steps and is the one clock; the loop around
train_step is utils.train_loop, shared with stage 2.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import (load_checkpoint, load_optimizer, load_scaler, load_strict, require_entries, run_rng_state,
                        set_run_rng_state)
from codebook import CodebookStats, CodebookUsage, VectorQuantizer
from config import TrainVQGANConfig, VQGANConfig, config_to_dict, model_config_from_dict
from data import EpochSampler, fixed_images, make_loader, run_datasets, training_batches
from discriminator import NLayerDiscriminator
from ema import EMA, evaluated_with, restore_ema
from distributed import DistInfo, barrier, is_main_process
from errors import UserError
from losses import (LossWeights, backward_fused, discriminator_logits, discriminator_loss, generator_objective,
                    generator_terms)
from lpips import LPIPS, VGGWeightsUnavailable, load_lpips
from metrics import psnr
from official import checkpoint_kind, sub_state
from runconfig import parse_train_vqgan
from runfolder import RunFolder, start_run
from utils import (Hooks, MeanMeter, autocast, check_global_batch, describe_batch, global_batch, log, lr_at,
                   optimizer_step, resolve_precision, run_cli, run_length, scaled_lr, seed_everything, train_loop, warn)
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
    total_steps: int  # the last step of the run (the cosine schedule ends there)
    model_train: nn.Module  # what the steps call: the DDP wrappers under torchrun, else model and disc
    disc_train: nn.Module
    ema: Optional[EMA] = None  # --ema-decay: the average of the VQGAN's weights
    channels_last: bool = False  # --memory-format: the batches (and the networks) in NHWC

    def eval_weights(self):
        """Validation and sample grids: eagerly under --compile, with the EMA weights swapped in
        (unless --raw-weights): ema.evaluated_with."""
        return evaluated_with(self.ema, self.model, self.cfg.raw_weights)

    @property
    def weights(self) -> LossWeights:
        return LossWeights.of(self.cfg)

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


def as_list(x) -> list:
    """A batch, or a list of micro-batches (--grad-accum), as a list."""
    return list(x) if isinstance(x, (list, tuple)) else [x]


def generator_step(s: Stage1, micro, step: int):
    """One optimizer step of encoder, codebook and decoder over a batch or a list of
    micro-batches (their gradients accumulated: --grad-accum), then the codebook's update from
    their statistics. Returns (logs, detached reconstructions, indices), one of each per micro-batch."""
    micro = as_list(micro)
    gan = s.disc_active(step)
    s.opt_g.zero_grad(set_to_none=True)
    logs, x_recs, indices, stats = MeanMeter(), [], [], []
    for i, x in enumerate(micro):
        # Under fp16 the losses are scaled before differentiation, so small gradients do not
        # underflow; scale() also creates the GradScaler's scale tensor on first use (no host sync).
        scale = s.scaler_g.scale(torch.ones((), device=x.device)) / len(micro)
        with no_sync(s.model_train, last=i == len(micro) - 1):
            with frozen(s.disc), autocast(s.device, s.amp_dtype):
                (x_rec, idx, q_loss), batch_stats = s.model_train(x, return_stats=True)
                # The unwrapped discriminator: it is frozen here, so DDP has nothing to synchronize.
                # The reference scores the reconstructions on their own; --disc-joint-batch next to the
                # real images, as its discriminator step sees them.
                joint = s.cfg.disc_joint_batch
                logits_fake = discriminator_logits(s.disc, x if joint else None, x_rec, joint)[1] if gan else None
                terms = generator_terms(x, x_rec, q_loss, s.weights, s.perceptual, logits_fake)
            d_weight = backward_fused(terms, x_rec, s.model.last_layer, s.weights, gan, scale)
        logs.add({**terms._asdict(), "d_weight": d_weight,
                  "loss": generator_objective(terms, d_weight, s.weights).detach()})
        x_recs.append(x_rec.detach())
        indices.append(idx)
        stats.append(batch_stats)
    logs = logs.means()
    # The loss terms, not the weighted total: under fp16 an overflow in the adaptive weight's
    # gradients makes d_weight NaN, which is the GradScaler's to handle (skip and back off).
    terms = [logs[k] for k in ("rec_loss", "p_loss", "q_loss", "g_loss")]
    stepped, _ = optimizer_step(s.opt_g, s.scaler_g, terms)
    if stats[0] is not None:  # a skipped step leaves the codebook (and the average below) as it was
        logs.update(s.model.quantize.update(CodebookStats.cat(stats), stepped))
    if s.ema is not None:
        s.ema.update(s.model, stepped)
    logs["skipped"] = (~stepped).float()
    return logs, x_recs, indices


def discriminator_step(s: Stage1, micro, x_recs, step: int, allowed: Optional[torch.Tensor] = None) -> dict:
    """One optimizer step of the PatchGAN on real images and detached reconstructions (a batch
    and its reconstructions, or lists of micro-batches as generator_step takes and returns them),
    unless a loss or gradient is non-finite or `allowed` (a 0-dim bool tensor: the generator's
    step was taken) is False."""
    if not s.disc_active(step):
        return {}
    micro, x_recs = as_list(micro), as_list(x_recs)
    s.opt_d.zero_grad(set_to_none=True)
    logs = MeanMeter()
    for i, (x, x_rec) in enumerate(zip(micro, x_recs)):
        with no_sync(s.disc_train, last=i == len(micro) - 1):
            with autocast(s.device, s.amp_dtype):
                logits_real, logits_fake = discriminator_logits(s.disc_train, x, x_rec.detach(), s.cfg.disc_joint_batch)
                d_loss = discriminator_loss(logits_real, logits_fake, s.weights)
            s.scaler_d.scale(d_loss / len(micro)).backward()
        logs.add(dict(d_loss=d_loss, logits_real=logits_real.detach().mean(), logits_fake=logits_fake.detach().mean()))
    logs = logs.means()
    stepped, _ = optimizer_step(s.opt_d, s.scaler_d, [logs["d_loss"]], allowed)
    # skipped because of its own non-finite values (a skipped generator step is counted there)
    logs["d_skipped"] = (~stepped).float() if allowed is None else (allowed & ~stepped).float()
    return logs


def gumbel_temperature(step: int, cfg: TrainVQGANConfig) -> float:
    """The reference's cosine schedule of the Gumbel-softmax temperature (its GumbelVQ)."""
    t = min(1.0, step / cfg.gumbel_temperature_steps)
    start, end = cfg.gumbel_temperature_start, cfg.gumbel_temperature_end
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * t))


def train_step(s: Stage1, x, step: int) -> dict:
    """Generator step, then discriminator step, on a batch or a list of micro-batches. Returns
    0-dim tensors; nothing here reads a tensor back to the host (after the codebook's k-means
    initialization), under fp16 neither. A non-finite step is skipped (logs["skipped"] 1):
    neither network, nor the codebook, nor the discriminator's BatchNorm statistics change (under
    fp16 the loss scale backs off when the gradients overflowed), and the training loop reports it
    at its next check."""
    micro = as_list(x)
    if s.channels_last:
        micro = [m.contiguous(memory_format=torch.channels_last) for m in micro]
    lr = lr_at(step, s.learning_rate, s.cfg.lr_warmup_steps, s.total_steps, s.cfg.lr_schedule)
    for opt in (s.opt_g, s.opt_d):
        for group in opt.param_groups:
            group["lr"] = lr
    if s.model.config.quantizer == "gumbel":
        s.model.quantize.set_temperature(gumbel_temperature(step, s.cfg))
    # BatchNorm's running statistics (a few hundred numbers), which both steps' discriminator passes move
    statistics = list(s.disc.buffers()) if s.disc_active(step) else []
    before = [b.clone() for b in statistics]
    logs, x_recs, indices = generator_step(s, micro, step)
    stepped = logs["skipped"] == 0
    # Codebook usage now, before the discriminator's compiled passes: with --compile-mode
    # reduce-overhead (CUDA graphs) a compiled call made with no backward pending may reuse the
    # memory of earlier graphs' outputs, such as the quantizer's indices.
    logs.update(s.usage.update(torch.cat(indices), stepped))
    logs.update(discriminator_step(s, micro, x_recs, step, allowed=stepped))  # nor from a non-finite batch
    if "d_skipped" in logs:
        logs["skipped"] = torch.maximum(logs["skipped"], logs["d_skipped"])
    taken = logs["skipped"] == 0
    for b, old in zip(statistics, before):
        b.copy_(torch.where(taken, b, old))
    return logs


def build_stage1(cfg: TrainVQGANConfig, device: torch.device, perceptual: Optional[LPIPS], total_steps: int,
                 dist_info: DistInfo = DistInfo()) -> Stage1:
    model = VQGAN(cfg.model).to(device)
    disc = NLayerDiscriminator(input_nc=cfg.model.out_channels, ndf=cfg.disc_ndf, n_layers=cfg.disc_layers)
    if cfg.sync_batchnorm and dist_info.enabled:
        if device.type != "cuda":
            raise UserError("--sync-batchnorm needs CUDA (SyncBatchNorm has no CPU implementation): drop it for "
                            "CPU runs.")
        disc = nn.SyncBatchNorm.convert_sync_batchnorm(disc)
    disc = disc.to(device)
    amp_dtype = resolve_precision(cfg.precision, device)
    perceptual = perceptual.to(device) if perceptual else None
    channels_last = uses_channels_last(cfg, device)
    if channels_last:  # the weights of every convolution: cuDNN then runs each in NHWC
        for net in (model, disc, perceptual):
            if net is not None:
                net.to(memory_format=torch.channels_last)
    if cfg.compile:
        compile_stage1(model, disc, perceptual, cfg.compile_mode)
    model_train, disc_train = model, disc
    if dist_info.enabled:  # wrapped separately: each has its own optimizer and backward
        ids = [device.index] if device.type == "cuda" else None
        model_train = DDP(model, device_ids=ids)
        # The discriminator runs twice per step (real, then fake); broadcasting BatchNorm's
        # running statistics at each forward would modify, in place, tensors the first pass's
        # backward needs. The running statistics are used in eval mode only, never in training,
        # so each process keeps its own (rank 0's are saved).
        disc_train = DDP(disc, device_ids=ids, broadcast_buffers=False)
    fused = True  # one kernel per optimizer step, and it takes the skip decision as a tensor (optimizer_step)
    lr, betas = scaled_lr(cfg, dist_info), (cfg.beta1, cfg.beta2)
    fp16 = amp_dtype == torch.float16  # bf16 and fp32 need no loss scaling
    return Stage1(cfg=cfg, model=model, disc=disc, perceptual=perceptual,
                  opt_g=torch.optim.Adam(model.parameters(), lr=lr, betas=betas, fused=fused),
                  opt_d=torch.optim.Adam(disc.parameters(), lr=lr, betas=betas, fused=fused),
                  scaler_g=torch.amp.GradScaler(device.type, enabled=fp16),
                  scaler_d=torch.amp.GradScaler(device.type, enabled=fp16), device=device, amp_dtype=amp_dtype,
                  usage=CodebookUsage(cfg.model.n_embed, cfg.usage_window), learning_rate=lr, total_steps=total_steps,
                  model_train=model_train, disc_train=disc_train,
                  ema=EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None, channels_last=channels_last)


def uses_channels_last(cfg: TrainVQGANConfig, device: torch.device) -> bool:
    """--memory-format; auto: channels-last for compiled training on CUDA. The H200 profile of the
    compiled f16 step (contiguous) found 26 ms per step of transposes between NCHW and NHWC
    around cuDNN's convolutions (the step: 116 ms); compiled, GroupNorm becomes generated code
    that reads either layout. Eager stays contiguous: PyTorch 2.11's GroupNorm on CUDA turns NHWC
    input back into NCHW, which would add transposes, not remove them."""
    if cfg.memory_format == "auto":
        return cfg.compile and device.type == "cuda"
    return cfg.memory_format == "channels-last"


# torch.compile's options for --compile (tests trace with backend "aot_eager", the same graphs without code
# generation, and fullgraph=True, so that a graph break fails them)
COMPILE_OPTIONS: dict = dict(backend="inductor")


def compile_stage1(model: VQGAN, disc: nn.Module, perceptual: Optional[nn.Module], mode: str = "default") -> None:
    """torch.compile in place (state_dict names unchanged): encoder, quantizer, decoder up to its
    last layer (see Decoder.compile_trunk), discriminator and LPIPS, in --compile-mode. The
    Gumbel quantizer stays eager: its temperature changes every step, which would recompile it."""
    options = dict(COMPILE_OPTIONS, **({} if mode == "default" else {"mode": mode}))
    model.encoder.compile(**options)
    if isinstance(model.quantize, VectorQuantizer):
        model.quantize.compile(**options)
    model.decoder.compile_trunk(**options)
    disc.compile(**options)
    if perceptual is not None:
        perceptual.compile(**options)


def checkpoint_dict(s: Stage1, step: int) -> dict:
    """One dict of tensors and plain values (weights_only-loadable): all that resuming needs."""
    return {"kind": "vqgan", "format_version": 1, "step": step,
            "model": s.model.state_dict(), "model_config": config_to_dict(s.cfg.model),
            "discriminator": s.disc.state_dict(),
            "opt_g": s.opt_g.state_dict(), "opt_d": s.opt_d.state_dict(),
            "scaler_g": s.scaler_g.state_dict(), "scaler_d": s.scaler_d.state_dict(),
            "train_config": config_to_dict(s.cfg), "rng": run_rng_state(),
            **({"ema": s.ema.state_dict()} if s.ema is not None else {}),
            # before the codes' k-means initialization: what it has pooled (--codebook-warmup)
            **({"kmeans_pool": pool} if (pool := s.model.quantize.kmeans_pool_state()) is not None else {})}


# What a resumed run must keep: the architecture (model config) and these settings of the discriminator.
FIXED_ON_RESUME = ("disc_ndf", "disc_layers")


def load_resume(path: str, cfg: TrainVQGANConfig) -> dict:
    """The checkpoint to resume from, checked against the flags before anything is written: its
    kind, every entry restore() reads, the architecture and the settings that cannot change.
    Loaded to the CPU: load_state_dict copies to the device, and RNG states must stay on the CPU."""
    ckpt = load_checkpoint(path, map_location="cpu")
    if ckpt.get("kind") != "vqgan" or "discriminator" not in ckpt:
        raise UserError(f"{path} is not a stage-1 training checkpoint (kind '{ckpt.get('kind')}'): "
                        "--resume takes a checkpoint written by training_vqgan.py.")
    require_entries(ckpt, ("step", "model", "model_config", "discriminator", "opt_g", "opt_d", "scaler_g", "scaler_d",
                           "train_config", "rng"), path, "stage-1 training checkpoint")
    saved, ours = config_to_dict(model_config_from_dict(VQGANConfig, ckpt["model_config"])), config_to_dict(cfg.model)
    if saved != ours:
        diff = {k: (v, saved.get(k)) for k, v in ours.items() if saved.get(k) != v}
        raise UserError(f"{path} was trained with a different architecture "
                        + ", ".join(f"{k}={old} (this config says {new})" for k, (new, old) in diff.items())
                        + ": resume with the run's own configuration (what --resume restores).")
    for name in FIXED_ON_RESUME:
        was = ckpt["train_config"].get(name, getattr(cfg, name))
        if was != getattr(cfg, name):
            raise UserError(f"--{name.replace('_', '-')} cannot change on resume: the run was trained with {was}, "
                            f"the flags say {getattr(cfg, name)}. Drop the flag, or start a new run.")
    return ckpt


def restore(s: Stage1, ckpt: dict, path: str) -> int:
    """Every state of the checkpoint into the built stage, each checked (names, shapes, finite
    weights, optimizer state that fits); a UserError before anything is written otherwise."""
    load_strict(s.model, ckpt["model"], f"{path} (model)")
    s.model.quantize.load_kmeans_pool_state(ckpt.get("kmeans_pool"))
    load_strict(s.disc, ckpt["discriminator"], f"{path} (discriminator)")
    load_optimizer(s.opt_g, ckpt["opt_g"], f"{path} (opt_g)")
    load_optimizer(s.opt_d, ckpt["opt_d"], f"{path} (opt_d)")
    for scaler, key in ((s.scaler_g, "scaler_g"), (s.scaler_d, "scaler_d")):
        note = load_scaler(scaler, ckpt[key])
        if note and key == "scaler_g":
            log(f"resuming: {note}")
    restore_ema(s.ema, s.model, ckpt, path)
    set_run_rng_state(ckpt["rng"], path)
    if not isinstance(ckpt["step"], int) or ckpt["step"] < 0:
        raise UserError(f"{path} records step {ckpt['step']!r}: the checkpoint is damaged.")
    return ckpt["step"]


def load_init(cfg: TrainVQGANConfig) -> tuple[TrainVQGANConfig, VQGAN, Optional[dict]]:
    """--init-from: the weights to fine-tune (the EMA weights when the file has them), the
    config with the file's architecture, and the discriminator's weights when the file has one
    (ours: its "discriminator"; the reference's: loss.discriminator.*)."""
    path = cfg.init_from
    ckpt = load_checkpoint(path)  # a checkpoint file or a model folder
    model = VQGAN.from_checkpoint_dict(ckpt, f"--init-from {path}")
    disc = ckpt.get("discriminator")
    if checkpoint_kind(ckpt) == "reference-vqgan":
        disc = sub_state(ckpt["state_dict"], "loss.discriminator.") or None
    if isinstance(disc, dict) and torch.is_tensor(disc.get("main.0.weight")):  # its shape, read from the weights:
        # the first layer's width, and one BatchNorm per stride-2 layer after the first plus the stride-1 one
        cfg = dataclasses.replace(cfg, disc_ndf=disc["main.0.weight"].shape[0],
                                  disc_layers=max(1, sum(k.endswith("running_mean") for k in disc)))
    return dataclasses.replace(cfg, model=model.config), model, disc


def apply_init(s: Stage1, model: VQGAN, disc: Optional[dict], path: str) -> None:
    """The --init-from weights into the built stage (its EMA, if any, starts from them)."""
    load_strict(s.model, model.state_dict(), f"--init-from {path}")
    if disc is not None:
        load_strict(s.disc, disc, f"--init-from {path} (discriminator; --disc-ndf and --disc-layers must match it)")
    if s.ema is not None:
        s.ema.reset(s.model)


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
    with s.eval_weights():
        for i, x in enumerate(loader):
            if 0 < max_batches <= i:
                break
            x = x.to(s.device, non_blocking=True)
            with autocast(s.device, s.amp_dtype):
                x_rec = s.model(x).x_rec
            values.append(psnr(x, x_rec.clamp(-1, 1)))
    s.model.train(was_training)
    return torch.cat(values).mean().item() if values else None


def main(cfg: TrainVQGANConfig) -> dict:
    with contextlib.ExitStack() as scope:
        stop, device, dist_info, resume = start_run(cfg, scope)
        resumed = load_resume(resume, cfg) if resume else None
        init = None
        if cfg.init_from is not None and resumed is None:  # fine-tuning: the file's architecture
            cfg, init_model, init_disc = load_init(cfg)
            init = (init_model, init_disc)
        seed_everything(cfg.seed + dist_info.rank)  # per-process random streams (data order has its own seed)

        mc = cfg.model
        train_ds, val_ds, description, skip_log, index = run_datasets(cfg, mc.resolution, mc.in_channels, cfg.flip,
                                                                      color=cfg.color_augment)
        check_global_batch(cfg, dist_info, len(train_ds))
        cfg, perceptual = setup_perceptual(cfg)
        steps_per_epoch, total_steps = run_length(cfg, len(train_ds), dist_info)
        s = build_stage1(cfg, device, perceptual, total_steps, dist_info)
        step = restore(s, resumed, resume) if resumed else 0
        if init is not None:
            apply_init(s, *init, cfg.init_from)
        # Every check has passed: only now is the run folder written (and locked).
        run = scope.enter_context(RunFolder.of(cfg, resuming=resumed is not None))
        skip_log.start_writing()
        if is_main_process():
            index.start_writing()
        val_loader = make_loader(val_ds, EpochSampler(len(val_ds), cfg.seed, shuffle=False), cfg.batch_size, 0, False)
        fixed = fixed_images(train_ds, val_ds, 8).to(device)

        log(f"data: {description}")
        log(f"model: {sum(p.numel() for p in s.model.parameters()) / 1e6:.2f}M parameters, {mc.latent_size}x"
            f"{mc.latent_size} tokens from {mc.resolution}x{mc.resolution} images, {mc.n_embed} codes; device "
            f"{device}, precision {str(s.amp_dtype).replace('torch.', '') if s.amp_dtype else 'fp32'}; run folder "
            f"{cfg.output_dir}")
        log(describe_batch(cfg, dist_info))
        terms = (f"discriminator from step {cfg.disc_start}" if cfg.disc_start < total_steps and cfg.disc_factor > 0
                 else f"discriminator off in this run (--disc-start {cfg.disc_start}, --disc-factor {cfg.disc_factor:g})")
        terms += "" if cfg.perceptual_loss_factor > 0 else "; no perceptual term (--perceptual-loss-factor 0)"
        log(f"training to step {total_steps} ({steps_per_epoch} steps per epoch); {terms}"
            + (f"; resumed at step {step}" if step else "")
            + (f"; fine-tuning {cfg.init_from}" + (" (with its discriminator)" if init[1] is not None else "")
               if init is not None else "")
            + (f"; EMA of the weights, decay {cfg.ema_decay:g}" if s.ema is not None else ""))
        # Validation and sample grids on rank 0 only; the others wait at the barrier.
        psnr_before = evaluate_psnr(s, val_loader, cfg.val_batches) if is_main_process() else None
        psnr_after = [psnr_before]  # the newest validation PSNR, set by evaluate()
        when = "before training" if step == 0 else f"at step {step}"
        if psnr_before is not None and math.isfinite(psnr_before):
            log(f"validation PSNR {when}: {psnr_before:.2f} dB")
        elif psnr_before is not None:
            warn(f"validation PSNR {when} is {psnr_before}: not a number (are the weights finite?).")
        barrier()

        def evaluate(at: int) -> dict:
            """Inputs above reconstructions of the fixed validation images, and the validation PSNR."""
            psnr_after[0] = None
            with torch.no_grad(), autocast(device, s.amp_dtype), s.eval_weights():
                s.model.eval()
                rec = s.model(fixed).x_rec
                s.model.train()
            run.save_samples([fixed, rec], at)
            psnr_after[0] = evaluate_psnr(s, val_loader, cfg.val_batches)
            return {} if psnr_after[0] is None else {"val_psnr": psnr_after[0]}

        s.model.train()
        s.disc.train()
        hooks = Hooks(train_step=lambda micro, at: train_step(s, [x.to(device, non_blocking=True) for x in micro], at),
                      checkpoint=lambda at: checkpoint_dict(s, at), evaluate=evaluate,
                      lr=lambda at: lr_at(at, s.learning_rate, cfg.lr_warmup_steps, total_steps, cfg.lr_schedule),
                      rate=("images_per_s", global_batch(cfg, dist_info)),
                      shown=("rec_loss", "p_loss", "q_loss", "d_weight", "usage", "usage_window"),
                      # BatchNorm statistics are per process
                      replicas=[(s.model, True), (s.disc, False)] + ([(s.ema, False)] if s.ema else []))
        batches = training_batches(train_ds, cfg, dist_info, device, step, total_steps)
        step, stopped_by, failed = train_loop(cfg, run, hooks, batches, step, total_steps, skip_log, stop)
        measured = psnr_after[0] is not None and math.isfinite(psnr_after[0])
        if measured and stopped_by is None and step == total_steps:  # measured at the last step
            log(f"validation PSNR after {step} steps: {psnr_after[0]:.2f} dB (before: {psnr_before:.2f} dB)")
        log(f"checkpoint: {run.last}; samples: {run.sample_dir}")
        return {"step": step, "psnr_before": psnr_before, "psnr_after": psnr_after[0] if measured else None,
                "stopped_by": stopped_by, "failed_evaluations": failed}


def cli(argv=None) -> int:
    """The command line: exit code 0, or 2 for a user error (one message, no traceback)."""
    return run_cli(main, parse_train_vqgan, argv)


if __name__ == "__main__":
    sys.exit(cli())
