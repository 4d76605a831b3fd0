"""LPIPS: reference names, metric properties, and the loading of its weights (no download)."""
import pytest
import torch

from checkpoint import load_checkpoint
from conftest import random_vgg_file, reference_shapes
from errors import UserError
from lpips import LPIPS, VGGWeightsUnavailable, lin_weights_path, load_lpips, load_vgg_state


@pytest.fixture
def metric(tmp_path):
    path, _ = random_vgg_file(tmp_path)
    return load_lpips(str(path), allow_download=False)


def test_state_dict_matches_reference():
    ours = {k: list(v.shape) for k, v in LPIPS().state_dict().items()}
    assert ours == reference_shapes("lpips")


def test_linear_weights_come_from_the_installed_lpips_package():
    lin = load_checkpoint(str(lin_weights_path()))
    assert sorted(lin) == [f"lin{k}.model.1.weight" for k in range(5)]
    assert all((w >= 0).all() for w in lin.values())


def test_loaded_weights_are_the_files(tmp_path):
    path, state = random_vgg_file(tmp_path)
    model = load_lpips(str(path), allow_download=False)
    assert torch.equal(getattr(model.net.slice2, "5").weight, state["features.5.weight"])  # copies: exact
    assert torch.equal(getattr(model.net.slice5, "28").bias, state["features.28.bias"])
    assert torch.equal(model.lin3.model[1].weight, load_checkpoint(str(lin_weights_path()))["lin3.model.1.weight"])
    assert all(not p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training  # a fixed metric: dropout never active


def test_metric_properties(metric):
    torch.manual_seed(1)
    x, y = torch.rand(3, 3, 32, 32) * 2 - 1, torch.rand(3, 3, 32, 32) * 2 - 1
    d_xy = metric(x, y)
    assert d_xy.shape == (3, 1, 1, 1)
    assert torch.all(metric(x, x) == 0)
    torch.testing.assert_close(d_xy, metric(y, x), rtol=1e-5, atol=1e-6)  # float32: the two sides sum alike
    assert torch.all(d_xy > 0)
    # closer images are closer
    assert torch.all(metric(x, x + 0.01 * (y - x)) < d_xy)


def test_gradient_flows_to_input_only(metric):
    x = (torch.rand(1, 3, 32, 32) * 2 - 1).requires_grad_()
    metric(x, torch.zeros(1, 3, 32, 32)).sum().backward()
    assert x.grad.abs().sum() > 0
    params = list(metric.parameters())
    assert len(params) == 2 * 13 + 5 and all(p.grad is None for p in params)  # VGG16's 13 convs, 5 linear layers


def test_missing_or_wrong_vgg_weights_explain_the_way_out(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_cache"))
    with pytest.raises(VGGWeightsUnavailable) as e:
        load_vgg_state(None, allow_download=False)
    text = str(e.value)
    assert "--vgg-weights" in text and "--perceptual-loss-factor 0" in text and str(tmp_path / "empty_cache") in text
    with pytest.raises(VGGWeightsUnavailable, match="is not a file"):
        load_vgg_state(str(tmp_path / "nope.pth"))
    path, state = random_vgg_file(tmp_path)
    del state["features.28.weight"]
    torch.save(state, path)
    with pytest.raises(UserError, match="Missing key"):
        load_lpips(str(path))
