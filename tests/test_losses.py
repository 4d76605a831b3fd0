"""losses.py: the paper's objective, and the single-backward execution against the reference's
two-backward one (equal in exact arithmetic: compared in float64)."""
import pytest
import torch

from conftest import random_batch
from discriminator import NLayerDiscriminator
from losses import (GeneratorTerms, LossWeights, backward_fused, backward_two_pass, discriminator_logits,
                    discriminator_loss, generator_objective, generator_terms)
from vqgan import VQGAN


def test_the_objective_reads_as_the_paper(float64):
    """L = rec_factor * L1 + lambda_p * LPIPS + codebook_weight * L_Q + lambda * disc_factor * L_GAN."""
    w = LossWeights(rec_loss_factor=2.0, perceptual_loss_factor=0.5, codebook_weight=3.0, disc_factor=0.25)
    x, x_rec = torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 0.5)
    t = generator_terms(x, x_rec, torch.tensor(0.1), w, perceptual=lambda a, b: torch.full((1,), 0.2),
                        logits_fake=torch.full((1, 1, 2, 2), -0.4))
    assert (t.rec_loss.item(), t.p_loss.item(), t.q_loss.item(), t.g_loss.item()) == (0.5, 0.2, 0.1, 0.4)
    assert t.nll_loss.item() == pytest.approx(2.0 * 0.5 + 0.5 * 0.2, rel=1e-12)
    lam = torch.tensor(1.5)
    assert generator_objective(t, lam, w).item() == pytest.approx(1.1 + 3.0 * 0.1 + 1.5 * 0.25 * 0.4, rel=1e-12)
    vanilla = generator_terms(x, x_rec, torch.tensor(0.1), LossWeights(disc_loss="vanilla"),
                              logits_fake=torch.full((1, 1, 2, 2), -0.4))
    assert vanilla.g_loss.item() == pytest.approx(torch.nn.functional.softplus(torch.tensor(0.4)).item(), rel=1e-12)


def terms_of(seed, tiny_cfg, x, w):
    torch.manual_seed(seed)
    model, disc = VQGAN(tiny_cfg), NLayerDiscriminator(ndf=8, n_layers=2)
    x_rec, _, q_loss = model(x)
    disc.requires_grad_(False)
    return model, x_rec, generator_terms(x, x_rec, q_loss, w, logits_fake=disc(x_rec))


@pytest.mark.parametrize("scale", [1.0, 0.5, 1024.0])
def test_fused_backward_equals_the_two_backward_execution(tiny_cfg, float64, scale):
    """The same lambda and the same gradients, with a loss scale (fp16, 1/K micro-batches) that
    must change neither lambda nor the gradients' ratio."""
    w = LossWeights(disc_weight=0.7, disc_factor=0.9, codebook_weight=1.3)
    x = random_batch(n=2)
    fused_model, x_rec, terms = terms_of(0, tiny_cfg, x, w)
    lam_fused = backward_fused(terms, x_rec, fused_model.last_layer, w, gan=True, scale=torch.tensor(scale))
    plain_model, _, terms = terms_of(0, tiny_cfg, x, w)
    lam_plain = backward_two_pass(terms, plain_model.last_layer, w, gan=True, scale=torch.tensor(scale))
    assert lam_plain.item() > 0
    torch.testing.assert_close(lam_fused, lam_plain, rtol=1e-10, atol=0)
    for (name, a), b in zip(fused_model.named_parameters(), plain_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-13 * scale, msg=name)


def test_without_the_gan_both_executions_backpropagate_nll_and_codebook(tiny_cfg, float64):
    w = LossWeights()
    x = random_batch(n=2)
    grads = []
    for backward in (lambda m, r, t: backward_fused(t, r, m.last_layer, w, False, torch.tensor(1.0)),
                     lambda m, r, t: backward_two_pass(t, m.last_layer, w, False, torch.tensor(1.0))):
        model, x_rec, terms = terms_of(0, tiny_cfg, x, w)
        assert backward(model, x_rec, terms).item() == 0  # lambda is 0 before --disc-start
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_separate_passes_normalize_each_batch_alone():
    """In train mode BatchNorm normalizes with the batch's statistics: the fakes' logits from the
    separate pass are those of the fakes alone, and differ from the joint pass's."""
    torch.manual_seed(0)
    disc = NLayerDiscriminator(ndf=8, n_layers=2).train()
    real, fake = random_batch(0, n=3), random_batch(1, n=3) * 0.2  # fakes of another contrast
    _, separate = discriminator_logits(disc, real, fake)
    assert torch.equal(separate, disc(fake))
    _, joint = discriminator_logits(disc, real, fake, joint=True)
    assert joint.shape == separate.shape and (joint - separate).abs().max() > 1e-3
    real_only, fake_only = discriminator_logits(disc, None, fake)
    assert real_only is None and torch.equal(fake_only, separate)
    d_loss = discriminator_loss(*discriminator_logits(disc, real, fake), LossWeights(disc_factor=0.5))
    assert d_loss.item() > 0


def test_generator_terms_are_a_named_tuple_of_scalars(tiny_cfg):
    x = random_batch(n=1)
    _, _, terms = terms_of(0, tiny_cfg, x, LossWeights())
    assert isinstance(terms, GeneratorTerms) and all(v.dim() == 0 for v in terms)
