"""Stage 2 end to end: tiny VQGAN checkpoint -> training_transformer.py -> sample_transformer.py."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from config import VQGANConfig
from conftest import ROOT, write_images
from transformer import VQGANTransformer
from utils import save_checkpoint
from vqgan import VQGAN

GPT_FLAGS = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--batch-size", "2", "--num-workers", "0",
             "--device", "cpu", "--num-samples", "2", "--lr-warmup-steps", "1"]


def run(script, *args, cwd=ROOT):
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          timeout=240, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def vqgan_ckpt(tmp_path_factory):
    """A tiny random VQGAN in this project's checkpoint format: 16x16 images, 4x4 tokens."""
    torch.manual_seed(0)
    cfg = VQGANConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, attn_resolutions=(), resolution=16,
                      z_channels=8, embed_dim=8, n_embed=32)
    model = VQGAN(cfg)
    path = tmp_path_factory.mktemp("vq") / "vqgan.pt"
    save_checkpoint({"kind": "vqgan", "model": model.state_dict(), "model_config": model.config_dict()}, path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_images(folder, n=8, size=(20, 20))  # class0/, class1/
    return folder


def test_unconditional_pipeline_and_resume(tmp_path, vqgan_ckpt, data):
    out = tmp_path / "run"
    r = run("training_transformer.py", "--dataset-path", str(data), "--checkpoint-path", str(vqgan_ckpt),
            "--output-dir", str(out), "--max-steps", "3", "--log-every", "1", "--sample-every", "3",
            "--sos-token", "0", *GPT_FLAGS)
    assert r.returncode == 0, r.stderr
    assert "--sos-token 0 is ignored" in r.stderr and "tokens cached" in r.stdout
    assert sorted(os.listdir(out / "checkpoints")) == ["last.pt", "step_0000003.pt"]
    grid = Image.open(out / "samples" / "step_0000003.png")
    assert grid.size[1] > 3 * 16  # four rows of 16-pixel images
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3] and any("val_loss" in m for m in lines)
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["kind"] == "transformer" and ckpt["classes"] == [] and ckpt["model_config"]["vocab_size"] == 33

    model = VQGANTransformer.from_checkpoint(out / "checkpoints" / "last.pt")
    images = model.indices_to_images(model.sample(2))
    assert images.shape == (2, 3, 16, 16) and images.min() >= -1 and images.max() <= 1

    samples = tmp_path / "samples"
    r = run("sample_transformer.py", "--checkpoint", str(out / "checkpoints" / "last.pt"), "--num-samples", "3",
            "--batch-size", "2", "--top-k", "5", "--out", str(samples), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(samples)) == ["grid.png", "sample_0000.png", "sample_0001.png", "sample_0002.png"]
    assert Image.open(samples / "sample_0000.png").size == (16, 16)
    r = run("sample_transformer.py", "--checkpoint", str(out / "checkpoints" / "last.pt"), "--num-samples", "1",
            "--grid", "6", "8", "--out", str(tmp_path / "big"), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "big" / "sample_0000.png").size == (32, 24)

    r = run("training_transformer.py", "--dataset-path", str(data), "--checkpoint-path", str(vqgan_ckpt),
            "--output-dir", str(out), "--max-steps", "5", "--log-every", "1", "--resume", "latest", *GPT_FLAGS)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3, 4, 5]


def test_conditional_pipeline_and_bad_inputs(tmp_path, vqgan_ckpt, data):
    out = tmp_path / "run"
    r = run("training_transformer.py", "--dataset-path", str(data), "--vqgan-checkpoint", str(vqgan_ckpt),
            "--output-dir", str(out), "--max-steps", "2", "--conditional", "--augment", *GPT_FLAGS)
    assert r.returncode == 0, r.stderr
    assert "2 classes" in r.stdout and "tokens cached" not in r.stdout
    last = str(out / "checkpoints" / "last.pt")
    assert torch.load(last, weights_only=True)["classes"] == ["class0", "class1"]
    r = run("sample_transformer.py", "--checkpoint", last, "--num-samples", "2", "--class-label", "class1",
            "--cfg-scale", "2", "--out", str(tmp_path / "s"), "--device", "cpu")
    assert r.returncode == 0, r.stderr

    def fails(expected, *cmd):
        r = run(*cmd)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr and expected in r.stderr

    fails("not one of this model's classes", "sample_transformer.py", "--checkpoint", last, "--class-label", "cat",
          "--out", str(tmp_path / "x1"))
    fails("not known to this model", "sample_transformer.py", "--checkpoint", last, "--class-label", "7",
          "--out", str(tmp_path / "x2"))
    fails("smaller than the training grid", "sample_transformer.py", "--checkpoint", last, "--grid", "2", "8",
          "--out", str(tmp_path / "x3"))
    fails("not a stage-2 (transformer) checkpoint", "sample_transformer.py", "--checkpoint", str(vqgan_ckpt),
          "--out", str(tmp_path / "x4"))
    fails("keeps no token", "sample_transformer.py", "--checkpoint", last, "--top-k", "0", "--out", str(tmp_path / "x5"))
    assert not any((tmp_path / f"x{i}").exists() for i in range(1, 6))  # nothing written half-way
    fails("not a VQGAN checkpoint", "training_transformer.py", "--dataset-path", str(data), "--vqgan-checkpoint",
          last, "--output-dir", str(tmp_path / "r2"), *GPT_FLAGS)
    # resuming a conditional run on a folder with other classes
    other = tmp_path / "other"
    write_images(other / "x", n=2, size=(20, 20))
    write_images(other / "y", n=2, size=(20, 20))
    fails("differ from the checkpoint's", "training_transformer.py", "--dataset-path", str(other),
          "--vqgan-checkpoint", str(vqgan_ckpt), "--output-dir", str(out), "--max-steps", "4", "--conditional",
          "--resume", "latest", *GPT_FLAGS)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (i * 50, 0, 0)).save(flat / f"{i}.png")
    fails("first-level subfolder", "training_transformer.py", "--dataset-path", str(flat),
          "--vqgan-checkpoint", str(vqgan_ckpt), "--output-dir", str(tmp_path / "r3"), "--conditional", *GPT_FLAGS)


def test_demo_without_stage1_says_what_to_run(tmp_path):
    r = run("training_transformer.py", "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 2 and "run `python training_vqgan.py` first" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
