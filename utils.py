"""The training-loop helpers both scripts use: printing on rank 0 and the command-line wrapper,
device and precision, the batch and learning-rate rules, meters, signals and the other reasons
to stop, and the loop skeleton itself (train_loop: log, sample and save cadence around a script's
own train_step). The run folder the loop writes to is runfolder.py.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from distributed import (DistInfo, all_finite, all_reduce_max, barrier, cleanup_distributed, is_distributed,
                         is_main_process, replicas_identical)
from errors import EnvironmentFault, UserError


# --------------------------------------------------------------------------- printing, CLI
def log(*args) -> None:
    if is_main_process():
        print(*args, flush=True)


def warn(msg: str) -> None:
    if is_main_process():
        print(f"warning: {msg}", file=sys.stderr, flush=True)


def run_cli(main: Callable, parse: Callable, argv: Optional[Sequence[str]] = None) -> int:
    """Parse flags (argv, default sys.argv[1:]) and run; the exit code: 0; 2 after a UserError
    (also argparse's own errors); 1 after an EnvironmentFault (disk full, read-only output); 130
    after Ctrl-C outside the training loop. Each is one `error: ...` paragraph on stderr, naming
    the rank under torchrun, never a traceback. Under torchrun the process ends here (see
    end_torchrun_process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    where = f" (rank {os.environ.get('RANK', '0')} of {world})" if world > 1 else ""
    code = None
    try:
        main(parse(None if argv is None else list(argv)))
        barrier()  # under torchrun: every process is done before any tears the process group down
        code = 0
    except UserError as e:
        print(f"error{where}: {e}", file=sys.stderr, flush=True)
        code = 2
    except EnvironmentFault as e:
        print(f"error{where}: {e}", file=sys.stderr, flush=True)
        code = 1
    except KeyboardInterrupt:
        print(f"\ninterrupted{where} (Ctrl-C) before the work was done.", file=sys.stderr, flush=True)
        code = 130
    finally:
        distributed = is_distributed()
        cleanup_distributed()
        if distributed and code is not None:
            end_torchrun_process(code)
    return code


def end_torchrun_process(code: int) -> None:
    """Exit a torchrun process now, without the interpreter's shutdown. The gloo process group
    outlives destroy_process_group once a DistributedDataParallel module was built (PyTorch keeps
    a reference), so its worker threads still run; one that drops its last hold on a collective's
    tensor while the interpreter shuts down needs the GIL there and aborts the process ("terminate
    called without an active exception", exit -6, about one job in 50 on a loaded 2-core machine).
    The run's files are closed by now (each is written inside a with-block, the run folder's lock
    by main's), so nothing the shutdown would do is lost."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ------------------------------------------------------------------ device, precision, batch
def resolve_device(name: str) -> torch.device:
    """--device as a torch device this machine has: auto, cpu, cuda or cuda:N (N below the number
    of GPUs), or mps where PyTorch sees Apple's GPU; anything else is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a torch device: use cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} was asked for but PyTorch sees no CUDA device: use --device cpu, "
                            "or install a CUDA build of PyTorch.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}.")
    elif device.type == "mps":
        if not (torch.backends.mps.is_available()):
            raise UserError(f"--device {name}: PyTorch sees no Apple GPU (MPS) here: use --device cpu or cuda.")
    elif device.type != "cpu":
        raise UserError(f"--device {name} is not a device this project computes on: use cpu, cuda, cuda:N or mps.")
    return device


def resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for plain float32."""
    if precision == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def global_batch(cfg, dist_info: DistInfo) -> int:
    """Samples per optimizer step over all processes: --batch-size x processes x --grad-accum."""
    return cfg.batch_size * dist_info.world_size * cfg.grad_accum


def scaled_lr(cfg, dist_info: DistInfo) -> float:
    """--learning-rate, times the global batch with --scale-lr (the reference's rule)."""
    return cfg.learning_rate * global_batch(cfg, dist_info) if cfg.scale_lr else cfg.learning_rate


def writable_folder(path, flag: str) -> Path:
    """Create the folder `path` if needed and prove a file can be written in it (then removed),
    before any work whose results would go there: a UserError naming `flag` otherwise."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to {folder} ({e.strerror or e}): choose a writable {flag}.") from None
    return folder


def writable_file(path, flag: str) -> Path:
    """The same for a file to be written later: its folder must take files, and it must not be a folder."""
    file = Path(path)
    if file.is_dir():
        raise UserError(f"{flag} {file} is a folder: give a file name.")
    writable_folder(file.parent if str(file.parent) else ".", flag)
    return file


def check_global_batch(cfg, dist_info: DistInfo, n_train: int) -> None:
    """A UserError when one optimizer step needs more images than the training set holds."""
    if n_train < global_batch(cfg, dist_info):
        raise UserError(f"the global batch ({cfg.batch_size} x {dist_info.world_size} processes x {cfg.grad_accum} "
                        f"accumulated) is larger than the {n_train} training images: lower --batch-size or "
                        "--grad-accum, or add images.")


def run_length(cfg, n_train: int, dist_info: DistInfo) -> tuple[int, int]:
    """(optimizer steps per epoch, the run's last step): --epochs passes over this process's
    share of the data, or --max-steps when that comes first."""
    per_epoch = (n_train // dist_info.world_size) // (cfg.batch_size * cfg.grad_accum)
    total = cfg.epochs * per_epoch
    return per_epoch, total if cfg.max_steps is None else min(cfg.max_steps, total)


def describe_batch(cfg, dist_info: DistInfo) -> str:
    """The start-of-run line on processes, global batch and the learning-rate rule."""
    g, lr = global_batch(cfg, dist_info), scaled_lr(cfg, dist_info)
    rule = (f"{lr:.3g} = {cfg.learning_rate:.3g} x global batch {g} (--scale-lr)" if cfg.scale_lr
            else f"{lr:.3g} (not scaled with the batch; --scale-lr multiplies it by {g})")
    return (f"{dist_info.world_size} process(es); global batch {g} = {cfg.batch_size} per process x "
            f"{dist_info.world_size} x {cfg.grad_accum} accumulated; learning rate {rule}")


def lr_at(step: int, base_lr: float, warmup_steps: int = 0, total_steps: Optional[int] = None,
          schedule: str = "constant", min_ratio: float = 0.1) -> float:
    """Linear warmup, then constant or cosine decay to min_ratio * base_lr at total_steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "cosine" and total_steps:
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))
    return base_lr


# ----------------------------------------------------------------------- optimizer step
def optimizer_step(opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, losses: Sequence[torch.Tensor],
                   allowed: Optional[torch.Tensor] = None,
                   clip: float = 0.0) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Step `opt` unless a loss or a gradient is non-finite on any process or `allowed` (a 0-dim
    bool tensor) is False; a skipped step changes nothing, not even Adam's moments or step counts.
    With clip > 0 the norm of the gradients of the optimizer's parameters is clipped to it first.
    Returns (stepped: a 0-dim bool tensor, the norm before clipping or None).

    Nothing here waits for the device: the decision reaches the fused optimizer as its found_inf
    tensor. Under fp16 the gradients are unscaled first (GradScaler.unscale_, which records on
    the device whether they overflowed), so the same check sees them, and GradScaler.update backs
    the scale off after an overflow, or grows it, on the device too."""
    # the optimizer's own list: a module's parameters() walks every submodule (about 1 ms of the
    # 12 ms of host work of a compiled 24-layer GPT step, measured on a CPU)
    params = [p for group in opt.param_groups for p in group["params"]]
    if not all(group.get("fused") for group in opt.param_groups):
        raise ValueError("optimizer_step needs a fused optimizer (it passes the skip decision as found_inf)")
    if scaler.is_enabled():
        scaler.unscale_(opt)
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch._foreach_norm(grads) if grads else []  # once, for the check and the clipping
    ok = all_finite(losses, norms)
    ok = ok if allowed is None else ok & allowed
    norm = None
    if clip > 0:  # clip_grad_norm_ from these norms (its total norm: the norm of theirs)
        norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
        torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
    opt.found_inf = (~ok).float()  # read by the fused kernel: 1 leaves every tensor of the step alone
    opt.step()
    if scaler.is_enabled():
        scaler.update()
    return ok, norm


# ------------------------------------------------------------------- run folder, meters
class MeanMeter:
    """Averages 0-dim tensors over a log interval (one host sync per interval) and times it."""

    def __init__(self):
        self.sums, self.count, self.t0 = {}, 0, time.perf_counter()

    def add(self, logs: dict) -> None:
        for k, v in logs.items():
            v = v.detach()
            self.sums[k] = self.sums.get(k, 0.0) + v.to(torch.promote_types(v.dtype, torch.float32))
        self.count += 1

    def means(self) -> dict:
        """Means so far as 0-dim tensors (no host sync), without resetting."""
        return {k: v / self.count for k, v in self.sums.items()}

    def flush(self) -> dict:
        """Means of the interval, plus step_time (seconds per step)."""
        dt = time.perf_counter() - self.t0
        out = {k: v.item() / self.count for k, v in self.sums.items()}
        out["step_time"] = dt / max(1, self.count)
        self.sums, self.count, self.t0 = {}, 0, time.perf_counter()
        return out


# ---------------------------------------------------------------------------- stopping
class StopRequest:
    """SIGINT and SIGTERM ask the run to stop at the end of the current step (or, before training
    begins, before it), save and exit 0 instead of dying mid-step; a second SIGINT stops at once.
    Installed at the start of a script's main, so a signal during start-up or the first
    validation is handled too. Under torchrun every process stops at the same step (the request
    is all-reduced once per step). A context manager: leaving it restores the previous handlers."""

    def __init__(self):
        self.signal, self._previous, self._pid = None, {}, os.getpid()

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # handlers can only go there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a data-loading worker forked with the handler: the main process decides
            return
        if self.signal is not None and signum == signal.SIGINT:
            self.restore()
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        if is_main_process():  # os.write: print() inside a signal handler can fail if it interrupted a print
            message = (f"\n{self.signal} received: stopping after the current step, with a checkpoint"
                       + (" (Ctrl-C again stops at once)" if signum == signal.SIGINT else "") + "\n")
            try:
                os.write(sys.stdout.fileno(), message.encode())
            except (OSError, ValueError, AttributeError):  # stdout is no file (captured): say nothing here
                pass

    def requested(self) -> bool:
        """Whether a signal came, on this process or any other (agreed on the host, every step)."""
        return all_reduce_max(float(self.signal is not None)) > 0

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def step_ranges(steps: Sequence[int]) -> str:
    """[3, 4, 5, 9] -> "3-5, 9"."""
    parts: list[list[int]] = []
    for s in steps:
        if parts and s == parts[-1][1] + 1:
            parts[-1][1] = s
        else:
            parts.append([s, s])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in parts)


class TrainingGuard:
    """What both training loops check: runs of skipped non-finite steps (--max-bad-steps), the
    share of image files that failed to decode (--max-bad-fraction, from the run's skip log) and
    SIGINT/SIGTERM (the script's StopRequest). Each stop saves a checkpoint first.

    A step's skip flags stay on the device until the next check (every --log-every steps and at
    the last step), which reads them all at once: the steps themselves never wait for the device.
    A skipped step changed nothing, so a run of them that is noticed a few steps late has lost
    nothing either."""

    def __init__(self, cfg, run, skip_log, stop: StopRequest):
        self.cfg, self.run, self.skip_log = cfg, run, skip_log
        self.stop, self.bad_run = stop, 0
        # (step, skipped, skipped by the discriminator alone or None): 0-dim tensors from the step's logs
        self.pending: list[tuple[int, torch.Tensor, Optional[torch.Tensor]]] = []

    @property
    def signal(self) -> Optional[str]:
        return self.stop.signal

    def after_step(self, step: int, logs: dict, checkpoint: Callable[[], dict], check: bool) -> None:
        """Note the step's skip flags; when `check`, warn about the skipped steps since the last
        check and raise a UserError (after saving) when too many in a row were skipped or too many
        files turned out bad."""
        cfg = self.cfg
        self.pending.append((step, logs["skipped"], logs.get("d_skipped")))
        if not check:
            return
        longest = 0
        for bad in self.report():
            self.bad_run = self.bad_run + 1 if bad else 0
            longest = max(longest, self.bad_run)
        if longest >= cfg.max_bad_steps:
            self.run.save(checkpoint(), step)
            raise UserError(f"training stopped at step {step}: {longest} steps in a row had non-finite losses or "
                            f"gradients (see the warnings above). {self.run.last} holds the last finite weights. "
                            "Lower --learning-rate, train with --precision fp32 or bf16, or check the data, then "
                            "continue with --resume latest.")
        if self.skip_log.scanned:  # files that failed to decode while training
            problem = self.skip_log.too_many(int(all_reduce_max(self.skip_log.count())), cfg.max_bad_fraction)
            if problem:
                self.run.save(checkpoint(), step)
                raise UserError(problem)

    def report(self) -> list[bool]:
        """Read the skip flags noted since the last check (one read-back), warn naming the skipped
        steps, and return whether each step was skipped."""
        if not self.pending:
            return []
        pending, self.pending = self.pending, []
        flags = torch.stack([bad for _, bad, _ in pending]).tolist()
        disc = [(s, d) for s, _, d in pending if d is not None]
        disc_flags = torch.stack([d for _, d in disc]).tolist() if disc else []
        skipped = [s for (s, _, _), bad in zip(pending, flags) if bad]
        disc_only = [s for (s, _), bad in zip(disc, disc_flags) if bad]
        if skipped:
            warn(f"step(s) {step_ranges(skipped)} skipped (no update): non-finite loss or gradients"
                 + (f" (of the discriminator alone at {step_ranges(disc_only)})" if disc_only else "")
                 + "; the logged losses show which.")
        return [bool(bad) for bad in flags]

    def save_or_stop(self, step: int, due: bool, checkpoint: Callable[[], dict]) -> bool:
        """Save when due or when a stop signal came (on any process); True to stop, after
        saying how to resume."""
        stop = self.stop.requested()
        if due or stop:
            self.run.save(checkpoint(), step)
        if not stop:
            return False
        log(f"stopped by {self.signal or 'a signal on another process'} at step {step}; checkpoint {self.run.last}.\n"
            f"Resume with: {resume_command(self.cfg.output_dir)}")
        return True


def resume_command(output_dir: str) -> str:
    """How to continue this run after a stop: its launcher (python, or torchrun with its process
    counts), the script, the run folder and --resume latest. Nothing else is needed: the run's
    configuration comes back from its checkpoint."""
    launcher = ["python"]
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        nodes = int(os.environ.get("WORLD_SIZE", str(per_node))) // per_node
        launcher = ["torchrun", *([f"--nnodes={nodes}"] if nodes > 1 else []), f"--nproc-per-node={per_node}"]
    return " ".join(shlex.quote(a) for a in [*launcher, sys.argv[0], "--output-dir", str(output_dir), "--resume", "latest"])


# ------------------------------------------------------------------------------ the loop
@dataclass
class Hooks:
    """What a training script gives the shared loop: its own step, checkpoint and evaluation."""
    train_step: Callable[[list, int], dict]  # (micro-batches, step) -> logs as 0-dim tensors (no host sync)
    checkpoint: Callable[[int], dict]  # step -> the checkpoint dict
    evaluate: Callable[[int], dict]  # step -> metrics; rank 0 only, every --sample-every steps (writes grids)
    lr: Callable[[int], float]  # the learning rate of a step
    rate: tuple[str, float]  # (metric name, units per step), e.g. ("images_per_s", global batch)
    shown: Sequence[str] = ()  # metrics shown on the progress bar
    replicas: Sequence[tuple[torch.nn.Module, bool]] = field(default_factory=list)  # (module, compare buffers)


def evaluate_guarded(hooks: Hooks, run, step: int) -> bool:
    """hooks.evaluate, whose failure (a sample grid that cannot be drawn or written, a validation
    that breaks) is reported and costs no training: the checkpoint of the step is saved before.
    Metrics that are not numbers are reported, not logged. True when it worked."""
    try:
        metrics = hooks.evaluate(step)
    except Exception as e:  # noqa: BLE001 - whatever it was, the trained steps are safe
        warn(f"evaluation at step {step} failed and was skipped ({type(e).__name__}: {e}); training goes on.")
        return False
    broken = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}
    if broken:
        warn(f"evaluation at step {step} gave {', '.join(f'{k}={v}' for k, v in broken.items())}: not a number, "
             "not logged (are the weights still finite?).")
    if metrics.keys() - broken.keys():
        run.log_metrics(step, {k: v for k, v in metrics.items() if k not in broken})
    return not broken


def interactive() -> bool:
    """Whether progress bars may redraw in place: stdout and stderr (the bar's stream) are both a
    terminal. Otherwise one of them is a log file (a cluster job, `> log.txt`): there each redraw
    would be another line, and the plain log lines belong in it."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def progress_line(step: int, total_steps: int, metrics: dict, shown: Sequence[str], rate: str, eta_s: float) -> str:
    """One plain log line: step, the shown figures, the rate and the time left."""
    figures = " ".join(f"{k} {metrics[k]:.4g}" for k in shown if k in metrics)
    minutes, seconds = divmod(int(round(eta_s)), 60)
    hours, minutes = divmod(minutes, 60)
    eta = f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
    return (f"step {step}/{total_steps} | {figures} | {metrics[rate]:.3g} {rate.replace('_per_s', '/s')} | "
            f"ETA {eta}")


def train_loop(cfg, run, hooks: Hooks, batches: Iterable, step: int, total_steps: int,
               skip_log, stop: StopRequest) -> tuple[int, Optional[str], int]:
    """Optimizer steps from `step` to `total_steps` over `batches` ((epoch, micro-batches) per
    step): metrics every --log-every steps, a checkpoint every --save-every and at the end, then
    evaluation every --sample-every (guarded: its failure costs no trained step), and the
    guard's stops (signals, runs of non-finite steps, bad files). Then, under torchrun, the check
    that every process ends with the same weights. Returns the last step, the signal that
    stopped the run if one did, and the number of evaluations that failed."""
    main = is_main_process()
    if stop.requested():  # a signal during start-up: nothing trained, nothing to save
        log(f"stopped by {stop.signal or 'a signal on another process'} before training began (step {step}); "
            "nothing new was trained or saved.")
        return step, stop.signal or "signal", 0
    bar = tqdm(total=total_steps, initial=step, dynamic_ncols=True, disable=not (main and interactive()))
    meter, guard, failed = MeanMeter(), TrainingGuard(cfg, run, skip_log, stop), 0
    start_step, start_time = step, time.perf_counter()
    try:
        for epoch, micro in batches:
            logs = hooks.train_step(micro, step)
            meter.add(logs)
            step += 1
            bar.update(1)
            last = step == total_steps
            guard.after_step(step, logs, lambda: hooks.checkpoint(step), check=step % cfg.log_every == 0 or last)
            if step % cfg.log_every == 0 or last:
                metrics = meter.flush()
                name, per_step = hooks.rate
                metrics.update(epoch=epoch, lr=hooks.lr(step - 1), **{name: per_step / metrics["step_time"]})
                bar.set_postfix({k: f"{metrics[k]:.3g}" for k in hooks.shown if k in metrics})
                if bar.disable:  # a log file, not a terminal: one plain line instead of redraws
                    eta = (total_steps - step) * (time.perf_counter() - start_time) / (step - start_step)
                    log(progress_line(step, total_steps, metrics, hooks.shown, name, eta))
                run.log_metrics(step, metrics)
            stopping = guard.save_or_stop(step, step % cfg.save_every == 0 or last, lambda: hooks.checkpoint(step))
            if (step % cfg.sample_every == 0 or last) and not stopping:
                if main:  # the other processes wait at the barrier
                    failed += not evaluate_guarded(hooks, run, step)
                barrier()
            if stopping:
                guard.report()  # the skipped steps since the last check are named all the same
                break
    finally:
        bar.close()  # however the loop ends, what is printed next starts on a line of its own
    if is_distributed() and hooks.replicas:
        same = all(replicas_identical(module, buffers=buffers) for module, buffers in hooks.replicas)
        world = torch.distributed.get_world_size()
        (log if same else warn)(f"weights {'identical' if same else 'DIFFER'} on all {world} processes")
    if failed:
        warn(f"{failed} evaluation(s) failed (see above); the checkpoints are complete.")
    return step, guard.signal, failed
