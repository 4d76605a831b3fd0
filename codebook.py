"""Vector quantization (van den Oord et al. 2017, "Neural Discrete Representation Learning",
Sec. 3.1-3.2; used as the VQGAN bottleneck in Esser et al. 2021, Eq. 4) and codebook usage
statistics.

Each spatial vector of z is replaced by its nearest codebook row in squared Euclidean distance.
The codebook loss is ||sg[z] - z_q||^2 + beta * ||z - sg[z_q]||^2 as in the VQ-VAE paper (beta on
the commitment term). The reference puts beta on the codebook term instead; that placement is
available as `legacy=True` (`--legacy-beta`) and is what its released models were trained with.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class VectorQuantizer(nn.Module):
    def __init__(self, *, n_embed: int, embed_dim: int, beta: float = 0.25, legacy: bool = False):
        super().__init__()
        self.n_embed, self.embed_dim, self.beta, self.legacy = n_embed, embed_dim, beta, legacy
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)  # reference init

    def forward(self, z: torch.Tensor):
        """z: (B, C, H, W) -> z_q (B, C, H, W) float32 with straight-through gradient,
        q_loss (scalar), indices (B, H, W) long."""
        b, c, h, w = z.shape
        # Distances, argmin and losses in float32 even under autocast: bf16 distances pick the
        # wrong code when codes are close.
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            z_flat = z.permute(0, 2, 3, 1).reshape(-1, c)  # (B*H*W, C)
            e = self.embedding.weight.float()  # (n_embed, C)
            # ||z||^2 + ||e||^2 - 2 z.e, in the reference's order (argmin takes the first on ties)
            d = z_flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2.0 * z_flat @ e.t()
            indices = d.argmin(dim=1)  # (B*H*W,)
            z_q = F.embedding(indices, e).view(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W)

            codebook_term = F.mse_loss(z_q, z.detach())  # moves the codes towards the encoder
            commitment_term = F.mse_loss(z, z_q.detach())  # keeps the encoder near its codes
            if self.legacy:
                q_loss = self.beta * codebook_term + commitment_term
            else:
                q_loss = codebook_term + self.beta * commitment_term

            z_q = z + (z_q - z).detach()  # straight-through estimator
        return z_q, q_loss, indices.view(b, h, w)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) long -> (B, C, h, w): the codebook rows at the indices."""
        return self.embedding(indices).permute(0, 3, 1, 2)


class GumbelQuantizer(nn.Module):
    """Gumbel-softmax quantization (Jang et al. 2017), as in the reference's Gumbel f8 VQGAN:
    `proj` maps z to logits over the codes, `embed` holds the code vectors. Training uses a
    straight-through hard Gumbel-softmax sample and a KL term towards the uniform prior; in eval
    mode the code is the argmax of the logits (deterministic; the reference draws Gumbel noise
    even in eval mode)."""

    def __init__(self, *, num_hiddens: int, embed_dim: int, n_embed: int, kl_weight: float = 5e-4,
                 temperature: float = 1.0):
        super().__init__()
        self.n_embed, self.kl_weight, self.temperature = n_embed, kl_weight, temperature
        self.proj = nn.Conv2d(num_hiddens, n_embed, 1)
        self.embed = nn.Embedding(n_embed, embed_dim)

    def forward(self, z: torch.Tensor):
        """z (B, num_hiddens, H, W) -> z_q (B, embed_dim, H, W), q_loss, indices (B, H, W)."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            logits = self.proj(z.float())  # (B, n_embed, H, W)
            if self.training:
                one_hot = F.gumbel_softmax(logits, tau=self.temperature, dim=1, hard=True)
                indices = one_hot.argmax(dim=1)
                z_q = torch.einsum("bnhw,nd->bdhw", one_hot, self.embed.weight.float())
            else:
                indices = logits.argmax(dim=1)
                z_q = self.lookup(indices).float()
            q = logits.softmax(dim=1)
            q_loss = self.kl_weight * (q * torch.log(q * self.n_embed + 1e-10)).sum(dim=1).mean()
        return z_q, q_loss, indices

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embed(indices).permute(0, 3, 1, 2)


@torch.no_grad()
def codebook_usage(indices: torch.Tensor, n_embed: int):
    """Fraction of the n_embed codes that occur in `indices`, and the perplexity exp(H(p)) of
    their empirical distribution (n_embed when all codes are equally used, 1 for one code).
    Returns two 0-dim float tensors (no host sync)."""
    counts = torch.bincount(indices.flatten(), minlength=n_embed).float()
    p = counts / counts.sum().clamp_min(1.0)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return (counts > 0).float().mean(), torch.exp(entropy)
