"""Shared fixtures: the flat layout's modules on sys.path, tiny configurations, image folders."""
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from config import VQGANConfig  # noqa: E402


@pytest.fixture
def tiny_cfg() -> VQGANConfig:
    """Two levels (f2), attention at 16x16 and in the middle, 64 codes, 32x32 images."""
    return VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), resolution=32,
                       z_channels=16, embed_dim=8, n_embed=64)


def write_images(folder, n=6, size=(40, 48), seed=0):
    """n small random RGB images (PNG and JPEG) in nested folders; returns their paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        sub = os.path.join(folder, f"class{i % 2}")
        os.makedirs(sub, exist_ok=True)
        arr = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
        path = os.path.join(sub, f"img{i}.{'png' if i % 2 else 'jpg'}")
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def random_inception(tmp_path, monkeypatch):
    """torch-fidelity's Inception architecture with random weights, saved as its weights file
    would be (the real one is downloaded by users, never by tests)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    monkeypatch.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
    monkeypatch.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
    torch.manual_seed(0)
    net = fe.FeatureExtractorInceptionV3("random", ["2048"])
    monkeypatch.undo()
    for m in net.modules():  # He initialization keeps the random features from vanishing
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path / "inception.pth"
    torch.save(net.state_dict(), path)
    return str(path)
