"""Vector quantizer: nearest codes, straight-through gradients, loss placement, statistics."""

import math

import pytest
import torch
import torch.nn.functional as F

from codebook import CodebookUsage, VectorQuantizer, codebook_usage


def make_vq(legacy=False, n_embed=16, dim=4, seed=0):
    torch.manual_seed(seed)
    vq = VectorQuantizer(n_embed=n_embed, embed_dim=dim, beta=0.25, legacy=legacy)
    vq.embedding.weight.data.normal_()
    return vq


def test_nearest_code_and_shapes(float64):
    vq = make_vq()
    z = torch.randn(3, 4, 5, 6)
    z_q, indices, q_loss = vq(z)
    assert z_q.shape == z.shape and indices.shape == (3, 5, 6) and indices.dtype == torch.long
    assert q_loss.dim() == 0
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    brute = torch.cdist(flat, vq.embedding.weight).argmin(1).view(3, 5, 6)
    assert torch.equal(indices, brute)
    # the forward value of z_q, z + (e - z).detach(), is the codebook rows at the indices in exact
    # arithmetic: float64, compared tightly
    assert z_q.dtype == torch.float64
    torch.testing.assert_close(z_q, vq.lookup(indices), rtol=1e-12, atol=1e-12)


def test_straight_through_gradient_is_identity():
    vq = make_vq()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, _, _ = vq(z)
    g = torch.randn_like(z_q)
    (z_q * g).sum().backward()
    assert torch.equal(z.grad, g)  # an addition of a detached tensor passes the gradient unchanged
    assert vq.embedding.weight.grad is None  # the reconstruction path does not move the codes


@pytest.mark.parametrize("legacy", [False, True])
def test_beta_placement(legacy, float64):
    """VQ-VAE paper: beta on the commitment term (gradient to z); legacy: beta on the codebook term."""
    vq = make_vq(legacy=legacy)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    _, indices, q_loss = vq(z)
    q_loss.backward()
    e = vq.lookup(indices).detach()
    n = z.numel()
    commit_weight = 1.0 if legacy else 0.25
    torch.testing.assert_close(z.grad, commit_weight * 2 * (z.detach() - e) / n, rtol=1e-12, atol=1e-14)
    # codebook gradient: codebook weight * 2 (e - z) / n, summed over the positions using each code
    code_weight = 0.25 if legacy else 1.0
    flat_idx = indices.flatten()
    diff = (e - z.detach()).permute(0, 2, 3, 1).reshape(-1, 4)
    expected = torch.zeros_like(vq.embedding.weight).index_add_(0, flat_idx, code_weight * 2 * diff / n)
    torch.testing.assert_close(vq.embedding.weight.grad, expected, rtol=1e-12, atol=1e-14)


