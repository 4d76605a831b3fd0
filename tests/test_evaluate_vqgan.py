"""evaluate_vqgan.py on a tiny checkpoint and an image folder made in the test (no downloads)."""
import json

import pytest
import torch

from codebook import codebook_usage
from conftest import assert_user_error, random_vgg_file, reference_vqgan, write_images
from data import ImageDataset, build_transform, scan_images
from evaluate_vqgan import main, parse_args
from metrics import psnr
from checkpoint import save_checkpoint
from vqgan import VQGAN


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_cfg):
    torch.manual_seed(0)
    model = VQGAN(tiny_cfg)
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True)
    save_checkpoint({"kind": "vqgan", "format_version": 1, "model": model.state_dict(),
                     "model_config": model.config_dict()}, path)
    return str(path), model.eval()


def test_evaluation_reports_every_metric(tmp_path, tiny_checkpoint, random_inception, capsys):
    ckpt, model = tiny_checkpoint
    data = tmp_path / "images"
    write_images(data, n=5)
    vgg, _ = random_vgg_file(tmp_path)
    result = main(parse_args(["--checkpoint", ckpt, "--dataset-path", str(data), "--batch-size", "2",
                              "--num-workers", "0", "--vgg-weights", str(vgg), "--inception-weights", random_inception]))
    out = tmp_path / "run" / "eval"  # default: next to the run's checkpoints/
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(result))
    assert (out / "reconstructions.png").is_file()
    table = capsys.readouterr().out
    for row in ("PSNR (dB)", "SSIM", "LPIPS", "rFID", "codebook usage", "perplexity"):
        assert row in table
    # the same figures computed here directly, over all five images
    ds = ImageDataset(scan_images(str(data)), build_transform(32, False), 0)
    x = torch.stack([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        x_rec, indices, _ = model(x)
    usage, perplexity = codebook_usage(indices, 64)
    assert result["images"] == 5 and result["n_embed"] == 64
    assert result["codebook_usage"] == usage.item()  # k / 64 on both sides: exact
    assert result["codes_used"] == int(round(usage.item() * 64))
    assert result["perplexity"] == pytest.approx(perplexity.item(), rel=1e-4)
    assert result["psnr"] == pytest.approx(psnr(x, x_rec.clamp(-1, 1)).mean().item(), abs=1e-3)
    assert 0 < result["ssim"] < 1 and result["lpips"] > 0 and result["rfid"] >= 0


def test_evaluation_cli_errors_and_demo_set(tmp_path, tiny_checkpoint, cli):
    ckpt, _ = tiny_checkpoint
    run = lambda *a: cli("evaluate_vqgan", "--checkpoint", ckpt, "--no-lpips", "--num-workers", "0", *a)  # noqa: E731
    assert_user_error(run("--image-size", "33"), "multiple")
    assert_user_error(run("--inception-weights", tmp_path / "nope.pth"), "torch-fidelity")
    demo = run("--num-images", "6", "--out", tmp_path / "demo_eval")
    assert demo.returncode == 0, demo.stderr
    result = json.loads((tmp_path / "demo_eval" / "metrics.json").read_text())
    assert result["images"] == 6 and result["lpips"] is None and result["rfid"] is None


def test_evaluation_of_an_official_checkpoint(tmp_path):
    model, ckpt = reference_vqgan(tmp_path)  # a taming-transformers .ckpt, Lightning layout
    data = tmp_path / "images"
    write_images(data, n=3)
    result = main(parse_args(["--checkpoint", str(ckpt), "--dataset-path", str(data), "--image-size", "32",
                              "--num-workers", "0", "--no-lpips", "--out", str(tmp_path / "eval")]))
    assert result["images"] == 3 and result["n_embed"] == model.config.n_embed
    assert (tmp_path / "eval" / "reconstructions.png").is_file()


def test_demo_split_train_gives_fixed_crops_of_the_trained_parts():
    from evaluate_vqgan import build_dataset

    def first(split):
        dataset, description = build_dataset(parse_args(["--checkpoint", "x", "--num-images", "4", "--demo-split", split]),
                                             32, 3)
        return torch.stack([dataset[i] for i in range(len(dataset))]), description

    train, train_desc = first("train")
    held_out, held_out_desc = first("held-out")
    assert train.shape == held_out.shape == (4, 3, 32, 32)
    assert "trained on" in train_desc and "held-out" in held_out_desc
    assert not torch.equal(train, held_out)
    assert torch.equal(train, first("train")[0])  # the same crops every time
