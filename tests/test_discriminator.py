"""PatchGAN names, init and losses; the adaptive weight against a hand computation."""
import pytest
import torch

from conftest import reference_shapes
from discriminator import (NLayerDiscriminator, calculate_adaptive_weight, generator_loss, hinge_d_loss,
                           vanilla_d_loss)


def test_state_dict_matches_reference():
    ours = {k: list(v.shape) for k, v in NLayerDiscriminator().state_dict().items()}
    assert ours == reference_shapes("discriminator_patchgan_batchnorm")


def test_init_and_output_shape():
    torch.manual_seed(0)
    d = NLayerDiscriminator()
    w = d.main[5].weight
    assert abs(w.mean().item()) < 1e-3 and w.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(d.main[3].bias == 0)
    assert d.main[3].weight.std().item() == pytest.approx(0.02, rel=0.3)
    assert d(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)


def test_losses_by_hand(float64):
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    # hinge: 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))) = 0.5 * (0.25 + 0.5)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.375)
    sp = torch.nn.functional.softplus
    expected = 0.5 * (sp(-real).mean() + sp(fake).mean())
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected.item())
    assert generator_loss(fake, "hinge").item() == pytest.approx(1.0)
    assert generator_loss(fake, "vanilla").item() == pytest.approx(sp(-fake).mean().item())


def test_adaptive_weight_by_hand(float64):
    torch.manual_seed(0)
    last = torch.randn(3, 4, requires_grad=True)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    nll, g = (last * a).sum(), (last * b).sum() * 3  # gradients: a and 3b
    lam = calculate_adaptive_weight(nll, g, last)
    assert lam.item() == pytest.approx((a.norm() / (3 * b.norm() + 1e-4)).item(), rel=1e-12)
    assert not lam.requires_grad
    tiny = (last * 1e-9).sum()  # vanishing GAN gradient: clamped to 1e4
    assert calculate_adaptive_weight(nll, tiny, last).item() == 1e4
    scaled = calculate_adaptive_weight(nll, g, last, loss_scale=1024.0)  # fp16 loss scaling: same ratio
    assert scaled.item() == pytest.approx(lam.item(), rel=1e-12)
