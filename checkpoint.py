"""Checkpoint files: the atomic write, the one way every checkpoint is read (weights-only, or a
restricted unpickler for the reference's Lightning files: nothing in a file is ever imported or
run; .safetensors weights files with their config), the random-number states a bit-identical
resume needs, and where a run resumes from.
"""
from __future__ import annotations

import functools
import json
import os
import pickle
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from distributed import is_distributed
from errors import UserError


# ----------------------------------------------------------------------------------- files
def _atomic_write(path: Path, write) -> None:
    """write(f) into a temporary file in the same folder, fsync, then os.replace: a crash at any
    moment leaves either the old or the new file, never a partial one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(obj: dict, path) -> None:
    """torch.save, atomically; a path ending in .safetensors gets a weights file (save_safetensors)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return save_safetensors(obj, path)
    _atomic_write(path, lambda f: torch.save(obj, f))


def save_safetensors(obj: dict, path, overwrite: bool = False) -> None:
    """A weights file: obj["model"]'s tensors in the safetensors format (no pickle: nothing in it
    can run code), the rest of obj (kind, config: plain values) as JSON, both in the file's
    metadata and in config.json beside it, as model hubs expect. Both written atomically. An
    existing config.json of another model is an error unless `overwrite`."""
    from safetensors.torch import save

    path = Path(path)
    meta = {k: v for k, v in obj.items() if k != "model"}
    config = path.with_name("config.json")
    if config.exists() and not overwrite:
        try:
            same = json.loads(config.read_text()) == json.loads(json.dumps(meta))
        except (OSError, ValueError):
            same = False
        if not same:
            raise UserError(f"{config} exists and describes another model: write the .safetensors file to a "
                            "folder of its own.")
    data = save({k: v.detach().cpu().contiguous() for k, v in obj["model"].items()},
                metadata={"checkpoint": json.dumps(meta)})
    _atomic_write(path, lambda f: f.write(data))
    _atomic_write(config, lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode()))


def load_safetensors(path, map_location="cpu") -> dict:
    """A file of save_safetensors as the checkpoint dict it came from (its tensors under
    "model"); the description from the file's metadata, else from config.json beside it."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as f:
            text = (f.metadata() or {}).get("checkpoint")
        tensors = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}): the file is damaged or cut short.") from None
    config = Path(path).with_name("config.json")
    try:
        meta = json.loads(text) if text is not None else json.loads(config.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} carries no description of its model and {config} cannot be read ({e}): put the "
                        "config.json it was written with beside it.") from None
    if not isinstance(meta, dict):
        raise UserError(f"the description of {path} is not a mapping of settings: the file is damaged.")
    return {**meta, "model": tensors}


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
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "model.safetensors")):  # a model folder (save_pretrained)
            return load_safetensors(os.path.join(path, "model.safetensors"), map_location)
        raise UserError(f"{path} is a folder, not a checkpoint file: give a file such as "
                        f"{Path(path) / 'checkpoints' / 'last.pt'}, or a model folder with model.safetensors.")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist: check the path.")
    if str(path).endswith(".safetensors"):
        return load_safetensors(path, map_location)
    def unreadable(e: Exception) -> UserError:  # not a torch file at all (text, an image, cut short): say so
        return UserError(f"{path} is not a PyTorch checkpoint file, or it is damaged ({type(e).__name__}"
                         f"{': ' + str(e).splitlines()[0] if str(e) else ''}): give a .pt or .ckpt file.")

    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:  # names globals weights-only loading refuses (or is no pickle at all)
        try:
            obj = load_untrusted(path, map_location)
        except Exception as e:
            raise unreadable(e) from None
    except Exception as e:
        raise unreadable(e) from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict.")
    return obj


# ---------------------------------------------------------------------------- random states
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
    state = rng_state()
    if is_distributed():
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, state)
        state = {**state, "ranks": ranks}
    return state


def set_run_rng_state(state, what: str = "the checkpoint") -> None:
    """Restore what run_rng_state saved: this rank's own state when the number of processes is
    the same, else the saving rank 0's. A malformed entry is a UserError."""
    try:
        ranks = state.get("ranks")
        if ranks and is_distributed() and len(ranks) == dist.get_world_size():
            state = ranks[dist.get_rank()]
        set_rng_state(state)
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"the random states in {what} are not what this project saves ({type(e).__name__}: {e}): "
                        "the checkpoint is damaged or was written by another program.") from None


# ------------------------------------------------------------------------------- restoring
def load_strict(module, state, what: str) -> None:
    """load_state_dict with every key checked (after the modules' own renaming hooks): missing
    and unexpected keys, tensors of the wrong shape and non-finite weights end in one message
    that names them."""
    if not isinstance(state, dict):
        raise UserError(f"{what} holds no weights (a {type(state).__name__} where a state dict belongs).")
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"{what} holds non-finite weights (NaN or inf) in {bad[0]}"
                        + (f" and {len(bad) - 1} more tensors" if len(bad) > 1 else "")
                        + ": it cannot be used; take an earlier checkpoint.")
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes: "size mismatch for ..."
        raise UserError(f"{what} does not match the architecture: {str(e).splitlines()[-1].strip()}") from None
    missing, unexpected = sorted(result.missing_keys), sorted(result.unexpected_keys)
    if missing or unexpected:
        show = lambda keys: ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")  # noqa: E731
        raise UserError(f"{what} does not match the architecture: "
                        + (f"missing {show(missing)}" if missing else "")
                        + ("; " if missing and unexpected else "")
                        + (f"unexpected {show(unexpected)}" if unexpected else "")
                        + ". Is it the right checkpoint, and the config right for it?")