def test_quantizer_runs_float32_under_autocast():
    vq = make_vq(n_embed=64, dim=8)
    z = torch.randn(2, 8, 4, 4)
    _, ref, _ = vq(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_q, indices, q_loss = vq(z)
    assert torch.equal(indices, ref)
    assert z_q.dtype == torch.float32 and q_loss.dtype == torch.float32


def test_usage_and_perplexity_by_hand():
    usage, perplexity = codebook_usage(torch.tensor([[0, 0], [1, 2]]), n_embed=4)
    assert usage.item() == 0.75  # 3 / 4: exact
    # p = (1/2, 1/4, 1/4, 0): H = 1.5 ln 2, perplexity = 2^1.5
    assert perplexity.item() == pytest.approx(2 ** 1.5, rel=1e-5)
    usage, perplexity = codebook_usage(torch.arange(8), n_embed=8)
    assert usage.item() == 1.0 and perplexity.item() == pytest.approx(8.0, rel=1e-5)
    assert codebook_usage(torch.zeros(10, dtype=torch.long), 8)[1].item() == pytest.approx(1.0, rel=1e-5)


# ------------------------------------------------------------------ codebook techniques
def train_forward(vq, z):
    """A training forward pass: (Quantized, CodebookStats)."""
    return vq.train()(z, return_stats=True)


def columns(*vectors):
    """Vectors as a (1, D, 1, N) encoder output."""
    return torch.tensor(vectors).t().reshape(1, len(vectors[0]), 1, len(vectors))


@pytest.mark.parametrize("options", [dict(ema_decay=0.9), dict(restart_after=1), dict(kmeans_init=True),
                                     dict(ema_decay=0.9, kmeans_init=True, restart_after=1, l2_norm=True)])
def test_forward_passes_change_nothing(options):
    """The forward pass is pure: two training forward passes leave every weight and buffer
    bit-identical; only update() changes them."""
    torch.manual_seed(0)
    vq = VectorQuantizer(n_embed=8, embed_dim=4, **options)
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    for _ in range(2):
        train_forward(vq, torch.randn(2, 4, 3, 3))
    assert all(torch.equal(v, before[k]) for k, v in vq.state_dict().items())
    _, stats = train_forward(vq, torch.full((2, 4, 3, 3), 0.5))  # one vector: one code used, the others dead
    for _ in range(2):  # two updates: the k-means init needs 2 * 8 pooled vectors
        vq.update(stats)
    assert any(not torch.equal(v, before[k]) for k, v in vq.state_dict().items())


def test_ema_update_matches_hand_computation():
    """Codes (0,0) and (10,10); vectors (1,0), (0,1) -> code 0 and (9,10) -> code 1; decay 0.5.
    N = 0.5*[1, 1] + 0.5*[2, 1] = [1.5, 1];  m = 0.5*[(0,0), (10,10)] + 0.5*[(1,1), (9,10)]
    = [(0.5,0.5), (9.5,10)];  e = m / N = [(1/3, 1/3), (9.5, 10)] (up to the 1e-5 smoothing)."""
    vq = VectorQuantizer(n_embed=2, embed_dim=2, beta=0.25, ema_decay=0.5)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
        vq.maintenance.ema_embed_sum.copy_(vq.embedding.weight)
    z = columns([1.0, 0.0], [0.0, 1.0], [9.0, 10.0]).requires_grad_(True)
    (z_q, indices, q_loss), stats = train_forward(vq, z)
    assert indices.flatten().tolist() == [0, 0, 1]
    assert torch.equal(vq.embedding.weight, torch.tensor([[0.0, 0.0], [10.0, 10.0]]))  # nothing moved yet
    # no codebook term: the loss is beta * commitment
    before = torch.tensor([[0.0, 0.0], [0.0, 0.0], [10.0, 10.0]])
    flat = z.detach().reshape(2, 3).t()
    torch.testing.assert_close(q_loss, 0.25 * ((flat - before) ** 2).mean(), rtol=1e-5, atol=1e-6)
    q_loss.backward()
    assert vq.embedding.weight.grad is None and z.grad is not None
    vq.update(stats)  # after the optimizer step
    torch.testing.assert_close(vq.maintenance.ema_cluster_size, torch.tensor([1.5, 1.0]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vq.embedding.weight, torch.tensor([[1 / 3, 1 / 3], [9.5, 10.0]]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("legacy", [False, True])
def test_ema_commitment_weight_is_beta_in_both_placements(legacy):
    """The reference's EMA quantizer weights the commitment term by beta; --legacy-beta moves
    beta only between the two terms of the gradient-trained codebook."""
    vq = VectorQuantizer(n_embed=2, embed_dim=2, beta=0.4, legacy=legacy, ema_decay=0.5)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    z = columns([1.0, 2.0], [9.0, 9.0])
    _, _, q_loss = vq(z)
    expected = 0.4 * ((torch.tensor([[1.0, 2.0], [9.0, 9.0]]) - torch.tensor([[0.0, 0.0], [10.0, 10.0]])) ** 2).mean()
    torch.testing.assert_close(q_loss, expected, rtol=1e-5, atol=1e-6)


def test_dead_code_is_restarted_after_its_steps_from_encoder_outputs():
    vq = VectorQuantizer(n_embed=4, embed_dim=2, restart_after=2)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [100.0, 100.0]]))
    z = columns([0.1, 0.0], [5.0, 0.2], [0.0, 4.9])
    _, stats = train_forward(vq, z)
    assert vq.update(stats)["codes_restarted"].item() == 0  # code 3 was never nearest: unused for 1 step
    assert vq.maintenance.unused_steps.tolist() == [0, 0, 0, 1]
    _, stats = train_forward(vq, z)
    assert vq.update(stats)["codes_restarted"].item() == 1  # unused for 2 steps: restarted
    assert vq.maintenance.unused_steps.tolist() == [0, 0, 0, 0]
    new = vq.embedding.weight[3].detach()
    assert any(torch.equal(new, v) for v in z.reshape(2, 3).t())  # a copy of an encoder output
    assert torch.equal(vq.embedding.weight[:3].detach(), torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]]))


