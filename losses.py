"""The stage-1 objective of Esser et al. 2021 (Sec. 3.1, Eq. 5-7) in one place, and the two ways of
taking its gradient: the reference's (the adaptive weight's gradients through the whole graph,
then the whole loss backward again) and this project's single-backward execution of the same
arithmetic. A test checks that both give the same gradients; benchmark.py times both.

    L = L_rec + lambda_p * L_LPIPS + L_codebook + lambda * disc_factor * L_GAN
    lambda = disc_weight * ||grad_last(L_rec + lambda_p * L_LPIPS)|| / (||grad_last(L_GAN)|| + 1e-4)

with L_rec the L1 distance (times rec_loss_factor), L_codebook the quantizer's loss (times
codebook_weight), L_GAN the generator's GAN loss on the discriminator's logits for the
reconstructions, and grad_last the gradient at the decoder's last layer (Eq. 7). The GAN terms
count from --disc-start on (disc_factor; before it the discriminator does no work at all).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from discriminator import D_LOSSES, adaptive_weight_from_output_grads, calculate_adaptive_weight, generator_loss
from helper import at_least_float32


@dataclass(frozen=True)
class LossWeights:
    """The weights of the objective (TrainVQGANConfig's names)."""
    rec_loss_factor: float = 1.0
    perceptual_loss_factor: float = 1.0
    codebook_weight: float = 1.0
    disc_weight: float = 0.8
    disc_factor: float = 1.0
    disc_loss: str = "hinge"

    @classmethod
    def of(cls, cfg) -> "LossWeights":
        return cls(**{name: getattr(cfg, name) for name in cls.__dataclass_fields__})


class GeneratorTerms(NamedTuple):
    """The terms of L for one batch (0-dim tensors, at least float32); g_loss is 0 without the GAN."""
    rec_loss: torch.Tensor
    p_loss: torch.Tensor
    q_loss: torch.Tensor
    g_loss: torch.Tensor
    nll_loss: torch.Tensor  # rec_loss_factor * rec_loss + perceptual_loss_factor * p_loss


def discriminator_logits(disc: nn.Module, real: Optional[torch.Tensor], fake: torch.Tensor, joint: bool = False):
    """(logits for real, logits for fake): separate passes, as the reference (BatchNorm normalizes
    each batch with its own statistics), or with joint=True one pass over both (--disc-joint-batch).
    Without `real` in separate mode only the fakes are scored."""
    if joint:
        logits = disc(torch.cat([real, fake]))
        return logits[:real.shape[0]], logits[real.shape[0]:]
    return (disc(real) if real is not None else None), disc(fake)


def generator_terms(x: torch.Tensor, x_rec: torch.Tensor, q_loss: torch.Tensor, w: LossWeights,
                    perceptual: Optional[nn.Module] = None, logits_fake: Optional[torch.Tensor] = None) -> GeneratorTerms:
    """The paper's terms for a batch: L1 and LPIPS between x and x_rec, the codebook loss, and the
    GAN loss on the discriminator's logits for x_rec (None before --disc-start)."""
    zero = torch.zeros((), device=x.device, dtype=at_least_float32(x_rec).dtype)
    rec_loss = (at_least_float32(x) - at_least_float32(x_rec)).abs().mean()
    p_loss = at_least_float32(perceptual(x, x_rec)).mean() if perceptual is not None else zero
    g_loss = generator_loss(at_least_float32(logits_fake), w.disc_loss) if logits_fake is not None else zero
    nll_loss = w.rec_loss_factor * rec_loss + w.perceptual_loss_factor * p_loss
    return GeneratorTerms(rec_loss, p_loss, at_least_float32(q_loss), g_loss, nll_loss)


def generator_objective(t: GeneratorTerms, d_weight: torch.Tensor, w: LossWeights) -> torch.Tensor:
    """L: the paper's generator objective for a given adaptive weight lambda (d_weight)."""
    return t.nll_loss + d_weight * w.disc_factor * t.g_loss + w.codebook_weight * t.q_loss


def backward_two_pass(t: GeneratorTerms, last_layer: torch.Tensor, w: LossWeights, gan: bool,
                      scale: torch.Tensor) -> torch.Tensor:
    """The reference's execution: lambda from the gradients of the NLL and of L_GAN at the last
    layer, each through the whole graph (LPIPS and the discriminator run backward twice), then L
    backward through everything once more. `scale` multiplies the losses before differentiation
    (fp16 loss scaling, 1/K for K micro-batches; lambda does not change with it). Returns lambda."""
    d_weight = torch.zeros_like(t.g_loss)
    if gan:
        d_weight = w.disc_weight * calculate_adaptive_weight(t.nll_loss, t.g_loss, last_layer, loss_scale=scale)
    (generator_objective(t, d_weight, w) * scale).backward()
    return d_weight


def backward_fused(t: GeneratorTerms, x_rec: torch.Tensor, last_layer: torch.Tensor, w: LossWeights, gan: bool,
                   scale: torch.Tensor) -> torch.Tensor:
    """The same gradients with one backward per loss. The NLL and L_GAN are backpropagated once
    each, only as far as the reconstruction x_rec; as x_rec is the last layer's output, that
    layer's two gradients (and so lambda) follow from those through the last layer alone; the
    weighted sum of the two x_rec gradients, with the codebook loss, then goes back through
    decoder and encoder once. Returns lambda."""
    if not gan:
        ((t.nll_loss + w.codebook_weight * t.q_loss) * scale).backward()
        return torch.zeros_like(t.g_loss)
    grad_nll, = torch.autograd.grad(t.nll_loss * scale, x_rec, retain_graph=True)
    grad_gan, = torch.autograd.grad(t.g_loss * scale, x_rec, retain_graph=True)
    # under loss scaling both gradients are scaled, and so is the 1e-4 of Eq. 7
    d_weight = w.disc_weight * adaptive_weight_from_output_grads(x_rec, last_layer, grad_nll, grad_gan,
                                                                 eps=1e-4 * scale)
    grad_x_rec = grad_nll + (d_weight * w.disc_factor).to(grad_nll.dtype) * grad_gan
    torch.autograd.backward([x_rec, w.codebook_weight * t.q_loss * scale], [grad_x_rec, None])
    return d_weight


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, w: LossWeights) -> torch.Tensor:
    """disc_factor * the hinge (or vanilla) loss of real against reconstructed images."""
    return w.disc_factor * D_LOSSES[w.disc_loss](at_least_float32(logits_real), at_least_float32(logits_fake))


def reference_step(model, disc, perceptual, opt_g, opt_d, x: torch.Tensor, w: LossWeights, amp) -> None:
    """The reference's whole stage-1 training step as its trainer runs it (PyTorch Lightning, one
    optimizer after the other), written with this project's modules: the straightforward
    implementation the fast path is compared with (benchmark.py --compare). `amp`: a callable
    returning the autocast context."""
    one = torch.ones((), device=x.device)
    with amp():  # generator: optimizer_idx 0
        x_rec, _, q_loss = model(x)
        t = generator_terms(x, x_rec, q_loss, w, perceptual, disc(x_rec))
    opt_g.zero_grad(set_to_none=True)
    backward_two_pass(t, model.last_layer, w, gan=True, scale=one)  # also fills D's gradients, as the reference
    opt_g.step()
    with amp():  # discriminator: optimizer_idx 1 runs the model again
        x_rec, _, q_loss = model(x)
        generator_terms(x, x_rec, q_loss, w, perceptual)  # its loss computes these first
        d_loss = discriminator_loss(*discriminator_logits(disc, x.detach(), x_rec.detach()), w)
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()
