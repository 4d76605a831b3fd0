"""PSNR and SSIM against scikit-image; the rFID wrapper on Inception weights made in the test."""

import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from errors import UserError
from metrics import ReconstructionFID, psnr, ssim


def test_psnr_hand_value():
    x = torch.zeros(2, 3, 4, 4)
    y = x.clone()
    y[1] += 0.2  # 0.1 in [0, 1] units: mse 0.01 -> 20 dB
    p = psnr(x, y)
    assert p[1].item() == pytest.approx(20.0, rel=1e-5) and p[0].item() > 90


def random_pairs(seed=0, b=3, c=3, h=32, w=40):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, c, h, w, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(b, c, h, w, generator=g)).clamp(-1, 1)  # a noisy "reconstruction"
    return x, y


def test_psnr_and_ssim_match_scikit_image():
    x, y = random_pairs()
    ours_p, ours_s = psnr(x, y), ssim(x, y)
    for i in range(x.shape[0]):
        a, b = x[i].double().numpy(), y[i].double().numpy()
        ref_p = peak_signal_noise_ratio(a, b, data_range=2.0)
        ref_s = structural_similarity(a, b, data_range=2.0, channel_axis=0, gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False)
        assert ours_p[i].item() == pytest.approx(ref_p, abs=1e-4)
        assert ours_s[i].item() == pytest.approx(ref_s, abs=1e-4)
    assert ssim(x, x).sub(1).abs().max() < 1e-5  # identical images
    assert (ssim(x, y) < 0.9).all()  # and noisy ones are clearly below


def test_ssim_rejects_tiny_images():
    with pytest.raises(ValueError, match="11x11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def test_reconstruction_fid_rejects_other_files(tmp_path):
    path = tmp_path / "not_inception.pth"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(UserError, match="torch-fidelity"):
        ReconstructionFID(str(path), torch.device("cpu"))