def test_restarts_go_to_vectors_far_from_the_codes_and_are_not_counted_as_usage():
    torch.manual_seed(0)
    vq = VectorQuantizer(n_embed=4, embed_dim=2, restart_after=1)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [5.0, 0.0], [100.0, 100.0], [-100.0, 100.0]]))
    # 30 vectors on code 0, 30 on code 1 and one far from both: the uniform draw of a plain restart
    # would copy a vector that already sits on a code 60 times in 61
    on_codes = [[0.0, 0.0]] * 30 + [[5.0, 0.0]] * 30
    z = columns(*on_codes, [2.0, 9.0])
    (_, indices, _), stats = train_forward(vq, z)
    assert vq.update(stats)["codes_restarted"].item() == 2  # codes 2 and 3 unused for a step
    # the first draw is the only vector off the codes, and dead code 2 takes it
    assert torch.equal(vq.embedding.weight[2].detach(), torch.tensor([2.0, 9.0]))
    # the batch whose vector was copied was looked up before the restart: no use of code 2 counted
    assert CodebookUsage(4).update(indices)["usage"].item() == 0.5
    (_, indices, _), _ = train_forward(vq, z)  # the next batch uses it
    assert 2 in indices.flatten().tolist()


def test_l2_mode_unit_norm_codes_and_cosine_lookup():
    torch.manual_seed(0)
    vq = VectorQuantizer(n_embed=32, embed_dim=16, l2_norm=True, codebook_dim=4)
    vq.embedding.weight.data.normal_()
    e = vq.codes()
    torch.testing.assert_close(e.norm(dim=1), torch.ones(32), rtol=1e-5, atol=1e-6)
    z = torch.randn(2, 16, 3, 3)
    _, indices, _ = vq.eval()(z)
    z_low = vq.in_proj(z.permute(0, 2, 3, 1).reshape(-1, 16))
    cosine = F.normalize(z_low, dim=1) @ F.normalize(vq.embedding.weight, dim=1).t()
    assert torch.equal(indices.flatten(), cosine.argmax(1))
    # what the decoder receives is the projected-back unit code
    torch.testing.assert_close(vq.lookup(indices), vq.out_proj(e[indices]).permute(0, 3, 1, 2), rtol=1e-5, atol=1e-6)


def test_kmeans_init_finds_the_clusters():
    torch.manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    vq = VectorQuantizer(n_embed=4, embed_dim=2, kmeans_init=True)
    random_codes = vq.embedding.weight.detach().clone()
    for step in range(2):  # the init waits for 2 * n_embed pooled vectors: 6 per step, so 2 steps
        points = centers.repeat(3, 1)[torch.randperm(12)[:6]] + 0.01 * torch.randn(6, 2)
        _, stats = train_forward(vq, points.t().reshape(1, 2, 1, 6))
        assert torch.equal(vq.embedding.weight, random_codes) and not vq.maintenance.initted
        vq.update(stats)
    assert bool(vq.maintenance.initted)
    codes = vq.embedding.weight.detach()
    assert all((codes - c).norm(dim=1).min() < 0.1 for c in centers)
    fresh = VectorQuantizer(n_embed=4, embed_dim=2, kmeans_init=True)
    fresh.load_state_dict(vq.state_dict())
    assert bool(fresh.maintenance.initted)  # a loaded codebook is not initialized again
    fresh.update(stats)
    assert torch.equal(fresh.embedding.weight, vq.embedding.weight)


def test_warmup_passes_z_through_then_initializes_on_the_latest_outputs():
    """--codebook-warmup 3: three steps without quantization (z_q is z, no codebook loss), then
    k-means on the latest outputs only (2 per code), not the first ones; the pool survives a
    checkpoint (kmeans_pool_state) so that a resumed run initializes the same codes."""
    torch.manual_seed(0)
    vq = VectorQuantizer(n_embed=2, embed_dim=2, kmeans_init=True, warmup=3).train()
    early, late = torch.tensor([[-5.0, -5.0], [-6.0, -6.0]]), torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    copy = VectorQuantizer(n_embed=2, embed_dim=2, kmeans_init=True, warmup=3)
    for step, centers in enumerate((early, late, late)):
        z = centers.repeat(2, 1).t().reshape(1, 2, 2, 2)  # 4 vectors: two of each center
        z.requires_grad_(True)
        (z_q, _, q_loss), stats = vq(z, return_stats=True)
        assert torch.equal(z_q, z) and q_loss.item() == 0.0  # unquantized during the warm-up
        z_q.sum().backward()
        assert torch.equal(z.grad, torch.ones_like(z))
        assert not vq.maintenance.initted
        if step == 2:  # a resumed copy continues from the saved pool
            copy.load_state_dict(vq.state_dict())
            copy.load_kmeans_pool_state(vq.kmeans_pool_state())
            torch.manual_seed(1)  # k-means draws its starting rows (a resume restores the RNG)
            copy.update(stats)
            torch.manual_seed(1)
        vq.update(stats)
    assert bool(vq.maintenance.initted) and vq.kmeans_pool_state() is None
    codes = sorted(vq.embedding.weight.detach().tolist())
    assert codes == sorted(late.tolist())  # the first step's outputs (near -5) were dropped
    assert torch.equal(copy.embedding.weight, vq.embedding.weight)
    z_q, indices, q_loss = vq(late.t().reshape(1, 2, 1, 2))
    assert torch.equal(z_q, late.t().reshape(1, 2, 1, 2)) and q_loss.item() == 0.0  # now quantized: on the codes


