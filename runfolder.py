"""The run folder (OUTPUT_DIR): its lock against a second writer, config.json, checkpoints with
numbered snapshots, metrics.jsonl (and optional TensorBoard events) and sample grids, all
written by rank 0."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import uuid
from pathlib import Path
from typing import Optional, Sequence

import torch

from checkpoint import last_checkpoint, resume_path, save_checkpoint
from config import config_to_dict
from distributed import DistInfo, is_main_process, setup_distributed
from errors import EnvironmentFault, UserError
from utils import StopRequest, resolve_device, warn


class RunLock:
    """OUTPUT_DIR/.lock while a run writes there: the process id and host of the writer. A second
    run into the same folder is refused; the lock of a process that died is taken over, with a
    message. Only rank 0 locks (and writes)."""

    def __init__(self, root):
        self.path, self.owned = Path(root) / ".lock", False

    def holder(self) -> Optional[str]:
        """'process P on HOST' when another live process holds the lock, else None (none, or stale)."""
        try:
            pid, host = self.path.read_text().split()
            pid = int(pid)
        except (OSError, ValueError):
            return None if not self.path.exists() else f"an unknown process (unreadable {self.path})"
        if host != socket.gethostname():
            return f"process {pid} on {host}"  # another machine: cannot tell whether it still runs
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None  # that process is gone
        except PermissionError:
            pass  # alive, another user's
        return None if pid == os.getpid() else f"process {pid} on {host}"

    def check(self) -> None:
        """Refuse to start (before anything is written) when another run writes to the folder."""
        if is_main_process() and (holder := self.holder()):
            raise UserError(f"another run ({holder}) is writing to {self.path.parent}: wait for it to finish, or "
                            f"use another --output-dir. If that run is gone, delete {self.path}.")

    def acquire(self) -> None:
        if not is_main_process():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self.check()  # a live holder: refused
                warn(f"taking over {self.path}: the run that held it is no longer running.")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {socket.gethostname()}\n")
            self.owned = True
            return
        self.check()

    def release(self) -> None:
        if self.owned:
            self.path.unlink(missing_ok=True)
            self.owned = False


def import_wandb():
    """The wandb package, imported only when --wandb asks for it; a clear message when missing."""
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb needs the wandb package: pip install wandb (and wandb login), or drop --wandb.") from None
    return wandb


class RunFolder:
    """config.json, checkpoints/last.pt + numbered snapshots, samples/, metrics.jsonl, and
    optionally TensorBoard events and a Weights & Biases run (metrics and sample grids in both),
    written by rank 0 under the folder's RunLock. A context manager: leaving it closes the event
    file and the W&B run and releases the lock."""

    def __init__(self, root: str, config: dict, tensorboard: bool = False, keep: int = 3, resuming: bool = False,
                 wandb_project: Optional[str] = None):
        self.root, self.keep = Path(root), keep
        self.ckpt_dir, self.sample_dir = self.root / "checkpoints", self.root / "samples"
        self.tb, self.lock, self.saved_step, self._log_failed = None, RunLock(root), None, False
        self.wandb = None
        if not is_main_process():
            return
        wandb = import_wandb() if wandb_project else None  # before anything is written
        try:
            self.lock.acquire()
            if not resuming and self.last.exists():  # another run finished here since this one's start-up checks
                self.lock.release()
                resume_path(self.root, None)  # its UserError
            for d in (self.ckpt_dir, self.sample_dir):
                d.mkdir(parents=True, exist_ok=True)
            (self.root / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        except OSError as e:
            self.lock.release()
            raise UserError(f"cannot write to the output folder {self.root} ({e.strerror}): "
                            "choose a writable --output-dir.") from None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.root / "tensorboard"))
            except ImportError:
                warn("--tensorboard needs the tensorboard package (pip install tensorboard); logging to metrics.jsonl only.")
        if wandb is not None:
            self.wandb = wandb
            self._start_wandb(wandb_project, config)

    @classmethod
    def of(cls, cfg, resuming: bool) -> "RunFolder":
        """The run folder of a training config (either stage's)."""
        return cls(cfg.output_dir, config_to_dict(cfg), cfg.tensorboard, cfg.keep_checkpoints, resuming, cfg.wandb)

    def _start_wandb(self, project: str, config: dict) -> None:
        """A W&B run whose id is kept in the run folder, so a resumed run continues the same one."""
        id_file = self.root / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self.wandb.init(project=project, id=run_id, resume="allow", name=self.root.name, config=config,
                        dir=str(self.root))

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def last(self) -> Path:
        return last_checkpoint(self.root)

    def log_metrics(self, step: int, metrics: dict) -> None:
        """Append a metrics line. A failed write (disk full, read-only) costs no training: it is
        warned about once, and the next checkpoint save tells whether the disk is really gone."""
        if not is_main_process():
            return
        try:
            with open(self.root / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        except OSError as e:
            if not self._log_failed:
                warn(f"cannot append to {self.root / 'metrics.jsonl'} ({e.strerror}); training goes on.")
            self._log_failed = True
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def save_samples(self, rows: Sequence[torch.Tensor], step: int) -> Path:
        """samples/step_XXXXXXX.png (one row per tensor of images in [-1, 1]), also sent to
        TensorBoard and W&B as the image 'samples' of this step."""
        path = self.sample_dir / f"step_{step:07d}.png"
        grid = save_sample_grid(rows, path)
        if self.tb is not None:
            self.tb.add_image("samples", grid, step)
        if self.wandb is not None:
            self.wandb.log({"samples": self.wandb.Image(str(path))}, step=step)
        return path

    def save(self, checkpoint: dict, step: int) -> None:
        """Write last.pt atomically and keep it as snapshot step_XXXXXXX.pt (a hard link, so no
        second write); only the newest `keep` snapshots stay. A write that fails (disk full,
        read-only) ends the run with an EnvironmentFault naming the last checkpoint that was saved."""
        if not is_main_process():
            return
        try:
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
        except OSError as e:
            before = (f"the last checkpoint saved is step {self.saved_step}, {self.last}" if self.saved_step is not None
                      else ("the checkpoint this run resumed from, " + str(self.last)) if self.last.exists()
                      else "no checkpoint of this run was saved yet")
            raise EnvironmentFault(f"could not write the checkpoint of step {step} to {self.ckpt_dir} "
                                   f"({e.strerror or e}); {before}. Free space or make the folder writable, then "
                                   "continue with --resume latest.") from None
        self.saved_step = step

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        self.lock.release()


@torch.no_grad()
def save_sample_grid(rows: Sequence[torch.Tensor], path) -> torch.Tensor:
    """Save images in [-1, 1] as a grid, one row per tensor (e.g. inputs above reconstructions);
    returns the grid (3, H, W) in [0, 1]."""
    from torchvision.utils import make_grid, save_image

    images = torch.cat([r.detach().float().cpu() for r in rows])
    grid = make_grid((images.clamp(-1, 1) + 1) / 2, nrow=rows[0].shape[0], padding=2)
    save_image(grid, str(path))
    return grid


def start_run(cfg, scope: contextlib.ExitStack) -> tuple[StopRequest, "torch.device", DistInfo, Optional[str]]:
    """The opening both training scripts share: signals end the run cleanly from here on; the
    device and torchrun; a second run writing to OUTPUT_DIR refused before anything is read; the
    checkpoint to resume from (None: a new run, which may not overwrite a finished one)."""
    stop = scope.enter_context(StopRequest())
    device, dist_info = setup_distributed(resolve_device(cfg.device))
    RunLock(cfg.output_dir).check()
    return stop, device, dist_info, resume_path(cfg.output_dir, cfg.resume)
