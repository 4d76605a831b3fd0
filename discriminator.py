"""PatchGAN discriminator (Isola et al. 2017, as used by Esser et al. 2021, Sec. 3.1), its weight
init, the GAN losses, and the adaptive weight lambda of Esser et al. 2021, Eq. 7.

Names follow the reference (`main.0`, `main.2`, ... in one Sequential) so that the discriminator
in the reference's checkpoints (`loss.discriminator.*`) loads by name.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from helper import at_least_float32


class NLayerDiscriminator(nn.Module):
    """Conv 4x4 stride 2 layers with BatchNorm and LeakyReLU(0.2); outputs one logit per
    overlapping patch, shape (B, 1, h, w)."""

    def __init__(self, *, input_nc: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):  # the last of these keeps stride 1
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 1, h, w) logits
        return self.main(x)


def weights_init(m: nn.Module) -> None:
    """Conv weights N(0, 0.02); norm weights N(1, 0.02) and biases 0 (the reference's init)."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def generator_loss(logits_fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """hinge: -mean(D(x_rec)), the reference's generator loss. vanilla: the non-saturating
    loss softplus(-D(x_rec)) that matches the vanilla discriminator loss (the reference uses
    -mean(D) for both; with a vanilla D that term is unbounded)."""
    if kind == "hinge":
        return -logits_fake.mean()
    return F.softplus(-logits_fake).mean()


def calculate_adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                              max_weight: float = 1e4, loss_scale: float = 1.0) -> torch.Tensor:
    """lambda = ||grad_L(nll)|| / (||grad_L(g_loss)|| + 1e-4), clamped to [0, max_weight] and
    detached, where L is the decoder's last layer (Eq. 7). Multiply by disc_weight outside.

    loss_scale: under fp16, the GradScaler's scale; both losses are scaled before their
    gradients are taken (so tiny gradients do not underflow) and the ratio is unchanged."""
    nll_grad, = torch.autograd.grad(nll_loss * loss_scale, last_layer, retain_graph=True)
    g_grad, = torch.autograd.grad(g_loss * loss_scale, last_layer, retain_graph=True)
    d_weight = at_least_float32(nll_grad).norm() / (at_least_float32(g_grad).norm() + 1e-4 * loss_scale)
    return d_weight.clamp(0.0, max_weight).detach()


def adaptive_weight_from_output_grads(output: torch.Tensor, last_layer: torch.Tensor, grad_nll: torch.Tensor,
                                      grad_gan: torch.Tensor, max_weight: float = 1e4, eps: float = 1e-4) -> torch.Tensor:
    """The same lambda as calculate_adaptive_weight, from the two losses' gradients with respect
    to `output`, the result of the layer whose weight is `last_layer`: the weight's gradients are
    then taken through that layer alone, not through the networks behind the losses. Under
    loss scaling, pass scaled gradients and eps = 1e-4 * scale."""
    w_nll, = torch.autograd.grad(output, last_layer, grad_nll, retain_graph=True)
    w_gan, = torch.autograd.grad(output, last_layer, grad_gan, retain_graph=True)
    d_weight = at_least_float32(w_nll).norm() / (at_least_float32(w_gan).norm() + eps)
    return d_weight.clamp(0.0, max_weight).detach()
