"""evaluate_vqgan.py on a tiny checkpoint and an image folder made in the test (no downloads)."""
import json

import pytest
import torch

from codebook import codebook_usage
from conftest import assert_user_error, random_vgg_file, reference_vqgan, save_lightning, write_images
from data import ImageDataset, build_transform
from imagefiles import scan_images
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
    out = tmp_path / "run" / "eval" / "last"  # default: a folder per checkpoint in the run folder
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
    # an untrained model's reconstructions are another set of images: rFID well above 0 (fid.py's
    # test: a set against itself gives 0)
    assert 0 < result["ssim"] < 1 and result["lpips"] > 0 and result["rfid"] > 1


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


def test_each_checkpoint_gets_its_own_eval_folder(tmp_path, tiny_checkpoint, capsys):
    ckpt, _ = tiny_checkpoint
    snapshot = tmp_path / "run" / "checkpoints" / "step_0000002.pt"
    torch.manual_seed(1)
    other = VQGAN(VQGAN.from_checkpoint(ckpt).config)
    save_checkpoint({"kind": "vqgan", "format_version": 1, "model": other.state_dict(),
                     "model_config": other.config_dict()}, snapshot)
    common = ["--no-lpips", "--num-workers", "0", "--num-images", "4"]
    first = main(parse_args(["--checkpoint", ckpt, *common]))
    second = main(parse_args(["--checkpoint", str(snapshot), *common]))
    train = main(parse_args(["--checkpoint", ckpt, "--demo-split", "train", *common]))
    eval_dir = tmp_path / "run" / "eval"
    assert sorted(p.name for p in eval_dir.iterdir()) == ["last", "last-train", "step_0000002"]
    for name, result in (("last", first), ("step_0000002", second), ("last-train", train)):
        assert json.loads((eval_dir / name / "metrics.json").read_text()) == json.loads(json.dumps(result))
    assert first["psnr"] != second["psnr"]  # different weights, neither file overwritten
    assert str(eval_dir / "last-train" / "metrics.json") in capsys.readouterr().out  # says where it wrote


def test_a_stage2_checkpoint_evaluates_its_vqgan(tmp_path, transformer_run, vqgan_run):
    common = ["--no-lpips", "--num-workers", "0", "--num-images", "4"]
    of_stage2 = main(parse_args(["--checkpoint", str(transformer_run.last), "--out", str(tmp_path / "a"), *common]))
    of_stage1 = main(parse_args(["--checkpoint", str(vqgan_run.last), "--out", str(tmp_path / "b"), *common]))
    assert of_stage2.pop("checkpoint") != of_stage1.pop("checkpoint")
    assert of_stage2 == of_stage1  # the VQGAN inside the stage-2 checkpoint is the stage-1 one


def test_a_reference_transformer_checkpoint_evaluates_its_first_stage(tmp_path):
    vqgan, _ = reference_vqgan(tmp_path)
    state = {**{f"first_stage_model.{k}": v for k, v in vqgan.state_dict().items()},
             "transformer.tok_emb.weight": torch.randn(vqgan.config.n_embed, 8)}
    save_lightning(tmp_path / "gpt.ckpt", state)  # a Net2NetTransformer's layout (its GPT not needed here)
    data = tmp_path / "images"
    write_images(data, n=3)
    common = ["--dataset-path", str(data), "--image-size", "32", "--num-workers", "0", "--no-lpips"]
    of_transformer = main(parse_args(["--checkpoint", str(tmp_path / "gpt.ckpt"), "--out", str(tmp_path / "a"), *common]))
    of_vqgan = main(parse_args(["--checkpoint", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "b"), *common]))
    assert of_transformer.pop("checkpoint") != of_vqgan.pop("checkpoint")
    assert of_transformer == of_vqgan and of_transformer["images"] == 3
