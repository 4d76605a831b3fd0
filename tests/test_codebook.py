"""Vector quantizer: nearest codes, straight-through gradients, loss placement, statistics."""

import pytest
import torch

from codebook import VectorQuantizer, codebook_usage


def make_vq(legacy=False, n_embed=16, dim=4, seed=0):
    torch.manual_seed(seed)
    vq = VectorQuantizer(n_embed=n_embed, embed_dim=dim, beta=0.25, legacy=legacy)
    vq.embedding.weight.data.normal_()
    return vq


def test_nearest_code_and_shapes():
    vq = make_vq()
    z = torch.randn(3, 4, 5, 6)
    z_q, q_loss, indices = vq(z)
    assert z_q.shape == z.shape and indices.shape == (3, 5, 6) and indices.dtype == torch.long
    assert q_loss.dim() == 0
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    brute = torch.cdist(flat, vq.embedding.weight).argmin(1).view(3, 5, 6)
    assert torch.equal(indices, brute)
    # the forward value of z_q is exactly the codebook rows at the indices
    torch.testing.assert_close(z_q, vq.lookup(indices), rtol=0, atol=1e-6)


def test_straight_through_gradient_is_identity():
    vq = make_vq()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, _, _ = vq(z)
    g = torch.randn_like(z_q)
    (z_q * g).sum().backward()
    torch.testing.assert_close(z.grad, g)
    assert vq.embedding.weight.grad is None  # the reconstruction path does not move the codes


@pytest.mark.parametrize("legacy", [False, True])
def test_beta_placement(legacy):
    """VQ-VAE paper: beta on the commitment term (gradient to z); legacy: beta on the codebook term."""
    vq = make_vq(legacy=legacy)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    _, q_loss, indices = vq(z)
    q_loss.backward()
    e = vq.lookup(indices).detach()
    n = z.numel()
    commit_weight = 1.0 if legacy else 0.25
    torch.testing.assert_close(z.grad, commit_weight * 2 * (z.detach() - e) / n)
    # codebook gradient: codebook weight * 2 (e - z) / n, summed over the positions using each code
    code_weight = 0.25 if legacy else 1.0
    flat_idx = indices.flatten()
    diff = (e - z.detach()).permute(0, 2, 3, 1).reshape(-1, 4)
    expected = torch.zeros_like(vq.embedding.weight).index_add_(0, flat_idx, code_weight * 2 * diff / n)
    torch.testing.assert_close(vq.embedding.weight.grad, expected)


def test_quantizer_runs_float32_under_autocast():
    vq = make_vq(n_embed=64, dim=8)
    z = torch.randn(2, 8, 4, 4)
    _, _, ref = vq(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_q, q_loss, indices = vq(z)
    assert torch.equal(indices, ref)
    assert z_q.dtype == torch.float32 and q_loss.dtype == torch.float32


def test_usage_and_perplexity_by_hand():
    usage, perplexity = codebook_usage(torch.tensor([[0, 0], [1, 2]]), n_embed=4)
    assert usage.item() == pytest.approx(0.75)
    # p = (1/2, 1/4, 1/4, 0): H = 1.5 ln 2, perplexity = 2^1.5
    assert perplexity.item() == pytest.approx(2 ** 1.5, rel=1e-5)
    usage, perplexity = codebook_usage(torch.arange(8), n_embed=8)
    assert usage.item() == 1.0 and perplexity.item() == pytest.approx(8.0, rel=1e-5)
    assert codebook_usage(torch.zeros(10, dtype=torch.long), 8)[1].item() == pytest.approx(1.0)
