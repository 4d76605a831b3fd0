"""Time the training steps and sampling: stage-1 images/s, GPT tokens/s, sampled images/s.

    python benchmark.py stage1 --preset f16-1024 --batch-size 16                 # GAN active, LPIPS on
    python benchmark.py stage1 --preset tiny --device cpu --compare              # ours vs the reference's step
    python benchmark.py gpt --preset f16-1024 --gpt-preset f16-1024 --batch-size 16
    python benchmark.py sample --preset f16-1024 --gpt-preset f16-1024 --batch-size 16 --top-k 100
    python benchmark.py suite --out suite.jsonl [--profile]     # every row of the README's GPU table

Random weights and inputs (the compute is the same as with trained ones; LPIPS's VGG16 too, so
nothing is downloaded). Each command warms up, then times --steps steps with CUDA events (wall
clock on the CPU) and reports the median, the rate and, on CUDA, the peak memory. Every model
field is a flag (--ch, --ch-mult, --attn-resolutions, --n-layer, ...), so any architecture can be
timed. `--compare` also times the straightforward implementation and reports the speed ratio:
for stage 1 the reference's training step as its trainer runs it (the adaptive weight's
gradients through the whole graph, a second VQGAN and LPIPS forward in the discriminator step,
separate real and fake discriminator passes); for the GPT the same step with attention computed
by the explicit softmax formula; sampling reports cached and uncached rates, and on CUDA the
cached loop captured as a CUDA graph. `suite` runs all of them (and the real trainer on generated
JPEG files) and writes one JSON line per row; `--profile` adds each row's top kernels and the
share of time the GPU sat idle.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from config import (COMPILE_MODES, GPT_PRESETS, MEMORY_FORMATS, PRESETS, GPTConfig, TrainTransformerConfig,
                    TrainVQGANConfig, VQGANConfig, check_finite, make_config, require)
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
    compile: bool = option(False, "torch.compile as training does with --compile (sample: the token step, timed beside the other variants)")
    compile_mode: str = option("default", "training's --compile-mode (stage1, gpt)", choices=COMPILE_MODES)
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
    memory_format: str = option("auto", "training's --memory-format (auto: channels-last with --compile on CUDA)", choices=MEMORY_FORMATS)


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


SUITE_ROWS = ("stage1", "stage1-compiled", "gpt", "gpt-compiled", "gpt-large", "gpt-large-compiled", "sample",
              "sample-large", "trainer")


@dataclass
class SuiteBench(BenchConfig):
    out: Optional[str] = option(None, "the JSON-lines file to write, one line per row", required=True)
    large_batch: int = option(64, "the batch of the -large rows (--batch-size: the others')")
    gpt_preset: str = option("f16-1024", f"GPT preset: {', '.join(GPT_PRESETS)}")
    top_k: int = option(100, "top-k sampling")
    rows: Optional[tuple[str, ...]] = option(None, "run only these rows (default: all)", nargs="+", choices=SUITE_ROWS, metavar="ROW")
    trainer_steps: int = option(50, "steps of the real trainer (training_vqgan.py) on generated JPEG files")
    trainer_compile: bool = option(True, "the real trainer with --compile")
    profile: bool = option(False, "also profile each row: its top kernels (or CPU ops); on a GPU also its idle share, the top host-side events and the lines where the host waited for it")

    def __post_init__(self):
        super().__post_init__()
        require(self, dict(top_k=1, trainer_steps=3, large_batch=1))


COMMANDS = {"stage1": (Stage1Bench, "one VQGAN training step: generator and discriminator, GAN and LPIPS active", (VQGANConfig,)),
            "gpt": (GPTBench, "one GPT training step on cached tokens", (VQGANConfig, GPTConfig)),
            "sample": (SampleBench, "sampling a full token grid per image, with and without the key/value cache",
                       (VQGANConfig, GPTConfig)),
            "suite": (SuiteBench, "every row of the README's GPU table, one JSON line each: stage 1 eager and compiled, "
                      "the GPT eager and compiled, sampling (uncached, cached, captured), at --batch-size (16) and "
                      "the GPT and sampling also at --large-batch (64), and the real trainer", (VQGANConfig, GPTConfig))}


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
def bench_stage1(args: BenchConfig, device: torch.device, timing: Optional[Callable] = None) -> dict:
    from training_vqgan import build_stage1, train_step

    cfg = make_config(TrainVQGANConfig, VQGANConfig, {"preset": args.preset, **model_flags(args, VQGANConfig),
                                                      "batch_size": args.batch_size, "precision": args.precision,
                                                      "compile": args.compile, "compile_mode": args.compile_mode,
                                                      "disc_start": 0,
                                                      "disc_joint_batch": args.disc_joint_batch,
                                                      "memory_format": args.memory_format},
                      PRESETS)
    mc = cfg.model
    torch.manual_seed(0)
    s = build_stage1(cfg, device, LPIPS(), total_steps=10 ** 6)  # random VGG16: the same compute as the real one
    s.model.train()
    s.disc.train()
    x = (torch.rand(args.batch_size, mc.in_channels, mc.resolution, mc.resolution, device=device) * 2 - 1)
    result = {"command": "stage1", "preset": args.preset, "batch_size": args.batch_size, "image_size": mc.resolution,
              "n_embed": mc.n_embed, "parameters_m": sum(p.numel() for p in s.model.parameters()) / 1e6,
              "channels_last": s.channels_last}
    measure_ = timing or measure  # benchmark.measure, or what the suite's profiler takes
    m = measure_(lambda: train_step(s, x, step=0), device, args.steps, args.warmup)
    result.update(step_ms=m["median_ms"], images_per_s=args.batch_size * 1000 / m["median_ms"],
                  peak_memory_gib=m["peak_memory_gib"])
    if args.compare:
        torch.manual_seed(0)
        ref = build_stage1(dataclasses.replace(cfg, compile=False, compile_mode="default"), device, LPIPS(),
                           total_steps=10 ** 6)
        ref.model.train()
        ref.disc.train()
        step = lambda: reference_step(ref.model, ref.disc, ref.perceptual, ref.opt_g, ref.opt_d, x,  # noqa: E731
                                      LossWeights.of(cfg), lambda: autocast(device, ref.amp_dtype))
        r = measure_(step, device, args.steps, args.warmup)
        result.update(reference_step_ms=r["median_ms"], reference_images_per_s=args.batch_size * 1000 / r["median_ms"],
                      reference_peak_memory_gib=r["peak_memory_gib"], speedup=r["median_ms"] / m["median_ms"])
    return result


# ------------------------------------------------------------------------------------ stage 2
def build_transformer(args: BenchConfig, device: torch.device):
    from transformer import VQGANTransformer, gpt_shape

    tcfg = make_config(TrainTransformerConfig, GPTConfig, {"preset": args.gpt_preset, **model_flags(args, GPTConfig),
                                                           "batch_size": args.batch_size, "precision": args.precision,
                                                           "compile": args.compile,
                                                           "compile_mode": args.compile_mode}, GPT_PRESETS)
    vcfg = make_config(TrainVQGANConfig, VQGANConfig, {"preset": args.preset, **model_flags(args, VQGANConfig)},
                       PRESETS).model
    torch.manual_seed(0)
    gpt_cfg = dataclasses.replace(tcfg.model, **gpt_shape(vcfg, 0))
    model = VQGANTransformer(VQGAN(vcfg), gpt_cfg).to(device)
    return tcfg, vcfg, model


def bench_gpt(args: GPTBench, device: torch.device, timing: Optional[Callable] = None) -> dict:
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
    measure_ = timing or measure
    m = measure_(lambda: train_step(s, [tokens], 0), device, args.steps, args.warmup)
    result.update(step_ms=m["median_ms"], tokens_per_s=per_step * 1000 / m["median_ms"],
                  peak_memory_gib=m["peak_memory_gib"])
    if args.compare:
        with sdpa_kernel(SDPBackend.MATH):  # attention by the explicit formula
            r = measure_(lambda: train_step(s, [tokens], 0), device, args.steps, args.warmup)
        result.update(reference_step_ms=r["median_ms"], reference_tokens_per_s=per_step * 1000 / r["median_ms"],
                      speedup=r["median_ms"] / m["median_ms"])
    return result


def bench_sample(args: SampleBench, device: torch.device, timing: Optional[Callable] = None) -> dict:
    tcfg, vcfg, model = build_transformer(args, device)
    model.eval()
    amp_dtype = resolve_precision(tcfg.precision, device)
    h = vcfg.latent_size
    result = {"command": "sample", "preset": args.preset, "gpt_preset": args.gpt_preset, "batch_size": args.batch_size,
              "tokens_per_image": h * h, "top_k": args.top_k}
    indices = None
    variants = {"cached": dict(use_cache=True, cuda_graph=False), "uncached": dict(use_cache=False)}
    if device.type == "cuda":  # the cached loop replayed as one CUDA graph per token
        variants = {"captured": dict(use_cache=True, cuda_graph=True), **variants}
    if args.compile:  # the token step compiled (and captured on CUDA): first, so that --profile looks at it
        variants = {"compiled": dict(use_cache=True, cuda_graph=device.type == "cuda", compile=True), **variants}
    for key, options in variants.items():
        def run():
            nonlocal indices
            with torch.no_grad(), autocast(device, amp_dtype):
                indices = model.sample(args.batch_size, top_k=args.top_k, **options)
        m = (timing or measure)(run, device, args.steps, args.warmup)
        result.update({f"{key}_s": m["median_ms"] / 1000, f"{key}_images_per_s": args.batch_size * 1000 / m["median_ms"],
                       f"{key}_peak_memory_gib": m["peak_memory_gib"]})

    def decode():
        with torch.no_grad(), autocast(device, amp_dtype):
            model.indices_to_images(indices)
    d = (timing or measure)(decode, device, args.steps, args.warmup)
    result.update(decode_s=d["median_ms"] / 1000)
    return result


# ------------------------------------------------------------------------------------ the suite
def host_syncs(fn: Callable, device: torch.device) -> Optional[dict]:
    """On CUDA, the places in one call of fn where the host waited for the GPU, as PyTorch's sync
    debug mode reports them (a warning per synchronizing call: .item(), a copy from pageable
    memory, nonzero, ...), counted per Python file and line; None elsewhere."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites = Counter(f"{os.path.basename(w.filename)}:{w.lineno}" for w in caught
                    if "synchronizing" in str(w.message))
    return dict(sites.most_common())


