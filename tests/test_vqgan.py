"""VQGAN: reference parameter names, public API, gradients, checkpoint round trips."""
import pytest
import torch

from config import VQGANConfig
from errors import UserError
from conftest import reference_shapes
from vqgan import VQGAN


def test_state_dict_matches_reference_f16_1024():
    with torch.device("meta"):  # 90M parameters: shapes only, no memory
        model = VQGAN(VQGANConfig())
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == reference_shapes("vqgan")


def test_api_shapes_and_invariants(tiny_cfg, float64):
    torch.manual_seed(0)
    model = VQGAN(tiny_cfg).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x_rec, indices, q_loss = model(x)
    assert x_rec.shape == x.shape
    assert indices.shape == (2, 16, 16) and indices.dtype == torch.long
    assert 0 <= indices.min() and indices.max() < tiny_cfg.n_embed
    assert q_loss.dim() == 0 and q_loss.item() >= 0
    z_q, indices2, _ = model.encode(x)
    assert torch.equal(indices, indices2) and z_q.shape == (2, tiny_cfg.embed_dim, 16, 16)
    # z_q = z + (e - z).detach() equals the code e in exact arithmetic: float64, compared tightly
    assert z_q.dtype == torch.float64
    torch.testing.assert_close(model.decode_indices(indices), model.decode(z_q), rtol=1e-12, atol=1e-12)
    assert torch.equal(model.decode(z_q), x_rec)  # the same computation on the same input


def test_any_divisible_size_works_and_others_fail(tiny_cfg):
    model = VQGAN(tiny_cfg).eval()
    x_rec, indices, _ = model(torch.zeros(1, 3, 24, 40))
    assert x_rec.shape == (1, 3, 24, 40) and indices.shape == (1, 12, 20)
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.zeros(1, 3, 31, 32))


def test_gradients_reach_encoder_and_codebook(tiny_cfg):
    torch.manual_seed(0)
    model = VQGAN(tiny_cfg)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x_rec, _, q_loss = model(x)
    (x - x_rec).abs().mean().backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # straight-through estimator
    assert model.quantize.embedding.weight.grad is None
    model.zero_grad(set_to_none=True)
    _, _, q_loss = model(x)
    q_loss.backward()
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # commitment term
    assert model.decoder.conv_out.weight.grad is None


def test_checkpoint_round_trip_weights_only(tiny_cfg, tmp_path):
    from checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = VQGAN(tiny_cfg).eval()
    path = tmp_path / "model.pt"
    save_checkpoint({"kind": "vqgan", "model": model.state_dict(), "model_config": model.config_dict()}, path)
    raw = torch.load(path, weights_only=True)
    assert raw["model_config"]["ch_mult"] == [1, 2]
    loaded = VQGAN.from_checkpoint(path)
    assert not loaded.training and loaded.config == tiny_cfg
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    for a, b in zip(model(x), loaded(x)):
        assert torch.equal(a, b)


def test_from_checkpoint_rejects_other_kinds(tiny_cfg, tmp_path):
    from checkpoint import save_checkpoint

    path = tmp_path / "other.pt"
    save_checkpoint({"kind": "metrics", "model": {}}, path)
    with pytest.raises(UserError, match="not a VQGAN checkpoint"):
        VQGAN.from_checkpoint(path)
    save_checkpoint({"kind": "transformer", "model": {}}, path)  # a stage-2 checkpoint without its VQGAN
    with pytest.raises(UserError, match="lacks vqgan, vqgan_config"):
        VQGAN.from_checkpoint(path)
    with pytest.raises(UserError, match="does not exist"):
        VQGAN.from_checkpoint(tmp_path / "missing.pt")


def test_lecun_init_keeps_the_signal_scale_and_the_codebook(tiny_cfg):
    """weight_init="lecun": every convolution and linear map of encoder, quantizer and decoder is
    drawn with std 1/sqrt(fan_in) and a zero bias; the codes keep the reference's uniform
    initialization. The default keeps PyTorch's (a third of that variance, non-zero biases)."""
    import dataclasses

    torch.manual_seed(0)
    lecun = VQGAN(dataclasses.replace(tiny_cfg, weight_init="lecun", codebook_dim=4))
    torch.manual_seed(0)
    default = VQGAN(tiny_cfg)
    layers = [m for m in lecun.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) > 20 and any(isinstance(m, torch.nn.Linear) for m in layers)  # the codebook projections too
    for m in layers:
        fan_in = m.weight[0].numel()
        assert torch.count_nonzero(m.bias) == 0
        if m.weight.numel() >= 4096:  # enough draws for the sample std to be within 10%
            assert abs(m.weight.std().item() * fan_in ** 0.5 - 1) < 0.1, m
    conv = default.encoder.down[0].block[0].conv1
    assert abs(conv.weight.std().item() * conv.weight[0].numel() ** 0.5 - 3 ** -0.5) < 0.1
    assert torch.count_nonzero(conv.bias) > 0
    codes = lecun.quantize.embedding.weight
    assert codes.abs().max() <= 1 / tiny_cfg.n_embed
    # the point of it: a random image's signal keeps its scale through the encoder's first layers
    x = torch.randn(4, 3, 32, 32)
    ratio = lambda model: (model.encoder.down[0].downsample(model.encoder.conv_in(x)).std() / x.std()).item()  # noqa: E731
    with torch.no_grad():
        assert ratio(lecun) > 0.6 > 0.4 > ratio(default)