def test_checkpoints_from_before_the_maintenance_module_load():
    vq = VectorQuantizer(n_embed=4, embed_dim=2, ema_decay=0.9, restart_after=3, kmeans_init=True)
    old_layout = {k.replace("maintenance.", ""): v + 1 for k, v in vq.state_dict().items()}
    fresh = VectorQuantizer(n_embed=4, embed_dim=2, ema_decay=0.9, restart_after=3, kmeans_init=True)
    fresh.load_state_dict(old_layout)
    assert torch.equal(fresh.maintenance.unused_steps, torch.ones(4, dtype=torch.long))


def test_entropy_loss_rewards_confident_diverse_assignments():
    vq = VectorQuantizer(n_embed=4, embed_dim=2, entropy_weight=1.0)
    e = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    spread = vq.entropy_loss(e.clone(), e)  # every code used once, confidently: -log 4
    collapsed = vq.entropy_loss(e[:1].repeat(4, 1), e)  # every vector on code 0: 0
    assert spread.item() == pytest.approx(-math.log(4), abs=1e-4) and collapsed.item() == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("options", [
    dict(), dict(l2_norm=True), dict(codebook_dim=3), dict(ema_decay=0.9), dict(restart_after=1),
    dict(kmeans_init=True), dict(entropy_weight=0.1),
    dict(l2_norm=True, codebook_dim=3, ema_decay=0.9, kmeans_init=True, restart_after=1, entropy_weight=0.1),
])
def test_invariants_for_every_option(options):
    torch.manual_seed(0)
    vq = VectorQuantizer(n_embed=16, embed_dim=6, **options).train()
    z = torch.randn(2, 6, 4, 4, requires_grad=True)
    for _ in range(3):  # exercises the init, restarts and EMA updates
        (z_q, indices, q_loss), stats = vq(z, return_stats=True)
        vq.update(stats)
    assert z_q.shape == z.shape and indices.shape == (2, 4, 4) and 0 <= indices.min() and indices.max() < 16
    (z_q.sum() + q_loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # straight-through reaches the encoder
    vq.eval()
    z_q, indices, _ = vq(z.detach())
    # z_q is the looked-up code up to z + (e - z) - z rounding (float32): a relative criterion
    torch.testing.assert_close(z_q, vq.lookup(indices), rtol=1e-5, atol=1e-5)
    copy = VectorQuantizer(n_embed=16, embed_dim=6, **options)
    copy.load_state_dict(vq.state_dict())
    assert torch.equal(copy.eval()(z.detach()).indices, indices)


def test_plain_vq_state_dict_has_only_the_reference_entry():
    assert list(VectorQuantizer(n_embed=8, embed_dim=4).state_dict()) == ["embedding.weight"]


def test_usage_statistics_hand_made_indices():
    usage, perplexity = codebook_usage(torch.tensor([0, 0, 0, 1]), 4)
    # p = (3/4, 1/4): H = -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.562335, perplexity e^H = 1.754765
    assert usage.item() == 0.5 and perplexity.item() == pytest.approx(1.754765, abs=1e-5)
    tracker = CodebookUsage(4, window=2)
    tracker.update(torch.tensor([0, 0]))
    tracker.update(torch.tensor([1, 1]))
    stats = tracker.update(torch.tensor([2, 2]))  # the window now holds [1, 1] and [2, 2]
    assert stats["usage"].item() == 0.25 and stats["perplexity"].item() == pytest.approx(1.0, rel=1e-5)
    assert stats["usage_window"].item() == 0.5 and stats["perplexity_window"].item() == pytest.approx(2.0, rel=1e-5)
