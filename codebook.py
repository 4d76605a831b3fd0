"""Vector quantization (van den Oord et al. 2017, "Neural Discrete Representation Learning",
Sec. 3.1-3.2; the VQGAN bottleneck of Esser et al. 2021, Eq. 4), the techniques that keep a large
codebook in use, the Gumbel quantizer of the reference's f8 model, and codebook usage statistics.

VectorQuantizer.forward is pure: each spatial vector of z is replaced by its nearest codebook row,
the codebook loss ||sg[z] - z_q||^2 + beta * ||z - sg[z_q]||^2 is returned (beta on the commitment
term, as in the VQ-VAE paper; the reference puts it on the codebook term, `legacy=True`,
`--legacy-beta`), and gradients pass straight through. Nothing in it changes a weight or a buffer.

Plain VQ with a large codebook uses few of its codes (codebook collapse). The options below, all off
by default so that plain VQ and the official weights stay as they are, fix that:
  l2_norm         (--codebook-l2-norm)   look up l2-normalized vectors, i.e. by cosine similarity
                                         (Yu et al. 2022, "Vector-quantized Image Modeling with
                                         Improved VQGAN", Sec. 3.2)
  codebook_dim    (--codebook-dim D)     look up in a D-dimensional projection of z and project the
                                         code back (factorized codes, same paper and section)
  entropy_weight  (--codebook-entropy-weight W) adds W * (mean per-vector entropy of the soft
                                         assignment - entropy of the mean assignment), pushing
                                         for confident and diverse code use (Yu et al. 2023,
                                         "Language Model Beats Diffusion", Eq. 5)
and three that change the codes outside the gradient. Their buffers and counters live in
CodebookMaintenance, applied by quantizer.update(stats, stepped) after each optimizer step with the
statistics the forward pass returned and whether the step was taken (a skipped step changes
nothing, and counts and decays count optimizer steps taken; the decision stays on the device, so
no host synchronization is needed once the codes are initialized); under torchrun the statistics
are summed over processes and random choices broadcast from rank 0, so every process keeps the
same codebook:
  ema_decay       (--codebook-ema DECAY) codes are exponential moving averages of the vectors
                                         assigned to them, not trained by gradients (van den Oord
                                         et al. 2017, Appendix A.1; Razavi et al. 2019, VQ-VAE-2)
  kmeans_init     (--codebook-kmeans-init) codes start as k-means centroids of the first steps'
                                         encoder outputs (Lancucki et al. 2020, "Robust Training of
                                         Vector Quantized Bottleneck Models"); until then z passes
                                         to the decoder unquantized. With --codebook-warmup N that
                                         lasts N optimizer steps and the centroids are those of the
                                         latest outputs, so that an encoder that has learnt
                                         something places the codes, not a random one
  restart_after   (--codebook-restart-after N) a code unused for N optimizer steps is replaced by
                                         an encoder output of the last step (Dhariwal et al.
                                         2020, "Jukebox", Sec. 3.3; Lancucki et al. 2020), drawn
                                         with probability proportional to its squared distance
                                         from its nearest code, as k-means++ seeds (Arthur and
                                         Vassilvitskii 2007): a uniform draw mostly lands on a
                                         vector that sits on a code already, and the copy dies
"""
from __future__ import annotations

from collections import deque
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from distributed import all_reduce_sum, broadcast
from helper import at_least_float32

EMA_EPS = 1e-5  # Laplace smoothing of the EMA cluster sizes (VQ-VAE, Appendix A.1)


