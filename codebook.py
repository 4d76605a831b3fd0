"""Vector quantization (van den Oord et al. 2017, "Neural Discrete Representation Learning",
Sec. 3.1-3.2; used as the VQGAN bottleneck in Esser et al. 2021, Eq. 4), the techniques that keep
a large codebook in use, and codebook usage statistics.

Each spatial vector of z is replaced by its nearest codebook row in squared Euclidean distance.
The codebook loss is ||sg[z] - z_q||^2 + beta * ||z - sg[z_q]||^2 as in the VQ-VAE paper (beta on
the commitment term). The reference puts beta on the codebook term instead; that placement is
available as `legacy=True` (`--legacy-beta`) and is what its released models were trained with.

Plain VQ with a large codebook uses few of its codes (codebook collapse). The options below, all
off by default so that plain VQ and the official weights stay as they are, fix that:
  l2_norm         (--codebook-l2-norm)   look up l2-normalized vectors, i.e. by cosine similarity
                                         (Yu et al. 2022, "Vector-quantized Image Modeling with
                                         Improved VQGAN", Sec. 3.2)
  codebook_dim    (--codebook-dim D)     look up in a D-dimensional projection of z and project the
                                         code back (factorized codes, same paper and section)
  ema_decay       (--codebook-ema DECAY) codes are exponential moving averages of the vectors
                                         assigned to them, not trained by gradients (van den Oord
                                         et al. 2017, Appendix A.1; Razavi et al. 2019, VQ-VAE-2)
  kmeans_init     (--codebook-kmeans-init) codes start as k-means centroids of the first batches'
                                         encoder outputs (Lancucki et al. 2020, "Robust Training of
                                         Vector Quantized Bottleneck Models")
  restart_after   (--codebook-restart-after N) a code unused for N training forward passes is
                                         replaced by a recent encoder output (Dhariwal et al.
                                         2020, "Jukebox", Sec. 3.3; Lancucki et al. 2020), drawn
                                         with probability proportional to its squared distance
                                         from its nearest code, as k-means++ seeds (Arthur and
                                         Vassilvitskii 2007): a uniform draw mostly lands on a
                                         vector that sits on a code already, and the copy dies
  entropy_weight  (--codebook-entropy-weight W) adds W * (mean per-vector entropy of the soft
                                         assignment - entropy of the mean assignment), pushing
                                         for confident and diverse code use (Yu et al. 2023,
                                         "Language Model Beats Diffusion", Eq. 5)
Training-time updates (EMA, k-means, restarts) happen only in train mode; their statistics are
summed over processes when torch.distributed is initialized, so all ranks keep equal codebooks.
"""
from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from helper import at_least_float32

EMA_EPS = 1e-5  # Laplace smoothing of the EMA cluster sizes (VQ-VAE, Appendix A.1)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(t)
    return t


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's values on every rank (random choices made per rank must agree)."""
    if _distributed():
        dist.broadcast(t, 0)
    return t


