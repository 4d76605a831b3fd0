"""Time the training steps and sampling: stage-1 images/s, GPT tokens/s, sampled images/s.

    python benchmark.py stage1 --preset f16-1024 --batch-size 16                 # GAN active, LPIPS on
    python benchmark.py stage1 --preset tiny --device cpu --compare              # ours vs the reference's step
    python benchmark.py gpt --preset f16-1024 --gpt-preset f16-1024 --batch-size 16
    python benchmark.py sample --preset f16-1024 --gpt-preset f16-1024 --batch-size 16 --top-k 100

Random weights and inputs (the compute is the same as with trained ones; LPIPS's VGG16 too, so
nothing is downloaded). Each command warms up, then times --steps steps with CUDA events (wall
clock on the CPU) and reports the median, the rate and, on CUDA, the peak memory. Every model
field is a flag (--ch, --ch-mult, --attn-resolutions, --n-layer, ...), so any architecture can be
timed. `--compare` also times the straightforward implementation and reports the speed ratio:
for stage 1 the reference's training step as its trainer runs it (the adaptive weight's
gradients through the whole graph, a second VQGAN and LPIPS forward in the discriminator step,
separate real and fake discriminator passes); for the GPT the same step with attention computed
by the explicit softmax formula; sampling always reports cached and uncached rates.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from config import (GPT_PRESETS, PRESETS, GPTConfig, TrainTransformerConfig, TrainVQGANConfig, VQGANConfig,
                    check_finite, make_config, require)
from errors import UserError
from flags import add_fields, given_values, option
from losses import LossWeights, reference_step
from lpips import LPIPS
from utils import autocast, log, resolve_device, resolve_precision, run_cli, writable_file
from vqgan import VQGAN


@dataclass
class BenchConfig:
    """What every subcommand takes (and, with the model fields, overrides of the presets)."""
    preset: str = option("f16-1024", f"stage-1 preset: {', '.join(PRESETS)}")
    batch_size: int = option(16, "images per step")
    device: str = option("auto", "torch device; auto = cuda when available, else cpu")
    precision: str = option("auto", "autocast precision; auto = bf16 on CUDA where supported, else fp32", choices=("auto", "fp32", "bf16", "fp16"))
    compile: bool = option(False, "torch.compile as training does with --compile")
    steps: int = option(20, "timed steps")
    warmup: int = option(5, "untimed steps first")
    json: Optional[str] = option(None, "also write the result to this JSON file")
    command: str = "stage1"  # the subcommand (not a flag)
    model: dict = dataclasses.field(default_factory=dict)  # model fields given as flags (not a flag itself)

    def __post_init__(self):
        check_finite(self)
        require(self, dict(batch_size=1, steps=1, warmup=0))


@dataclass
class Stage1Bench(BenchConfig):
    compare: bool = option(False, "also time the reference's training step (losses.reference_step)")
    disc_joint_batch: bool = option(False, "our step with one discriminator pass over real and fake (training's --disc-joint-batch)")


@dataclass
class GPTBench(BenchConfig):
    gpt_preset: str = option("f16-1024", f"GPT preset: {', '.join(GPT_PRESETS)}")
    compare: bool = option(False, "also time the step with attention by the explicit softmax formula")


@dataclass
class SampleBench(BenchConfig):
    gpt_preset: str = option("f16-1024", f"GPT preset: {', '.join(GPT_PRESETS)}")
    top_k: int = option(100, "top-k sampling")
    steps: int = 3  # a whole token grid per step: fewer steps
    warmup: int = 1

    def __post_init__(self):
        super().__post_init__()
        require(self, dict(top_k=1))


COMMANDS = {"stage1": (Stage1Bench, "one VQGAN training step: generator and discriminator, GAN and LPIPS active", (VQGANConfig,)),
            "gpt": (GPTBench, "one GPT training step on cached tokens", (VQGANConfig, GPTConfig)),
            "sample": (SampleBench, "sampling a full token grid per image, with and without the key/value cache",
                       (VQGANConfig, GPTConfig))}


def parse_args(argv: Optional[list[str]] = None) -> BenchConfig:
    p = argparse.ArgumentParser(description="Benchmark VQGAN training (stage1), GPT training (gpt) and sampling (sample).")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (cls, help, model_classes) in COMMANDS.items():
        sp = sub.add_parser(name, help=help, description=help)
        add_fields(sp, cls, skip=("command", "model"))
        for model_cls in model_classes:
            add_fields(sp, model_cls, f"{model_cls.__name__} fields (override the preset)")
    given = given_values(p.parse_args(argv))
    cls = COMMANDS[given["command"]][0]
    own = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in given.items() if k in own},
               model={k: v for k, v in given.items() if k not in own})


def model_flags(args: BenchConfig, cls) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in args.model.items() if k in names}


class Timer:
    """Milliseconds of one call: CUDA events on the GPU (no host sync inside the timed work),
    wall clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1000