def profiled(fn: Callable, device: torch.device, steps: int = 3) -> dict:
    """The top 10 kernels (CUDA) or operators (CPU) by their own time over `steps` calls; on CUDA
    also the share of the profiled wall time in which no kernel ran, the top 10 host-side events
    (operators, CUDA runtime calls such as kernel launches, named ranges such as a compiled graph's
    call) by their own time, and the places where one call made the host wait for the GPU
    (host_syncs)."""
    from torch.profiler import ProfilerActivity, profile

    from torch.autograd import DeviceType

    cuda = device.type == "cuda"
    fn()  # compilation and autotuning stay out of the profile (a sampling call captures its graph anew each time)
    syncs = host_syncs(fn, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        if cuda:
            torch.cuda.synchronize()
    wall_us = (time.perf_counter() - start) * 1e6
    # CUDA: the kernels themselves (an operator's device time is its kernels', which would count
    # twice); CPU: the operators
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    averages = prof.key_averages()
    events = [e for e in averages if e.device_type == kind and not e.is_user_annotation]
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    top = [{"name": e.key[:120], "ms_per_call": getattr(e, key) / 1000 / steps, "calls": e.count // steps}
           for e in events[:10]]
    extra = {}
    if cuda:  # where the host's time goes: with the GPU idle, these set the pace. Named ranges count too:
        # the own time of a compiled graph's call or of an optimizer step is the Python around their kernels
        host = [e for e in averages if e.device_type == DeviceType.CPU]
        host.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
        extra = {"host_top": [{"name": e.key[:120], "ms_per_call": e.self_cpu_time_total / 1000 / steps,
                               "calls": e.count // steps} for e in host[:10]],
                 "host_syncs_per_call": sum(syncs.values()), "host_sync_sites": syncs}
    total_us = sum(getattr(e, key) for e in events)
    idle = None
    if cuda:  # kernel time summed over the window (overlapping streams would count twice: a lower bound)
        idle = max(0.0, 1 - total_us / wall_us)
    # all kernels' (operators') own time and their number per call: against the unprofiled step time, they
    # say whether the device or the host sets the pace
    return {"top": top, "gpu_idle_share": idle, "busy_ms_per_call": total_us / 1000 / steps,
            "launches_per_call": sum(e.count for e in events) / steps, "profiled_wall_ms_per_call": wall_us / 1000 / steps,
            **extra}


def write_jpegs(folder: str, n: int, size: int, seed: int = 0) -> None:
    """n smooth random colour images as JPEG files: real decoding work for the trainer's loader."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        low = torch.rand(3, 8, 8, generator=g)
        image = torch.nn.functional.interpolate(low[None], size=(size, size), mode="bicubic", align_corners=False)[0]
        image = (image.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        Image.fromarray(image).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def bench_trainer(args: SuiteBench, device: torch.device) -> dict:
    """training_vqgan.py itself (--compile unless --no-trainer-compile, default data loading, LPIPS with random
    weights from a file) for --trainer-steps steps on generated JPEGs; the rate is the median of what it
    logged every 10 steps after the first 10 (warm-up, compilation; in a shorter run, what it logged).
    No validation split: validation is not what this row times (it runs eagerly, like the sample grid
    at the last step: ema.evaluated_with)."""
    import training_vqgan
    from runconfig import parse_train_vqgan

    mc = make_config(TrainVQGANConfig, VQGANConfig, {"preset": args.preset, **model_flags(args, VQGANConfig)},
                     PRESETS).model
    with tempfile.TemporaryDirectory() as tmp:
        data, run = os.path.join(tmp, "images"), os.path.join(tmp, "run")
        os.makedirs(data)
        write_jpegs(data, 8 * args.batch_size, mc.resolution + mc.resolution // 4)
        torch.save(LPIPS().state_dict(), os.path.join(tmp, "vgg16.pth"))  # random, in LPIPS's layout
        argv = ["--dataset-path", data, "--output-dir", run, "--preset", args.preset, "--batch-size", str(args.batch_size),
                "--max-steps", str(args.trainer_steps), "--disc-start", "0", "--log-every", "10", "--save-every",
                str(10 ** 6), "--sample-every", str(10 ** 6), "--val-fraction", "0",
                "--vgg-weights", os.path.join(tmp, "vgg16.pth"), "--device", str(device), "--precision", args.precision,
                *(["--compile", "--compile-mode", args.compile_mode] if args.trainer_compile else ["--no-compile"]),
                *as_flags(model_flags(args, VQGANConfig))]
        start = time.perf_counter()
        training_vqgan.main(parse_train_vqgan(argv))
        wall = time.perf_counter() - start
        lines = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl")) if "images_per_s" in x]
    rates = [m["images_per_s"] for m in lines if m["step"] > 10] or [m["images_per_s"] for m in lines]
    return {"command": "trainer", "preset": args.preset, "batch_size": args.batch_size, "steps": args.trainer_steps,
            "images_per_s": statistics.median(rates) if rates else None, "wall_s": wall, "compile": args.trainer_compile}


def as_flags(values: dict) -> list[str]:
    """Field values as the command-line flags that give them."""
    flags = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            flags += [flag, *map(str, value)]
        else:
            flags += [flag, str(value)]
    return flags


def suite_rows(args: SuiteBench) -> list[tuple[str, Callable, BenchConfig]]:
    """(row name, bench function, its config) for every row of the suite."""
    common = dict(preset=args.preset, device=args.device, precision=args.precision, model=args.model)
    gpt = dict(common, gpt_preset=args.gpt_preset)
    small, large = args.batch_size, args.large_batch
    compiled = dict(compile=True, compile_mode=args.compile_mode)  # --compile-mode applies to the compiled rows
    return [("stage1", bench_stage1, Stage1Bench(batch_size=small, **common)),
            ("stage1-compiled", bench_stage1, Stage1Bench(batch_size=small, **compiled, **common)),
            ("gpt", bench_gpt, GPTBench(batch_size=small, command="gpt", **gpt)),
            ("gpt-compiled", bench_gpt, GPTBench(batch_size=small, command="gpt", **compiled, **gpt)),
            ("gpt-large", bench_gpt, GPTBench(batch_size=large, command="gpt", **gpt)),
            ("gpt-large-compiled", bench_gpt, GPTBench(batch_size=large, command="gpt", **compiled, **gpt)),
            ("sample", bench_sample, SampleBench(batch_size=small, top_k=args.top_k, compile=True, command="sample", **gpt)),
            ("sample-large", bench_sample, SampleBench(batch_size=large, top_k=args.top_k, compile=True, command="sample",
                                                       **gpt)),
            ("trainer", bench_trainer, args)]


def bench_suite(args: SuiteBench, device: torch.device) -> dict:
    """Each row in turn, its JSON line written as soon as it is measured (a later failure keeps
    the rows before it); a row that fails is written with its error and the suite goes on."""
    done = []
    with open(args.out, "w") as out:
        for name, bench, cfg in suite_rows(args):
            if args.rows and name not in args.rows:
                continue
            start = time.perf_counter()
            # each row compiles as a fresh process would: without a reset, a compiled row at the large batch
            # would recompile the small batch's graph with the batch size symbolic (dynamo's automatic dynamic
            # shapes), and time other kernels than training at that batch size compiles
            torch._dynamo.reset()
            try:
                if name.startswith("sample"):  # a whole token grid per step
                    cfg = dataclasses.replace(cfg, steps=min(args.steps, 3), warmup=min(args.warmup, 1))
                elif name != "trainer":
                    cfg = dataclasses.replace(cfg, steps=args.steps, warmup=args.warmup)
                row = {"row": name, **bench(cfg, device)}
            except Exception as e:  # noqa: BLE001 - one broken row must not cost the others
                row = {"row": name, "error": error_line(e)}
            if args.profile and name != "trainer" and "error" not in row:
                try:
                    row["profile"] = profile_row(bench, cfg, device)
                except Exception as e:  # noqa: BLE001 - nor a broken profile the row's measurement
                    row["profile"] = {"error": error_line(e)}
            row["row_wall_s"] = time.perf_counter() - start
            out.write(json.dumps(row) + "\n")
            out.flush()
            log(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items() if k != "profile"}))
            done.append(name)
    return {"command": "suite", "rows": done, "out": args.out}


def error_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def profile_row(bench: Callable, cfg: BenchConfig, device: torch.device) -> dict:
    """profiled() of the first function a row times (its own freshly built models)."""
    first: list = []

    def take(fn, device_, steps, warmup):  # builds the row, keeps its step function, times nothing
        first.append(fn)
        return {"median_ms": 1.0, "peak_memory_gib": None}
    bench(cfg, device, timing=take)
    return profiled(first[0], device, steps=1 if cfg.command == "sample" else 3)


def main(args: BenchConfig) -> dict:
    device = resolve_device(args.device)
    if args.json:
        writable_file(args.json, "--json")  # before the timing, not after it
    for name in ("preset",) + (("gpt_preset",) if args.command != "stage1" else ()):
        presets = PRESETS if name == "preset" else GPT_PRESETS
        if getattr(args, name) not in presets:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} is unknown: choose one of "
                            f"{', '.join(presets)}.")
    if args.command == "suite":
        if args.json or args.compile:
            raise UserError("suite writes its rows to --out and sets --compile per row: drop --json and --compile.")
        writable_file(args.out, "--out")
        return bench_suite(args, device)
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