def code_counts(indices: torch.Tensor, n_embed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n_embed,) how often each code occurs in `indices`. torch.bincount would read the largest
    index back to the host on CUDA (a synchronization each call); this does not."""
    flat = indices.flatten()
    return torch.zeros(n_embed, device=flat.device, dtype=dtype).index_add_(0, flat, torch.ones_like(flat, dtype=dtype))


class Quantized(NamedTuple):
    """What a quantizer (and VQGAN.encode) returns."""
    z_q: torch.Tensor  # (B, C, H, W) the codes, with the straight-through gradient to z
    indices: torch.Tensor  # (B, H, W) long
    q_loss: torch.Tensor  # scalar codebook loss


class CodebookStats(NamedTuple):
    """What a training forward pass hands to update(): the encoder vectors in the lookup space and
    the code each was assigned to."""
    z_e: torch.Tensor  # (N, D), detached
    indices: torch.Tensor  # (N,)

    @staticmethod
    def cat(stats: Sequence["CodebookStats"]) -> "CodebookStats":
        """The statistics of several micro-batches as one (they make one optimizer step)."""
        return CodebookStats(torch.cat([s.z_e for s in stats]), torch.cat([s.indices for s in stats]))


def squared_distances(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """(N, D), (K, D) -> (N, K): ||x||^2 + ||e||^2 - 2 x.e, in the reference's order (argmin
    then takes the first code on ties)."""
    return x.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2.0 * x @ e.t()


@torch.no_grad()
def nearest(x: torch.Tensor, e: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """Index of the nearest row of e for each row of x, in chunks of x to bound memory."""
    return torch.cat([squared_distances(part, e).argmin(1) for part in x.split(chunk)])


class VectorQuantizer(nn.Module):
    def __init__(self, *, n_embed: int, embed_dim: int, beta: float = 0.25, legacy: bool = False,
                 l2_norm: bool = False, codebook_dim: int = 0, ema_decay: float = 0.0, kmeans_init: bool = False,
                 restart_after: int = 0, entropy_weight: float = 0.0, entropy_temperature: float = 0.01,
                 warmup: int = 0):
        super().__init__()
        self.n_embed, self.beta, self.legacy, self.l2_norm = n_embed, beta, legacy, l2_norm
        self.ema, self.entropy_weight, self.entropy_temperature = ema_decay > 0, entropy_weight, entropy_temperature
        self.embedding = nn.Embedding(n_embed, codebook_dim or embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)  # the reference's init
        if codebook_dim:
            self.in_proj = nn.Linear(embed_dim, codebook_dim)
            self.out_proj = nn.Linear(codebook_dim, embed_dim)
        self.maintenance = None
        if ema_decay or kmeans_init or restart_after:
            self.maintenance = CodebookMaintenance(n_embed, codebook_dim or embed_dim, ema_decay=ema_decay,
                                                   kmeans_init=kmeans_init, restart_after=restart_after,
                                                   spherical=l2_norm, initial=self.embedding.weight, warmup=warmup)
        if self.ema:
            self.embedding.weight.requires_grad_(False)  # moved by update(), not by the optimizer
        self.register_load_state_dict_pre_hook(_maintenance_buffers_moved)

    def codes(self) -> torch.Tensor:
        """The code vectors in the lookup space, (n_embed, D), at least float32; unit rows in l2 mode."""
        e = at_least_float32(self.embedding.weight)
        return F.normalize(e, dim=1) if self.l2_norm else e

    def project_in(self, z_flat: torch.Tensor) -> torch.Tensor:
        """(N, embed_dim) encoder vectors -> (N, D) vectors compared with the codes."""
        if hasattr(self, "in_proj"):
            z_flat = self.in_proj(z_flat)
        return F.normalize(z_flat, dim=1) if self.l2_norm else z_flat

    def project_out(self, e: torch.Tensor) -> torch.Tensor:
        return self.out_proj(e) if hasattr(self, "out_proj") else e

    def forward(self, z: torch.Tensor, return_stats: bool = False):
        """z (B, C, H, W) -> Quantized(z_q, indices, q_loss); with return_stats also the
        CodebookStats that update() takes after the optimizer step."""
        b, c, h, w = z.shape
        # Distances, argmin and losses in float32 even under autocast: bf16 distances pick the
        # wrong code when codes are close.
        with torch.autocast(device_type=z.device.type, enabled=False):
            z_e = self.project_in(at_least_float32(z).permute(0, 2, 3, 1).reshape(-1, c))  # (N, D)
            e = self.codes()  # (K, D)
            indices = nearest(z_e, e)  # (N,)
            e_q = F.embedding(indices, e)  # (N, D); gradient to the codes unless EMA
            q_loss = self.codebook_loss(z_e, e_q)
            if self.entropy_weight:
                q_loss = q_loss + self.entropy_weight * self.entropy_loss(z_e, e)
            e_q = z_e + (e_q - z_e).detach()  # straight-through estimator
            if self.maintenance is not None and self.maintenance.kmeans_init:
                # Until the k-means initialization, z passes through unquantized (no host sync).
                live = self.maintenance.initted
                e_q, q_loss = torch.where(live, e_q, z_e), torch.where(live, q_loss, torch.zeros_like(q_loss))
            z_q = self.project_out(e_q).view(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W)
        out = Quantized(z_q, indices.view(b, h, w), q_loss)
        return (out, CodebookStats(z_e.detach(), indices)) if return_stats else out

    def codebook_loss(self, z_e: torch.Tensor, e_q: torch.Tensor) -> torch.Tensor:
        commitment = F.mse_loss(z_e, e_q.detach())  # keeps the encoder near its codes
        if self.ema:  # the codes move by the EMA update: no codebook term, beta on the commitment (both placements)
            return self.beta * commitment
        codebook = F.mse_loss(e_q, z_e.detach())  # moves the codes towards the encoder
        return self.beta * codebook + commitment if self.legacy else codebook + self.beta * commitment

    def entropy_loss(self, z_e: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """Mean entropy of each vector's soft assignment minus the entropy of the batch's mean
        assignment: low when each vector is confidently assigned and all codes are used."""
        p = torch.softmax(-squared_distances(z_e, e) / self.entropy_temperature, dim=1)  # (N, K)
        per_vector = -(p * torch.log(p.clamp_min(1e-12))).sum(1).mean()
        mean_p = p.mean(0)
        return per_vector + (mean_p * torch.log(mean_p.clamp_min(1e-12))).sum()

    @torch.no_grad()
    def update(self, stats: CodebookStats, stepped: Optional[torch.Tensor] = None) -> dict:
        """After an optimizer step: EMA, k-means initialization and restarts (whichever are on) from
        that step's statistics, where `stepped` (a 0-dim bool tensor; None: True) says the step
        was taken. Returns logs as 0-dim tensors."""
        if self.maintenance is None:
            return {}
        stepped = torch.ones((), dtype=torch.bool, device=self.embedding.weight.device) if stepped is None else stepped
        return self.maintenance.update(self.embedding.weight, stats, stepped)

    def codes_initialized(self) -> bool:
        """False while the codes wait for their k-means initialization (a checkpoint saved inside
        --codebook-warmup): until then the decoder sees z itself and the indices mean nothing."""
        m = self.maintenance
        return m is None or not m.kmeans_init or bool(m.initted)

    def kmeans_pool_state(self) -> Optional[dict]:
        """What a checkpoint needs to resume exactly before the k-means initialization (the
        encoder outputs pooled so far and the steps counted); None once it is done or when off."""
        if self.codes_initialized():
            return None
        return {"steps": self.maintenance.pooled_steps, "pool": list(self.maintenance._pool)}

    def load_kmeans_pool_state(self, state: Optional[dict]) -> None:
        if state is not None and self.maintenance is not None:
            device = self.embedding.weight.device
            self.maintenance.pooled_steps = int(state["steps"])
            self.maintenance._pool = [p.to(device) for p in state["pool"]]

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) long -> (B, C, h, w): the codes at the indices, as the decoder receives them."""
        return self.project_out(F.embedding(indices, self.codes())).permute(0, 3, 1, 2)