def measure(fn: Callable, device: torch.device, steps: int, warmup: int) -> dict:
    """Median milliseconds over `steps` calls after `warmup`, and the peak CUDA memory of the
    timed calls."""
    timer = Timer(device)
    for _ in range(warmup):
        timer(fn)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = [timer(fn) for _ in range(steps)]
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
    return {"median_ms": statistics.median(times), "peak_memory_gib": peak}


# ------------------------------------------------------------------------------------ stage 1
def bench_stage1(args: BenchConfig, device: torch.device) -> dict:
    from training_vqgan import build_stage1, train_step

    cfg = make_config(TrainVQGANConfig, VQGANConfig, {"preset": args.preset, **model_flags(args, VQGANConfig),
                                                      "batch_size": args.batch_size, "precision": args.precision,
                                                      "compile": args.compile, "disc_start": 0,
                                                      "disc_joint_batch": args.disc_joint_batch},
                      PRESETS)
    mc = cfg.model
    torch.manual_seed(0)
    s = build_stage1(cfg, device, LPIPS(), total_steps=10 ** 6)  # random VGG16: the same compute as the real one
    s.model.train()
    s.disc.train()
    x = (torch.rand(args.batch_size, mc.in_channels, mc.resolution, mc.resolution, device=device) * 2 - 1)
    result = {"command": "stage1", "preset": args.preset, "batch_size": args.batch_size, "image_size": mc.resolution,
              "n_embed": mc.n_embed, "parameters_m": sum(p.numel() for p in s.model.parameters()) / 1e6}
    m = measure(lambda: train_step(s, x, step=0), device, args.steps, args.warmup)
    result.update(step_ms=m["median_ms"], images_per_s=args.batch_size * 1000 / m["median_ms"],
                  peak_memory_gib=m["peak_memory_gib"])
    if args.compare:
        torch.manual_seed(0)
        ref = build_stage1(dataclasses.replace(cfg, compile=False), device, LPIPS(), total_steps=10 ** 6)
        ref.model.train()
        ref.disc.train()
        step = lambda: reference_step(ref.model, ref.disc, ref.perceptual, ref.opt_g, ref.opt_d, x,  # noqa: E731
                                      LossWeights.of(cfg), lambda: autocast(device, ref.amp_dtype))
        r = measure(step, device, args.steps, args.warmup)
        result.update(reference_step_ms=r["median_ms"], reference_images_per_s=args.batch_size * 1000 / r["median_ms"],
                      reference_peak_memory_gib=r["peak_memory_gib"], speedup=r["median_ms"] / m["median_ms"])
    return result


# ------------------------------------------------------------------------------------ stage 2
def build_transformer(args: BenchConfig, device: torch.device):
    from transformer import VQGANTransformer, gpt_shape

    tcfg = make_config(TrainTransformerConfig, GPTConfig, {"preset": args.gpt_preset, **model_flags(args, GPTConfig),
                                                           "batch_size": args.batch_size, "precision": args.precision,
                                                           "compile": args.compile}, GPT_PRESETS)
    vcfg = make_config(TrainVQGANConfig, VQGANConfig, {"preset": args.preset, **model_flags(args, VQGANConfig)},
                       PRESETS).model
    torch.manual_seed(0)
    gpt_cfg = dataclasses.replace(tcfg.model, **gpt_shape(vcfg, 0))
    model = VQGANTransformer(VQGAN(vcfg), gpt_cfg).to(device)
    return tcfg, vcfg, model