def squared_distances(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """(N, D), (K, D) -> (N, K): ||x||^2 + ||e||^2 - 2 x.e, in the reference's order (argmin
    then takes the first code on ties)."""
    return x.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2.0 * x @ e.t()


@torch.no_grad()
def nearest(x: torch.Tensor, e: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """Index of the nearest row of e for each row of x, in chunks of x to bound memory."""
    return torch.cat([squared_distances(part, e).argmin(1) for part in x.split(chunk)])


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int = 10, spherical: bool = False, generator=None):
    """Lloyd's k-means on the rows of x (N, D) -> (centroids (k, D), counts (k,)). Starts from k
    random rows (with replacement when N < k); an empty cluster keeps its centroid. Spherical:
    centroids are renormalized to unit length after each update (for cosine lookup)."""
    n = x.shape[0]
    pick = (torch.randperm(n, generator=generator, device="cpu")[:k] if n >= k
            else torch.randint(n, (k,), generator=generator, device="cpu"))
    centroids = x[pick.to(x.device)].clone()
    counts = torch.zeros(k, device=x.device)
    for _ in range(iters):
        assign = nearest(x, centroids)
        counts = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
        if spherical:
            centroids = F.normalize(centroids, dim=1)
    return centroids, counts


class VectorQuantizer(nn.Module):
    def __init__(self, *, n_embed: int, embed_dim: int, beta: float = 0.25, legacy: bool = False,
                 l2_norm: bool = False, codebook_dim: int = 0, ema_decay: float = 0.0, kmeans_init: bool = False,
                 restart_after: int = 0, entropy_weight: float = 0.0, entropy_temperature: float = 0.01):
        super().__init__()
        self.n_embed, self.embed_dim, self.beta, self.legacy = n_embed, embed_dim, beta, legacy
        self.l2_norm, self.ema_decay, self.kmeans_init = l2_norm, ema_decay, kmeans_init
        self.restart_after, self.entropy_weight, self.entropy_temperature = restart_after, entropy_weight, entropy_temperature
        self.lookup_dim = codebook_dim or embed_dim
        self.embedding = nn.Embedding(n_embed, self.lookup_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)  # reference init
        if codebook_dim:
            self.in_proj = nn.Linear(embed_dim, codebook_dim)
            self.out_proj = nn.Linear(codebook_dim, embed_dim)
        if ema_decay:
            self.embedding.weight.requires_grad_(False)  # moved by the EMA update, not the optimizer
            self.register_buffer("ema_cluster_size", torch.ones(n_embed))
            self.register_buffer("ema_embed_sum", self.embedding.weight.detach().clone())
        if restart_after:
            self.register_buffer("unused_steps", torch.zeros(n_embed, dtype=torch.long))
        if kmeans_init:
            self.register_buffer("initted", torch.zeros((), dtype=torch.bool))
        self._pool: list[torch.Tensor] = []  # encoder outputs gathered for the k-means init
        self._initted_cache = False  # avoids a host sync per step once the init is done
        self._restarted = None  # codes restarted since the last pop_restarted() (K,) bool

    def _load_from_state_dict(self, *args, **kwargs):
        self._initted_cache = False
        super()._load_from_state_dict(*args, **kwargs)

    def codes(self) -> torch.Tensor:
        """The code vectors in the lookup space, (n_embed, lookup_dim) float32; unit-norm rows in
        l2 mode."""
        e = at_least_float32(self.embedding.weight)
        return F.normalize(e, dim=1) if self.l2_norm else e

    def project_in(self, z_flat: torch.Tensor) -> torch.Tensor:
        """(N, embed_dim) encoder vectors -> (N, lookup_dim) vectors compared with the codes."""
        if hasattr(self, "in_proj"):
            z_flat = self.in_proj(z_flat)
        return F.normalize(z_flat, dim=1) if self.l2_norm else z_flat

    def project_out(self, e: torch.Tensor) -> torch.Tensor:
        return self.out_proj(e) if hasattr(self, "out_proj") else e

    def forward(self, z: torch.Tensor):
        """z: (B, C, H, W) -> z_q (B, C, H, W) float32 with straight-through gradient,
        q_loss (scalar), indices (B, H, W) long."""
        b, c, h, w = z.shape
        # Distances, argmin and losses in float32 even under autocast: bf16 distances pick the
        # wrong code when codes are close.
        with torch.autocast(device_type=z.device.type, enabled=False):
            z_flat = at_least_float32(z).permute(0, 2, 3, 1).reshape(-1, c)  # (N, C)
            z_e = self.project_in(z_flat)  # (N, D)
            finite = None
            if self.training and (self.kmeans_init or self.restart_after or self.ema_decay):
                # a non-finite batch (its step will be skipped) must not reach the codebook
                finite = _all_reduce_sum((~torch.isfinite(z_e.detach()).all()).float().reshape(1)) == 0
                self._prepare_codes(z_e.detach(), finite)
            e = self.codes()  # (K, D)
            if self.ema_decay:
                e = e.clone()  # the EMA update below rewrites the weight in place
            indices = nearest(z_e, e)  # (N,)
            e_q = F.embedding(indices, e)  # (N, D); gradient to the codes unless EMA

            commitment_term = F.mse_loss(z_e, e_q.detach())  # keeps the encoder near its codes
            if self.ema_decay:  # the codes move by the EMA update, so there is no codebook term
                q_loss = (1.0 if self.legacy else self.beta) * commitment_term
            else:
                codebook_term = F.mse_loss(e_q, z_e.detach())  # moves the codes towards the encoder
                q_loss = (self.beta * codebook_term + commitment_term if self.legacy
                          else codebook_term + self.beta * commitment_term)
            if self.entropy_weight:
                q_loss = q_loss + self.entropy_weight * self.entropy_loss(z_e, e)

            e_q = z_e + (e_q - z_e).detach()  # straight-through estimator
            z_q = self.project_out(e_q).view(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W)
            if finite is not None:
                self._update_codes(z_e.detach(), indices, finite)
        return z_q, q_loss, indices.view(b, h, w)

    def entropy_loss(self, z_e: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Mean entropy of each vector's soft assignment minus the entropy of the batch's mean
        assignment: low when each vector is confidently assigned and all codes are used."""
        p = torch.softmax(-squared_distances(z_e, e) / self.entropy_temperature, dim=1)  # (N, K)
        per_vector = -(p * torch.log(p.clamp_min(1e-12))).sum(1).mean()
        mean_p = p.mean(0)
        return per_vector + (mean_p * torch.log(mean_p.clamp_min(1e-12))).sum()

    @torch.no_grad()
    def _prepare_codes(self, z_e: torch.Tensor, finite: torch.Tensor) -> None:
        """Before the lookup: k-means init once enough encoder outputs are pooled, and restart
        of dead codes from this batch's vectors (neither from a non-finite batch)."""
        if self.kmeans_init and not self._initted_cache:
            if bool(self.initted):
                self._initted_cache, self._pool = True, []
            elif bool(finite):  # a host sync, only until the init is done
                self._pool.append(z_e)
                if sum(p.shape[0] for p in self._pool) >= 2 * self.n_embed:
                    centroids, counts = kmeans(torch.cat(self._pool), self.n_embed, spherical=self.l2_norm)
                    self._set_codes(torch.ones(self.n_embed, dtype=torch.bool, device=z_e.device),
                                    _broadcast(centroids), _broadcast(counts).clamp_min(1.0))
                    self.initted.fill_(True)
                    if self.restart_after:  # the new codes get their full grace period
                        self.unused_steps.zero_()
                    self._initted_cache, self._pool = True, []
        if self.restart_after:
            dead = (self.unused_steps >= self.restart_after) & finite  # (K,) no host sync below
            self._set_codes(dead, _broadcast(self._restart_candidates(z_e, dead)), torch.ones(self.n_embed, device=z_e.device))
            self.unused_steps.masked_fill_(dead, 0)
            self._restarted = dead if self._restarted is None else self._restarted | dead

    def _restart_candidates(self, z_e: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
        """(K, D): a new vector for every code (used where the code is dead), drawn from this
        batch with probability proportional to the squared distance to the nearest code, without
        replacement while the batch lasts; dead code number j (in index order) takes draw j."""
        n = z_e.shape[0]
        e = self.codes()
        error = torch.cat([squared_distances(part, e).min(1).values for part in z_e.split(16384)]).clamp_min(0)
        weights = torch.where(error.sum() > 0, error, torch.ones_like(error))  # all on codes: uniform
        draws = torch.multinomial(weights, min(n, self.n_embed), replacement=False)
        order = (dead.long().cumsum(0) - 1).clamp_min(0) % draws.numel()  # dead code j -> draw j
        return z_e[draws[order]]

    def pop_restarted(self):
        """(K,) bool mask of the codes restarted since the previous call (None if none could be),
        then forget them. A restarted code is used by the vector it was copied from; the
        training statistics do not count that use."""
        mask, self._restarted = self._restarted, None
        return mask

    def _set_codes(self, mask: torch.Tensor, vectors: torch.Tensor, counts: torch.Tensor) -> None:
        """Codes where mask is set become `vectors` (and, with EMA, averages over `counts`)."""
        weight = self.embedding.weight
        weight.copy_(torch.where(mask[:, None], vectors.to(weight.dtype), weight))
        if self.ema_decay:
            self.ema_cluster_size.copy_(torch.where(mask, counts, self.ema_cluster_size))
            self.ema_embed_sum.copy_(torch.where(mask[:, None], vectors * counts[:, None], self.ema_embed_sum))

    @torch.no_grad()
    def _update_codes(self, z_e: torch.Tensor, indices: torch.Tensor, finite: torch.Tensor) -> None:
        """After the lookup: dead-code counters and the EMA update
            N <- d N + (1-d) n,   m <- d m + (1-d) sum(z),   e = m / ((N + eps) / (sum N + K eps) * sum N)
        with n the number of vectors assigned to each code in this batch (VQ-VAE, Appendix A.1)."""
        counts = None
        if self.restart_after or self.ema_decay:
            counts = _all_reduce_sum(torch.bincount(indices, minlength=self.n_embed).float()) * finite
        if self.restart_after:
            self.unused_steps.add_(finite.long()).masked_fill_(counts > 0, 0)
        if self.ema_decay:
            d = torch.where(finite, self.ema_decay, 1.0)  # decay 1: a non-finite batch changes nothing
            z_ok = torch.where(finite[:, None], z_e.nan_to_num(0.0, 0.0, 0.0), 0.0)  # no inf * 0 below
            sums = _all_reduce_sum(torch.zeros_like(self.ema_embed_sum).index_add_(0, indices, z_ok))
            self.ema_cluster_size.mul_(d).add_(counts * (1 - d))
            self.ema_embed_sum.mul_(d).add_(sums * (1 - d))
            total = self.ema_cluster_size.sum()
            smoothed = (self.ema_cluster_size + EMA_EPS) / (total + self.n_embed * EMA_EPS) * total
            self.embedding.weight.copy_(self.ema_embed_sum / smoothed[:, None])

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) long -> (B, C, h, w): the codes at the indices, as the decoder receives them."""
        return self.project_out(F.embedding(indices, self.codes())).permute(0, 3, 1, 2)


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
            logits = self.proj(at_least_float32(z))  # (B, n_embed, H, W)
            if self.training:
                one_hot = F.gumbel_softmax(logits, tau=self.temperature, dim=1, hard=True)
                indices = one_hot.argmax(dim=1)
                z_q = torch.einsum("bnhw,nd->bdhw", one_hot, at_least_float32(self.embed.weight))
            else:
                indices = logits.argmax(dim=1)
                z_q = at_least_float32(self.lookup(indices))
            q = logits.softmax(dim=1)
            q_loss = self.kl_weight * (q * torch.log(q * self.n_embed + 1e-10)).sum(dim=1).mean()
        return z_q, q_loss, indices

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embed(indices).permute(0, 3, 1, 2)


def usage_from_counts(counts: torch.Tensor):
    """(n_embed,) code counts -> fraction of codes used at least once, and the perplexity
    exp(H(p)) of the empirical distribution (n_embed when all codes are equally used, 1 for one
    code). Two 0-dim float tensors (no host sync)."""
    counts = counts.float()
    p = counts / counts.sum().clamp_min(1.0)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return (counts > 0).float().mean(), torch.exp(entropy)


@torch.no_grad()
def codebook_usage(indices: torch.Tensor, n_embed: int):
    """Usage and perplexity (see usage_from_counts) of the codes in `indices`."""
    return usage_from_counts(torch.bincount(indices.flatten(), minlength=n_embed))


class CodebookUsage:
    """Training statistics: usage and perplexity of each step's batch and of the last `window`
    batches together. Counts are summed over processes when distributed, so every rank reports
    the global figures. Returns 0-dim tensors; nothing here waits for the device."""

    def __init__(self, n_embed: int, window: int = 100):
        self.n_embed, self.window = n_embed, window
        self.recent: deque[torch.Tensor] = deque()
        self.total = None

    @torch.no_grad()
    def update(self, indices: torch.Tensor, exclude=None) -> dict:
        """Counts of this step's indices; codes in the (K,) bool mask `exclude` (codes restarted
        in this step, the same on every process) count as unused."""
        counts = _all_reduce_sum(torch.bincount(indices.flatten(), minlength=self.n_embed).float())
        if exclude is not None:
            counts = counts.masked_fill(exclude, 0.0)
        self.recent.append(counts)
        self.total = counts.clone() if self.total is None else self.total + counts
        if len(self.recent) > self.window:
            self.total -= self.recent.popleft()
        usage, perplexity = usage_from_counts(counts)
        usage_window, perplexity_window = usage_from_counts(self.total)
        return dict(usage=usage, perplexity=perplexity, usage_window=usage_window,
                    perplexity_window=perplexity_window)