def require_entries(ckpt: dict, names, path, what: str) -> None:
    """Every entry a checkpoint must have to be restored from: one message naming the missing ones."""
    missing = [n for n in names if n not in ckpt]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: it is not a whole {what} (was it written by another "
                        "program, or cut short?). Give another checkpoint.")


def load_optimizer(opt: torch.optim.Optimizer, state, what: str) -> None:
    """Optimizer state whose groups and per-parameter tensors fit this optimizer's parameters. The
    implementation is this optimizer's own (a checkpoint of one that was not fused, as earlier
    versions wrote on the CPU, resumes into a fused one: the state is the same)."""
    if isinstance(state, dict) and isinstance(state.get("param_groups"), list):
        own = {k: opt.defaults[k] for k in ("fused", "foreach") if k in opt.defaults}
        state = {**state, "param_groups": [{**g, **own} if isinstance(g, dict) else g for g in state["param_groups"]]}
    try:
        opt.load_state_dict(state)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{what} does not fit this model's optimizer ({e}).") from None
    params = [p for group in opt.param_groups for p in group["params"]]
    for p in params:
        for key, value in opt.state.get(p, {}).items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != p.shape:
                raise UserError(f"{what} has {key} of shape {tuple(value.shape)} for a parameter of shape "
                                f"{tuple(p.shape)}: it belongs to another model.")
            if torch.is_tensor(value) and value.dim() > 0 and value.stride() != p.stride():
                # saved in the other --memory-format: the fused optimizer pairs state and parameter
                # element by element in memory order, so the state takes the parameter's layout
                opt.state[p][key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def load_scaler(scaler: torch.amp.GradScaler, state: dict) -> Optional[str]:
    """A GradScaler's state; precision may change on resume (fp16 needs one, bf16 and fp32 not):
    returns a note when the saved state does not apply."""
    if scaler.is_enabled() and not state:
        return "fp16 loss scaling starts afresh (the checkpoint was not trained in fp16)"
    if not scaler.is_enabled():
        return "the checkpoint's fp16 loss scale is not used (not training in fp16 now)" if state else None
    scaler.load_state_dict(state)
    return None


# --------------------------------------------------------------------------------- resuming
def last_checkpoint(run_dir) -> Path:
    """A run folder's newest checkpoint, checkpoints/last.pt."""
    return Path(run_dir) / "checkpoints" / "last.pt"


def resume_target(output_dir: str, resume: str, output_dir_given: bool) -> tuple[Optional[Path], str]:
    """Where --resume points: (checkpoint, run folder to write to). 'latest': OUTPUT_DIR's last.pt
    (an error when there is none); 'auto': the same, or (None, OUTPUT_DIR) for a new run when the
    folder holds no checkpoint yet; a run folder: its last.pt; a checkpoint file: that file, and
    its run folder when it lies in one's checkpoints/ (unless --output-dir was given)."""
    if resume in ("latest", "auto"):
        last = last_checkpoint(output_dir)
        if last.exists() or resume == "auto":
            return (last if last.exists() else None), output_dir
        raise UserError(f"--resume latest: {output_dir} holds no checkpoint ({last} does not exist). Check "
                        "--output-dir, or use --resume auto, which starts a new run when there is none.")
    path = Path(resume)
    folder: Optional[Path] = None
    if path.is_dir():
        folder, path = path, last_checkpoint(path)
        if not path.exists():
            raise UserError(f"--resume {resume}: the folder holds no checkpoints/last.pt; give a run folder or a "
                            "checkpoint file.")
    elif path.parent.name == "checkpoints":
        folder = path.parent.parent
    return path, (output_dir if output_dir_given or folder is None else str(folder))


def saved_run(path, kind: str, script: str) -> tuple[dict, int]:
    """The training config and step a training checkpoint of `kind` records. Memory-mapped, so the
    tensors are not read; a file that is no torch checkpoint gets load_checkpoint's message."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind or not isinstance(ckpt.get("train_config"), dict):
        stage = "stage-1" if kind == "vqgan" else "stage-2"
        found = ckpt.get("kind") if isinstance(ckpt, dict) else None
        raise UserError(f"{path} is not a {stage} training checkpoint (kind '{found}'): --resume takes a checkpoint "
                        f"written by {script}.")
    return ckpt["train_config"], ckpt.get("step", 0)


def resume_path(run_dir, resume: Optional[str]) -> Optional[str]:
    """The checkpoint to resume from ('latest': the run folder's last.pt), or None for a new run.
    A new run may not overwrite a folder that already holds a checkpoint."""
    last = last_checkpoint(run_dir)
    if resume is None and last.exists():
        raise UserError(f"{last} already exists: continue that run with --resume latest, or start a new one "
                        "with another --output-dir.")
    return str(last) if resume == "latest" else resume