def bench_gpt(args: GPTBench, device: torch.device) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from training_transformer import build_stage2, train_step

    tcfg, vcfg, model = build_transformer(args, device)
    s = build_stage2(tcfg, model.train(), device, total_steps=10 ** 6)
    h = vcfg.latent_size
    tokens = torch.randint(vcfg.n_embed, (args.batch_size, h, h), device=device)
    per_step = args.batch_size * h * h
    result = {"command": "gpt", "preset": args.preset, "gpt_preset": args.gpt_preset, "batch_size": args.batch_size,
              "tokens_per_sequence": h * h, "n_layer": tcfg.model.n_layer, "n_embd": tcfg.model.n_embd,
              "parameters_m": sum(p.numel() for p in model.gpt.parameters()) / 1e6}
    m = measure(lambda: train_step(s, [tokens], 0), device, args.steps, args.warmup)
    result.update(step_ms=m["median_ms"], tokens_per_s=per_step * 1000 / m["median_ms"],
                  peak_memory_gib=m["peak_memory_gib"])
    if args.compare:
        with sdpa_kernel(SDPBackend.MATH):  # attention by the explicit formula
            r = measure(lambda: train_step(s, [tokens], 0), device, args.steps, args.warmup)
        result.update(reference_step_ms=r["median_ms"], reference_tokens_per_s=per_step * 1000 / r["median_ms"],
                      speedup=r["median_ms"] / m["median_ms"])
    return result


def bench_sample(args: SampleBench, device: torch.device) -> dict:
    tcfg, vcfg, model = build_transformer(args, device)
    model.eval()
    amp_dtype = resolve_precision(tcfg.precision, device)
    if args.compile:
        model.gpt.compile()
    h = vcfg.latent_size
    result = {"command": "sample", "preset": args.preset, "gpt_preset": args.gpt_preset, "batch_size": args.batch_size,
              "tokens_per_image": h * h, "top_k": args.top_k}
    indices = None
    for cached in (True, False):
        def run():
            nonlocal indices
            with torch.no_grad(), autocast(device, amp_dtype):
                indices = model.sample(args.batch_size, top_k=args.top_k, use_cache=cached)
        m = measure(run, device, args.steps, args.warmup)
        key = "cached" if cached else "uncached"
        result.update({f"{key}_s": m["median_ms"] / 1000, f"{key}_images_per_s": args.batch_size * 1000 / m["median_ms"],
                       f"{key}_peak_memory_gib": m["peak_memory_gib"]})

    def decode():
        with torch.no_grad(), autocast(device, amp_dtype):
            model.indices_to_images(indices)
    d = measure(decode, device, args.steps, args.warmup)
    result.update(decode_s=d["median_ms"] / 1000)
    return result


def main(args: BenchConfig) -> dict:
    device = resolve_device(args.device)
    if args.json:
        writable_file(args.json, "--json")  # before the timing, not after it
    for name in ("preset",) + (("gpt_preset",) if args.command != "stage1" else ()):
        presets = PRESETS if name == "preset" else GPT_PRESETS
        if getattr(args, name) not in presets:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} is unknown: choose one of "
                            f"{', '.join(presets)}.")
    bench = {"stage1": bench_stage1, "gpt": bench_gpt, "sample": bench_sample}[args.command]
    result = bench(args, device)
    amp_dtype = resolve_precision(args.precision, device)
    result.update(device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
                  precision=str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32", compile=args.compile,
                  torch=torch.__version__)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        log(f"wrote {args.json}")
    return result


def cli(argv=None) -> int:
    """The command line: exit code 0, or 2 for a user error (one message, no traceback)."""
    return run_cli(main, parse_args, argv)


if __name__ == "__main__":
    sys.exit(cli())
