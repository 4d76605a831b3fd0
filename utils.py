"""Everything around the models except image data (data.py): processes and the command-line
error wrapper, device and precision, random-number state, checkpoint I/O, the training-loop
helpers, run folders and metrics, sample grids, PSNR and the learning-rate schedule.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import pickle
import random
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from config import UserError

# ----------------------------------------------------------------------------------- processes
def is_main_process() -> bool:
    """Rank 0 (or not distributed): the only process that prints, logs and writes files."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a torchrun job (rank 0 of 1 when not distributed)."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_name: str) -> tuple[torch.device, DistInfo]:
    """The device and, under torchrun (WORLD_SIZE > 1 in the environment), the initialized
    process group: NCCL with one GPU per process (cuda:LOCAL_RANK), gloo on the CPU. A plain
    `python script.py` run is not distributed and is unchanged."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world <= 1:
        return device, DistInfo()
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices: start at most "
                            "that many processes per node (--nproc_per_node).")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, DistInfo(rank, local, world)


def cleanup_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def global_batch(cfg, dist_info: DistInfo) -> int:
    """Samples per optimizer step over all processes: --batch-size x processes x --grad-accum."""
    return cfg.batch_size * dist_info.world_size * cfg.grad_accum


def scaled_lr(cfg, dist_info: DistInfo) -> float:
    """--learning-rate, times the global batch with --scale-lr (the reference's rule)."""
    return cfg.learning_rate * global_batch(cfg, dist_info) if cfg.scale_lr else cfg.learning_rate


def describe_batch(cfg, dist_info: DistInfo) -> str:
    """The start-of-run line on processes, global batch and the learning-rate rule."""
    g, lr = global_batch(cfg, dist_info), scaled_lr(cfg, dist_info)
    rule = (f"{lr:.3g} = {cfg.learning_rate:.3g} x global batch {g} (--scale-lr)" if cfg.scale_lr
            else f"{lr:.3g} (not scaled with the batch; --scale-lr multiplies it by {g})")
    return (f"{dist_info.world_size} process(es); global batch {g} = {cfg.batch_size} per process x "
            f"{dist_info.world_size} x {cfg.grad_accum} accumulated; learning rate {rule}")


@torch.no_grad()
def replicas_identical(module: torch.nn.Module, buffers: bool = True) -> bool:
    """Whether every process holds exactly rank 0's parameters (and buffers) (True when not
    distributed). BatchNorm running statistics are local under DDP (rank 0's are broadcast at
    each forward and saved), so pass buffers=False for a module with BatchNorm."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return True
    tensors = list(module.parameters()) + (list(module.buffers()) if buffers else [])
    flat = torch.cat([t.detach().float().flatten() for t in tensors])
    reference = flat.clone()
    dist.broadcast(reference, 0)
    same = torch.tensor([float(torch.equal(flat, reference))], device=flat.device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item())


def log(*args) -> None:
    if is_main_process():
        print(*args, flush=True)


def warn(msg: str) -> None:
    if is_main_process():
        print(f"warning: {msg}", file=sys.stderr, flush=True)


def run_cli(main: Callable, parse: Callable, argv: Optional[Sequence[str]] = None) -> int:
    """Parse flags (argv, default sys.argv[1:]) and run; the exit code: 0, or 2 after a UserError,
    printed as one paragraph on stderr. argparse's own errors exit 2 through SystemExit."""
    try:
        main(parse(None if argv is None else list(argv)))
        return 0
    except UserError as e:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        where = f" (rank {os.environ.get('RANK', '0')} of {world})" if world > 1 else ""
        print(f"error{where}: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        cleanup_distributed()


class StopRequest:
    """SIGINT and SIGTERM ask the training loop to finish its current step, save and exit 0
    instead of dying mid-step; a second SIGINT stops at once. Under torchrun every process
    stops at the same step (the request is all-reduced once per step)."""

    def __init__(self, device: torch.device):
        self.device, self.signal, self._previous, self._pid = device, None, {}, os.getpid()
        import threading

        if threading.current_thread() is threading.main_thread():  # handlers can only go there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a data-loading worker forked with the handler: the main process decides
            return
        if self.signal is not None and signum == signal.SIGINT:
            self.restore()
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        if is_main_process():  # os.write: print() inside a signal handler can fail if it interrupted a print
            os.write(sys.stdout.fileno(), (f"\n{self.signal} received: finishing the current step, then saving a "
                                           "checkpoint" + (" (Ctrl-C again stops at once)" if signum == signal.SIGINT
                                                           else "") + "\n").encode())

    def requested(self) -> bool:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            flag = torch.tensor([float(self.signal is not None)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item())
        return self.signal is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def check_bad_fraction(n_bad: int, n_total: int, max_bad_fraction: float, where) -> None:
    """A UserError when more than max_bad_fraction of the image files could not be used."""
    if n_total and n_bad / n_total > max_bad_fraction:
        raise UserError(f"{n_bad} of {n_total} image files could not be used ({100 * n_bad / n_total:.1f}%, more than "
                        f"--max-bad-fraction {max_bad_fraction:g}); they are listed in {where}. Fix or remove them, "
                        "or raise --max-bad-fraction.")


class TrainingGuard:
    """What both training loops check after every step: runs of skipped non-finite steps
    (--max-bad-steps), the share of image files that failed to decode (--max-bad-fraction,
    from the run's skip log) and SIGINT/SIGTERM (StopRequest). Each stop saves a checkpoint
    first. A context manager: the signal handlers are restored on leaving it."""

    def __init__(self, cfg, run: "RunFolder", device: torch.device, skip_log):
        self.cfg, self.run, self.device, self.skip_log = cfg, run, device, skip_log
        self.stop, self.bad_run = StopRequest(device), 0

    def __enter__(self) -> "TrainingGuard":
        return self

    def __exit__(self, *exc) -> None:
        self.stop.restore()

    @property
    def signal(self) -> Optional[str]:
        return self.stop.signal

    def after_step(self, step: int, skipped: bool, checkpoint: Callable[[], dict]) -> None:
        """Raise a UserError (after saving) when too many steps in a row were skipped or too
        many files turned out bad."""
        cfg = self.cfg
        self.bad_run = self.bad_run + 1 if skipped else 0
        if self.bad_run >= cfg.max_bad_steps:
            self.run.save(checkpoint(), step)
            raise UserError(f"training stopped at step {step}: {self.bad_run} steps in a row had non-finite losses or "
                            f"gradients (see the warnings above). {self.run.last} holds the last finite weights. "
                            "Lower --learning-rate, train with --precision fp32 or bf16, or check the data, then "
                            "continue with --resume latest.")
        if step % cfg.log_every == 0 and self.skip_log.scanned:  # files that failed to decode while training
            n_bad = int(all_reduce_max(self.skip_log.count(), self.device))
            if n_bad / self.skip_log.scanned > cfg.max_bad_fraction:
                self.run.save(checkpoint(), step)
                check_bad_fraction(n_bad, self.skip_log.scanned, cfg.max_bad_fraction, self.skip_log.path)

    def save_or_stop(self, step: int, due: bool, checkpoint: Callable[[], dict]) -> bool:
        """Save when due or when a stop signal came (on any process); True to stop, after
        saying how to resume."""
        stop = self.stop.requested()
        if due or stop:
            self.run.save(checkpoint(), step)
        if not stop:
            return False
        log(f"stopped by {self.signal or 'a signal on another process'} at step {step}; checkpoint {self.run.last}.\n"
            f"Resume with: {resume_command()}")
        return True


def resume_command() -> str:
    """The command line of this run with --resume latest (for the message after a stop)."""
    args = list(sys.argv)
    if "--resume" in args:
        i = args.index("--resume")
        del args[i:i + 2]
    args = [a for a in args if not a.startswith("--resume=")]
    return " ".join(shlex.quote(a) for a in ["python", *args, "--resume", "latest"])


def all_reduce_max(value: float, device: torch.device) -> float:
    """The largest of the processes' values (the value itself when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([float(value)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def all_finite(losses: Sequence[torch.Tensor], params: Sequence[torch.Tensor], check_grads: bool = True) -> bool:
    """Whether every loss and (with check_grads) every gradient is finite, on every process.
    One host sync; called once per optimizer step."""
    import torch.distributed as dist

    flags = [torch.isfinite(torch.stack([loss.detach().float() for loss in losses])).all()]
    grads = [p.grad for p in params if p.grad is not None] if check_grads else []
    if grads:
        flags.append(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
    ok = torch.stack(flags).all().float().reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


# ---------------------------------------------------------------------- device and precision
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a torch device: use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but PyTorch sees no CUDA device: use --device cpu, "
                        "or install a CUDA build of PyTorch.")
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


def rng_state() -> dict:
    """Python, NumPy, torch CPU and CUDA generator states as plain values and tensors
    (loadable with weights_only=True)."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def run_rng_state() -> dict:
    """rng_state() of this process and, under torchrun, under "ranks" every process's in rank
    order (a collective: every process calls it), so that each one resumes its own stream."""
    import torch.distributed as dist

    state = rng_state()
    if dist.is_available() and dist.is_initialized():
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, state)
        state = {**state, "ranks": ranks}
    return state


def set_run_rng_state(state: dict) -> None:
    """Restore what run_rng_state saved: this rank's own state when the number of processes is
    the same, else the saving rank 0's."""
    import torch.distributed as dist

    ranks = state.get("ranks")
    if ranks and dist.is_available() and dist.is_initialized() and len(ranks) == dist.get_world_size():
        state = ranks[dist.get_rank()]
    set_rng_state(state)


# ------------------------------------------------------------------------------ checkpoints
def save_checkpoint(obj: dict, path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace: a crash at any
    moment leaves either the old or the new file, never a partial one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class Placeholder:
    """Stands in for a global that a checkpoint names but that is not a tensor rebuilder or a
    plain container (a Lightning callback class, os.system, ...). It is never imported: calling
    it builds another placeholder, and state given to it is kept as inert data."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __call__(self, *args, **kwargs):
        return type(self)(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<placeholder for {type(self).__qualname__}>"


@functools.lru_cache(maxsize=1)
def _allowed_globals() -> dict:
    """What a restricted load may really resolve: tensor and storage rebuilding, dtypes, plain
    containers. Everything else becomes a Placeholder."""
    import collections
    import torch._utils

    allowed = {("collections", "OrderedDict"): collections.OrderedDict,
               ("torch", "Size"): torch.Size, ("torch", "device"): torch.device,
               ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
               ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
               ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
               ("torch.storage", "UntypedStorage"): torch.UntypedStorage}
    for name in dir(torch):
        obj = getattr(torch, name, None)
        if isinstance(obj, torch.dtype) or (name.endswith("Storage") and isinstance(obj, type)):
            allowed[("torch", name)] = obj
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        found = _allowed_globals().get((module, name))
        if found is not None:
            return found
        return type(f"{module}.{name}", (Placeholder,), {})  # a new inert class, nothing imported


class _RestrictedPickleModule:
    """The `pickle_module` torch.load is given for files it cannot load weights-only."""
    Unpickler = _RestrictedUnpickler
    __name__ = "restricted_pickle"

    @staticmethod
    def load(file, **kwargs):
        return _RestrictedUnpickler(file, **kwargs).load()


def load_untrusted(path, map_location="cpu"):
    """Load a pickled checkpoint that references classes we do not have (Lightning's), without
    importing or calling any of them: tensors and plain containers are rebuilt, every other
    global becomes an inert Placeholder."""
    return torch.load(path, map_location=map_location, pickle_module=_RestrictedPickleModule, weights_only=False)


def load_checkpoint(path, map_location="cpu") -> dict:
    """The one way this project reads a checkpoint, whoever wrote it: weights-only loading, and
    for files that reference other classes (the reference's Lightning checkpoints) the restricted
    loader above. Neither ever runs code from the file."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist: check the path.")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:  # names globals weights-only loading refuses
        try:
            obj = load_untrusted(path, map_location)
        except Exception as e:
            raise UserError(f"{path} cannot be read as a checkpoint ({type(e).__name__}: {e}).") from None
    except Exception as e:
        raise UserError(f"{path} cannot be read as a checkpoint ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}).") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict.")
    return obj


# ---------------------------------------------------------------------------- training loop
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


# ------------------------------------------------------------------------- run folders, logs
class RunFolder:
    """config.json, checkpoints/last.pt + numbered snapshots, samples/, metrics.jsonl and
    optional TensorBoard events. Only rank 0 writes."""

    def __init__(self, root: str, config: dict, tensorboard: bool = False, keep: int = 3):
        self.root, self.keep = Path(root), keep
        self.ckpt_dir, self.sample_dir = self.root / "checkpoints", self.root / "samples"
        self.tb = None
        if not is_main_process():
            return
        try:
            for d in (self.ckpt_dir, self.sample_dir):
                d.mkdir(parents=True, exist_ok=True)
            (self.root / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        except OSError as e:
            raise UserError(f"cannot write to the output folder {self.root} ({e.strerror}): "
                            "choose a writable --output-dir.") from None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.root / "tensorboard"))
            except ImportError:
                warn("--tensorboard needs the tensorboard package (pip install tensorboard); logging to metrics.jsonl only.")

    @staticmethod
    def last_checkpoint(root) -> Path:
        return Path(root) / "checkpoints" / "last.pt"

    @classmethod
    def resume_path(cls, root, resume: Optional[str]) -> Optional[str]:
        """The checkpoint to resume from ('latest': the folder's last.pt). A new run may not
        overwrite a folder that already holds a checkpoint."""
        last = cls.last_checkpoint(root)
        if resume is None and last.exists():
            raise UserError(f"{last} already exists: continue that run with --resume latest, or start a new one "
                            "with another --output-dir.")
        return str(last) if resume == "latest" else resume

    @property
    def last(self) -> Path:
        return self.last_checkpoint(self.root)

    def log_metrics(self, step: int, metrics: dict) -> None:
        if not is_main_process():
            return
        with open(self.root / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def save(self, checkpoint: dict, step: int) -> None:
        """Write last.pt atomically and keep it as snapshot step_XXXXXXX.pt (a hard link, so no
        second write); only the newest `keep` snapshots stay."""
        if not is_main_process():
            return
        save_checkpoint(checkpoint, self.last)
        snap = self.ckpt_dir / f"step_{step:07d}.pt"
        if self.keep > 0:
            if snap.exists():
                snap.unlink()
            try:
                os.link(self.last, snap)
            except OSError:
                save_checkpoint(checkpoint, snap)
        for old in sorted(self.ckpt_dir.glob("step_*.pt"))[:-self.keep or None]:
            old.unlink()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


@torch.no_grad()
def save_sample_grid(rows: Sequence[torch.Tensor], path) -> None:
    """Save images in [-1, 1] as a grid, one row per tensor (e.g. inputs above reconstructions)."""
    from torchvision.utils import save_image

    images = torch.cat([r.detach().float().cpu() for r in rows])
    save_image((images.clamp(-1, 1) + 1) / 2, str(path), nrow=rows[0].shape[0], padding=2)


def lr_at(step: int, base_lr: float, warmup_steps: int = 0, total_steps: Optional[int] = None,
          schedule: str = "constant", min_ratio: float = 0.1) -> float:
    """Linear warmup, then constant or cosine decay to min_ratio * base_lr at total_steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "cosine" and total_steps:
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))
    return base_lr