def _maintenance_buffers_moved(module, state_dict, prefix, *args) -> None:
    """Checkpoints written before the maintenance buffers had their own module keep loading."""
    for name in ("ema_cluster_size", "ema_embed_sum", "unused_steps", "initted"):
        if prefix + name in state_dict:
            state_dict[prefix + "maintenance." + name] = state_dict.pop(prefix + name)


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int = 10, spherical: bool = False):
    """Lloyd's k-means on the rows of x (N, D) -> (centroids (k, D), counts (k,)). Starts from k
    random rows (with replacement when N < k); an empty cluster keeps its centroid. Spherical:
    centroids are renormalized to unit length after each update (for cosine lookup)."""
    n = x.shape[0]
    pick = torch.randperm(n, device="cpu")[:k] if n >= k else torch.randint(n, (k,), device="cpu")
    centroids = x[pick.to(x.device)].clone()
    counts = torch.zeros(k, device=x.device, dtype=x.dtype)
    for _ in range(iters):
        assign = nearest(x, centroids)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
        if spherical:
            centroids = F.normalize(centroids, dim=1)
    return centroids, counts


class CodebookMaintenance(nn.Module):
    """The codebook's learning outside the gradient, with its buffers: EMA statistics
    (ema_cluster_size, ema_embed_sum), steps each code went unused (unused_steps) and whether the
    k-means initialization is done (initted). update() is the only thing that changes them and
    the codes; it runs once per optimizer step and changes nothing when that step was skipped.
    After the initialization it never reads a tensor back to the host."""

    def __init__(self, n_embed: int, dim: int, *, ema_decay: float, kmeans_init: bool, restart_after: int,
                 spherical: bool, initial: torch.Tensor, warmup: int = 0):
        super().__init__()
        self.n_embed, self.ema_decay, self.kmeans_init, self.warmup = n_embed, ema_decay, kmeans_init, warmup
        self.restart_after, self.spherical = restart_after, spherical
        if ema_decay:
            self.register_buffer("ema_cluster_size", torch.ones(n_embed))
            self.register_buffer("ema_embed_sum", initial.detach().clone())
        if restart_after:
            self.register_buffer("unused_steps", torch.zeros(n_embed, dtype=torch.long))
        if kmeans_init:
            self.register_buffer("initted", torch.zeros((), dtype=torch.bool))
        self._pool: list[torch.Tensor] = []  # encoder outputs gathered for the k-means initialization
        self.pooled_steps = 0  # optimizer steps seen before it
        self._initted = False  # a host-side copy of `initted`: no sync per step once it is done

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._initted, self._pool, self.pooled_steps = False, [], 0  # read `initted` again at the next update

    def update(self, weight: torch.Tensor, stats: CodebookStats, stepped: torch.Tensor) -> dict:
        z_e, indices = stats
        if self.kmeans_init and not self._initted:
            self._initted = bool(self.initted)  # a host sync, only until the initialization is done
            if not self._initted:
                if not bool(stepped):  # the pool takes only the outputs of steps taken
                    return {}
                self._pool.append(z_e)
                self.pooled_steps += 1
                # During a warm-up only the latest outputs (at least 2 per code) are kept.
                while self.warmup and sum(p.shape[0] for p in self._pool[1:]) >= 2 * self.n_embed:
                    self._pool.pop(0)
                if self.pooled_steps >= self.warmup and sum(p.shape[0] for p in self._pool) >= 2 * self.n_embed:
                    self._initialize(weight, torch.cat(self._pool))
                return {}  # the codes do nothing else before they are initialized
        # A skipped step counts no code and moves nothing (every change below is masked with `stepped`).
        counts = all_reduce_sum(code_counts(indices, self.n_embed, z_e.dtype)) * stepped  # (K,)
        if self.ema_decay:
            self._ema(weight, z_e, indices, counts, stepped)
        if not self.restart_after:
            return {}
        self.unused_steps.add_(stepped.long()).masked_fill_(counts > 0, 0)
        dead = (self.unused_steps >= self.restart_after) & stepped  # (K,)
        e = F.normalize(weight, dim=1) if self.spherical else weight
        self._set_codes(weight, dead, broadcast(self._restart_candidates(z_e, e, dead)), torch.ones_like(counts))
        self.unused_steps.masked_fill_(dead, 0)
        return {"codes_restarted": dead.sum()}

    def _initialize(self, weight: torch.Tensor, pool: torch.Tensor) -> None:
        """Every code becomes a k-means centroid of the pooled encoder outputs (rank 0's)."""
        centroids, counts = kmeans(pool, self.n_embed, spherical=self.spherical)
        everything = torch.ones(self.n_embed, dtype=torch.bool, device=weight.device)
        self._set_codes(weight, everything, broadcast(centroids), broadcast(counts).clamp_min(1.0))
        self.initted.fill_(True)
        if self.restart_after:  # the new codes get their full grace period
            self.unused_steps.zero_()
        self._initted, self._pool, self.pooled_steps = True, [], 0

    def _ema(self, weight: torch.Tensor, z_e: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor,
             stepped: torch.Tensor) -> None:
        """N <- d N + (1-d) n,  m <- d m + (1-d) sum(z),  e = m / ((N + eps) / (sum N + K eps) * sum N)
        with n the number of vectors assigned to each code in this step (VQ-VAE, Appendix A.1);
        where the step was skipped, N, m and e stay as they are."""
        d = self.ema_decay
        sums = all_reduce_sum(torch.zeros_like(self.ema_embed_sum).index_add_(0, indices, z_e.to(weight.dtype)))
        size = self.ema_cluster_size * d + counts.to(weight.dtype) * (1 - d)
        embed_sum = self.ema_embed_sum * d + sums * (1 - d)
        total = size.sum()
        smoothed = (size + EMA_EPS) / (total + self.n_embed * EMA_EPS) * total
        self.ema_cluster_size.copy_(torch.where(stepped, size, self.ema_cluster_size))
        self.ema_embed_sum.copy_(torch.where(stepped, embed_sum, self.ema_embed_sum))
        weight.copy_(torch.where(stepped, embed_sum / smoothed[:, None], weight))

    def _restart_candidates(self, z_e: torch.Tensor, e: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
        """(K, D): a new vector for every code (used where the code is dead), drawn from the step's
        encoder outputs with probability proportional to the squared distance to the nearest code,
        without replacement while they last; dead code number j (in index order) takes draw j."""
        error = torch.cat([squared_distances(part, e).min(1).values for part in z_e.split(16384)]).clamp_min(0)
        # A skipped step's outputs may not be finite (their draw is discarded): keep the weights valid.
        error = torch.nan_to_num(error, nan=0.0, posinf=0.0)
        weights = torch.where(error.sum() > 0, error, torch.ones_like(error))  # all on codes: uniform
        # torch.multinomial's draw without replacement (the largest weights / Exp(1) noise), without
        # its checks of the weights, which read them back to the host
        draws = torch.topk(weights / torch.empty_like(weights).exponential_(), min(z_e.shape[0], self.n_embed)).indices
        order = (dead.long().cumsum(0) - 1).clamp_min(0) % draws.numel()  # dead code j -> draw j
        return z_e[draws[order]]

    def _set_codes(self, weight: torch.Tensor, mask: torch.Tensor, vectors: torch.Tensor,
                   counts: torch.Tensor) -> None:
        """Codes where mask is set become `vectors` (and, with EMA, averages over `counts`)."""
        weight.copy_(torch.where(mask[:, None], vectors.to(weight.dtype), weight))
        if self.ema_decay:
            self.ema_cluster_size.copy_(torch.where(mask, counts.to(weight.dtype), self.ema_cluster_size))
            self.ema_embed_sum.copy_(torch.where(mask[:, None], (vectors * counts[:, None]).to(weight.dtype),
                                                 self.ema_embed_sum))


class GumbelQuantizer(nn.Module):
    """Gumbel-softmax quantization (Jang et al. 2017), as in the reference's Gumbel f8 VQGAN:
    `proj` maps z to logits over the codes, `embed` holds the code vectors. Training uses a
    straight-through hard Gumbel-softmax sample at the temperature the trainer sets each step
    (set_temperature; the reference anneals it by a cosine from 0.9) and a KL term towards
    uniform code use weighted by kl_weight (the reference's GumbelVQ: 1e-8). In eval mode the
    code is the argmax of the logits (deterministic; the reference draws Gumbel noise even then)."""

    def __init__(self, *, num_hiddens: int, embed_dim: int, n_embed: int, kl_weight: float = 1e-8):
        super().__init__()
        self.n_embed, self.kl_weight, self.temperature = n_embed, kl_weight, 1.0
        self.proj = nn.Conv2d(num_hiddens, n_embed, 1)
        self.embed = nn.Embedding(n_embed, embed_dim)

    def set_temperature(self, temperature: float) -> None:
        self.temperature = temperature

    def forward(self, z: torch.Tensor, return_stats: bool = False):
        """z (B, num_hiddens, H, W) -> Quantized(z_q (B, embed_dim, H, W), indices, q_loss)."""
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
        out = Quantized(z_q, indices, q_loss)
        return (out, None) if return_stats else out

    def update(self, stats, stepped=None) -> dict:
        return {}  # nothing learns outside the gradient

    def codes_initialized(self) -> bool:
        return True

    def kmeans_pool_state(self) -> None:
        return None

    def load_kmeans_pool_state(self, state) -> None:
        pass

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
    return usage_from_counts(code_counts(indices, n_embed))


class CodebookUsage:
    """Training statistics: usage and perplexity of each step's batch and of the last `window`
    batches together (a skipped step's batch counts as empty there: which steps were skipped is
    not known on the host). Counts are summed over processes when distributed, so every rank
    reports the global figures. Returns 0-dim tensors; nothing here waits for the device."""

    def __init__(self, n_embed: int, window: int = 100):
        self.n_embed, self.window = n_embed, window
        self.recent: deque[torch.Tensor] = deque()
        self.total: Optional[torch.Tensor] = None

    @torch.no_grad()
    def update(self, indices: torch.Tensor, stepped: Optional[torch.Tensor] = None) -> dict:
        """The statistics of a step's indices (counted only when `stepped`, a 0-dim bool tensor, holds)."""
        counts = all_reduce_sum(code_counts(indices, self.n_embed))
        counts = counts if stepped is None else counts * stepped
        self.recent.append(counts)
        self.total = counts.clone() if self.total is None else self.total + counts
        if len(self.recent) > self.window:
            self.total -= self.recent.popleft()
        usage, perplexity = usage_from_counts(counts)
        usage_window, perplexity_window = usage_from_counts(self.total)
        return dict(usage=usage, perplexity=perplexity, usage_window=usage_window,
                    perplexity_window=perplexity_window)
