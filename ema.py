"""An exponential moving average of a model's parameters (--ema-decay D in both training scripts).

After each successful optimizer step every averaged parameter moves towards the trained one:

    ema <- d * ema + (1 - d) * p,    d = min(D, (1 + n) / (10 + n))

with n the number of updates before this one. The warm-up of d (TensorFlow's ExponentialMovingAverage
with num_updates) keeps the first steps' random weights from lingering in a short run; after a
few hundred steps d is D. Buffers (BatchNorm statistics, an EMA codebook's codes) are not
averaged: the averaged model uses the trained model's. Skipped steps do not update it (nor n); the
decision arrives as a tensor on the device, and n lives there too, so an update never waits for
the device.

The average is kept as plain tensors beside the model; `swapped_in` puts them into the model for
validation and sample grids and puts the trained weights back afterwards, bit for bit.
Checkpoints store it under "ema" ({"decay", "updates", "weights": {name: tensor}}), and
`averaged_state` gives a checkpoint's model state with the averaged parameters in place.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn as nn

from errors import UserError
from utils import log


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay {decay} must lie in (0, 1)")
        self.decay = decay
        self.reset(model)

    def reset(self, model: nn.Module) -> None:
        """Start the average afresh from `model`'s parameters."""
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.weights = [params[name].detach().clone() for name in self.names]
        self._n = torch.zeros((), dtype=torch.long, device=self.weights[0].device if self.weights else None)

    @property
    def updates(self) -> int:
        """n: the updates so far (read back from the device)."""
        return int(self._n)

    @updates.setter
    def updates(self, value: int) -> None:
        self._n.fill_(value)

    def parameters(self):
        """The averaged tensors (what distributed.replicas_identical compares across processes)."""
        return iter(self.weights)

    def buffers(self):
        return iter(())

    def _decay(self) -> torch.Tensor:
        """The d of the next update (the warm-up, then the configured decay), on the device in the
        averages' dtype."""
        n = self._n.to(self.weights[0].dtype if self.weights else torch.float32)
        return torch.clamp((1 + n) / (10 + n), max=self.decay)

    def current_decay(self) -> float:
        """The d of the next update, read back."""
        return float(self._decay())

    @torch.no_grad()
    def update(self, model: nn.Module, stepped: Optional[torch.Tensor] = None) -> None:
        """One step of the average towards `model`'s parameters after an optimizer step; none
        where `stepped` (a 0-dim bool tensor; None: True) says that step was skipped."""
        if not self.weights:
            return
        d = self._decay()
        weight = 1 - d if stepped is None else (1 - d) * stepped
        params = dict(model.named_parameters())
        # one weight tensor per average (a single tensor would be read back to the host as a Scalar)
        torch._foreach_lerp_(self.weights, [params[name].detach() for name in self.names],
                             [weight.expand_as(w) for w in self.weights])
        self._n += 1 if stepped is None else stepped.long()

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module):
        """Inside the block `model` has the averaged parameters; afterwards its own again."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            saved = [params[name].detach().clone() for name in self.names]
            for name, w in zip(self.names, self.weights):
                params[name].copy_(w)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, w in zip(self.names, saved):
                    params[name].copy_(w)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates,
                "weights": {name: w.clone() for name, w in zip(self.names, self.weights)}}

    def load_state_dict(self, state, what: str) -> None:
        """The average a checkpoint saved, checked against this model's parameters."""
        try:
            weights, updates = state["weights"], state["updates"]
        except (KeyError, TypeError):
            raise UserError(f"{what} has an EMA entry without weights and updates: the checkpoint is damaged.") from None
        if not isinstance(updates, int) or updates < 0 or not isinstance(weights, dict):
            raise UserError(f"{what} has a malformed EMA entry: the checkpoint is damaged.")
        missing = [n for n in self.names if n not in weights]
        if missing or len(weights) != len(self.names):
            raise UserError(f"{what}: its EMA weights do not match this model's parameters "
                            f"({'missing ' + missing[0] if missing else 'extra entries'}): the checkpoint is damaged.")
        for i, name in enumerate(self.names):
            w = weights[name]
            if not torch.is_tensor(w) or w.shape != self.weights[i].shape:
                raise UserError(f"{what}: its EMA weight {name} has the wrong shape: the checkpoint is damaged.")
            if w.is_floating_point() and not torch.isfinite(w).all():
                raise UserError(f"{what}: its EMA weight {name} is not finite: take an earlier checkpoint.")
            self.weights[i].copy_(w)
        self.updates = updates


@contextlib.contextmanager
def evaluated_with(ema: Optional[EMA], model: nn.Module, raw: bool):
    """The context validation and sample grids run in: compiled modules run eagerly, and the
    averaged weights are swapped into `model` when there is an average and `raw` (--raw-weights)
    is off. Eagerly because under --compile the eval-mode graphs (no gradients, other batch
    sizes) would be compiled anew: before the first step (validation before training), at the
    first sample step and for a validation set's last, smaller batch, for a few batches that run
    well enough without it."""
    with torch.compiler.set_stance("force_eager"):
        with contextlib.nullcontext() if ema is None or raw else ema.swapped_in(model):
            yield


def averaged_state(ckpt: dict, raw: bool = False, entry: str = "model") -> dict:
    """The model state of a checkpoint: with its EMA parameters in place when it has them, unless
    `raw` (the trained weights themselves)."""
    state = ckpt[entry]
    ema: Optional[dict] = ckpt.get("ema")
    if raw or not isinstance(ema, dict) or not isinstance(ema.get("weights"), dict):
        return state
    return {**state, **ema["weights"]}


def restore_ema(ema: Optional[EMA], model: nn.Module, ckpt: dict, path: str) -> None:
    """The checkpoint's EMA; --ema-decay switched on at resume starts it from the restored
    weights, switched off drops it (both said). The decay is the run's current setting."""
    if ema is not None and "ema" in ckpt:
        ema.load_state_dict(ckpt["ema"], path)
    elif ema is not None:
        log("resuming: the checkpoint has no EMA of the weights; it starts from the restored weights now")
        ema.reset(model)
    elif "ema" in ckpt:
        log("resuming: the checkpoint's EMA of the weights is dropped (--ema-decay is 0 now)")
