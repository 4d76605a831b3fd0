"""Weights in and out: model folders (save_pretrained / from_pretrained / push_to_hub, no pickle),
the EMA of the weights, fine-tuning with --init-from, and generation metrics (--npz, fid.py)."""
import dataclasses
import json
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import pretrained
from checkpoint import load_checkpoint
from config import GPTConfig
from conftest import (GPT_FLAGS, REFERENCE_TINY, TINY_FLAGS, assert_same_state, assert_user_error, save_lightning)
from discriminator import NLayerDiscriminator
from ema import EMA
from errors import UserError
from transformer import TokenLayout, VQGANTransformer
from vqgan import VQGAN


def tiny_transformer(tiny_cfg, classes=("cat", "dog"), layout=None):
    torch.manual_seed(0)
    vqgan = VQGAN(tiny_cfg)
    shape = (layout or TokenLayout(tiny_cfg.n_embed, len(classes))).gpt_shape(tiny_cfg)
    return VQGANTransformer(vqgan, GPTConfig(n_layer=1, n_head=2, n_embd=16, **shape), list(classes), layout)


@pytest.fixture
def no_pickle(monkeypatch):
    """Any unpickling inside the test fails loudly."""
    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was read")
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)


# ------------------------------------------------------------------------------ model folders
def test_a_vqgan_folder_round_trips_bit_identical_without_pickle(tiny_cfg, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = VQGAN(tiny_cfg)
    folder = model.save_pretrained(tmp_path / "m")
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    assert json.loads((folder / "config.json").read_text())["kind"] == "vqgan"
    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was read")
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = VQGAN.from_pretrained(folder)
    assert loaded.config == model.config
    assert_same_state(model.state_dict(), loaded.state_dict())
    monkeypatch.undo()
    assert_same_state(model.state_dict(), VQGAN.from_checkpoint(folder).state_dict())  # from_checkpoint takes it too


@pytest.mark.parametrize("kind", ["conditional", "reference layout"])
def test_a_transformer_folder_round_trips_bit_identical(tiny_cfg, tmp_path, kind, no_pickle):
    layout = TokenLayout(tiny_cfg.n_embed, 2, reference=True, sos_token=3) if kind == "reference layout" else None
    model = tiny_transformer(tiny_cfg, layout=layout)
    loaded = VQGANTransformer.from_pretrained(model.save_pretrained(tmp_path / "t"))
    assert loaded.classes == model.classes and loaded.layout == model.layout
    assert loaded.gpt.config == model.gpt.config and loaded.vqgan.config == model.vqgan.config
    assert_same_state(model.state_dict(), loaded.state_dict())


def test_from_pretrained_with_a_repo_id_downloads_through_the_hub(tiny_cfg, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = VQGAN(tiny_cfg)
    model.save_pretrained(tmp_path / "snapshot")
    calls = []
    monkeypatch.setattr(pretrained, "hub_download",
                        lambda repo_id, revision=None: calls.append((repo_id, revision)) or str(tmp_path / "snapshot"))
    loaded = VQGAN.from_pretrained("someone/tiny-vqgan", revision="v1")
    assert calls == [("someone/tiny-vqgan", "v1")]
    assert_same_state(model.state_dict(), loaded.state_dict())
    with pytest.raises(UserError, match="neither a folder nor a Hugging Face Hub repo id"):
        VQGAN.from_pretrained(str(tmp_path / "no" / "such" / "folder"))
    assert calls == [("someone/tiny-vqgan", "v1")]  # a path is never sent to the Hub


def test_the_hub_without_its_package_or_offline_is_one_clear_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(UserError, match="pip install huggingface_hub"):
        VQGAN.from_pretrained("someone/tiny-vqgan")
    offline = types.ModuleType("huggingface_hub")
    def snapshot_download(*args, **kwargs):
        raise OSError("Temporary failure in name resolution")
    offline.snapshot_download = snapshot_download
    monkeypatch.setitem(sys.modules, "huggingface_hub", offline)
    with pytest.raises(UserError, match="cannot fetch someone/tiny-vqgan .*offline, download the folder elsewhere"):
        VQGAN.from_pretrained("someone/tiny-vqgan")


def test_push_to_hub_uploads_a_folder_that_loads_back(tiny_cfg, monkeypatch):
    model = tiny_transformer(tiny_cfg)
    seen = {}

    class HfApi:
        def __init__(self, token=None):
            seen["token"] = token

        def create_repo(self, repo_id, private=False, exist_ok=False):
            seen["repo"] = (repo_id, private, exist_ok)
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, folder_path, repo_id, commit_message):
            seen["files"] = sorted(os.listdir(folder_path))
            seen["loaded"] = VQGANTransformer.from_pretrained(folder_path)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(HfApi=HfApi))
    url = model.push_to_hub("someone/tiny-gpt", private=True, token="t0k")
    assert url == "https://huggingface.co/someone/tiny-gpt"
    assert seen["repo"] == ("someone/tiny-gpt", True, True) and seen["token"] == "t0k"
    assert seen["files"] == ["config.json", "model.safetensors"]
    assert_same_state(model.state_dict(), seen["loaded"].state_dict())


# ---------------------------------------------------------------------------------------- EMA
def test_the_ema_update_follows_the_hand_computation(float64):
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    ema = EMA(layer, decay=0.9)
    with torch.no_grad():
        layer.weight.add_(1.0)
        layer.bias.sub_(2.0)
    ema.update(layer)  # n = 0: d = min(0.9, 1/10)
    expected_w = 0.1 * w0 + 0.9 * (w0 + 1)
    with torch.no_grad():
        layer.weight.add_(1.0)
    ema.update(layer)  # n = 1: d = min(0.9, 2/11)
    expected_w = 2 / 11 * expected_w + 9 / 11 * (w0 + 2)
    expected_b = 2 / 11 * (0.1 * b0 + 0.9 * (b0 - 2)) + 9 / 11 * (b0 - 2)
    torch.testing.assert_close(ema.weights[0], expected_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ema.weights[1], expected_b, rtol=1e-12, atol=1e-12)
    ema.updates = 500
    assert ema.current_decay() == 0.9  # the warm-up is over: the configured decay

    own = [p.detach().clone() for p in layer.parameters()]
    with ema.swapped_in(layer):
        assert torch.equal(layer.weight, ema.weights[0])
    assert all(torch.equal(p, q) for p, q in zip(layer.parameters(), own))  # its own weights back, bit for bit


def test_a_run_with_ema_validates_exports_and_evaluates_with_it(images, tmp_path, cli):
    out = tmp_path / "run"
    r = cli("training_vqgan", "--dataset-path", images, "--output-dir", out, *TINY_FLAGS, "--max-steps", "3",
            "--disc-start", "100", "--ema-decay", "0.5", "--val-fraction", "0.2", "--sample-every", "3")
    assert r.returncode == 0, r.stderr
    assert "EMA of the weights, decay 0.5" in r.stdout
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["ema"]["updates"] == 3 and ckpt["ema"]["decay"] == 0.5
    ema_model, raw_model = VQGAN.from_checkpoint(out / "checkpoints" / "last.pt"), \
        VQGAN.from_checkpoint(out / "checkpoints" / "last.pt", raw=True)
    name = "decoder.conv_out.weight"
    assert torch.equal(ema_model.state_dict()[name], ckpt["ema"]["weights"][name])
    assert torch.equal(raw_model.state_dict()[name], ckpt["model"][name])
    assert not torch.equal(ckpt["ema"]["weights"][name], ckpt["model"][name])

    r = cli("vqgan", "export", "--checkpoint", out / "checkpoints" / "last.pt", "--out", tmp_path / "folder")
    assert r.returncode == 0, r.stderr
    assert "(EMA weights)" in r.stdout
    assert_same_state(VQGAN.from_pretrained(tmp_path / "folder").state_dict(), ema_model.state_dict())
    r = cli("evaluate_vqgan", "--checkpoint", out / "checkpoints" / "last.pt", "--dataset-path", images, "--no-lpips",
            "--num-workers", "0", "--image-size", "16", "--raw-weights")
    assert r.returncode == 0, r.stderr
    assert (out / "eval" / "last-raw" / "metrics.json").exists()  # its own folder, beside the EMA's


# -------------------------------------------------------------------------------- fine-tuning
# 256 pixels as the releases, but down to 16x16 before the middle block's attention (cheap on a CPU)
REFERENCE_F16 = dataclasses.replace(REFERENCE_TINY, ch_mult=(1, 1, 1, 1, 2), attn_resolutions=())


def reference_ckpt_with_discriminator(tmp_path):
    """A taming-transformers .ckpt with the whole discriminator under loss.discriminator.*."""
    torch.manual_seed(1)
    model, disc = VQGAN(REFERENCE_F16), NLayerDiscriminator(ndf=32, n_layers=2)  # not our defaults
    state = {**model.state_dict(), **{f"loss.discriminator.{k}": v for k, v in disc.state_dict().items()},
             "loss.perceptual_loss.lin0.model.1.weight": torch.rand(1, 64, 1, 1)}
    save_lightning(tmp_path / "ref.ckpt", state)
    return tmp_path / "ref.ckpt", model, disc


def fine_tune(cli, images, out, source, *flags):
    """One step at a vanishing learning rate from `source`: the weights stay where they started."""
    r = cli("training_vqgan", "--dataset-path", images, "--output-dir", out, "--init-from", source, "--max-steps", "1",
            "--learning-rate", "1e-12", "--batch-size", "2", "--num-workers", "0", "--device", "cpu",
            "--perceptual-loss-factor", "0", "--val-fraction", "0.2", "--sample-every", "100", *flags)
    assert r.returncode == 0, r.stderr
    assert f"fine-tuning {source}" in r.stdout
    return load_checkpoint(out / "checkpoints" / "last.pt"), r


def assert_near(state, source):
    """Every weight within 1e-8 of the source's (BatchNorm's running statistics move in training)."""
    for k, v in source.items():
        if v.is_floating_point() and "running_" not in k:
            torch.testing.assert_close(state[k], v, rtol=0, atol=1e-8, msg=k)


def test_init_from_our_checkpoint_a_model_folder_and_a_reference_ckpt(images, vqgan_run, tmp_path, cli):
    source = load_checkpoint(vqgan_run.last)
    ours, r = fine_tune(cli, images, tmp_path / "a", vqgan_run.last, "--disc-start", "0")
    assert "(with its discriminator)" in r.stdout and ours["step"] == 1
    assert ours["model_config"] == source["model_config"]  # the file's architecture
    assert ours["train_config"]["disc_ndf"] == source["train_config"]["disc_ndf"]
    assert_near(ours["model"], source["model"])
    assert_near(ours["discriminator"], source["discriminator"])
    assert all(s["step"] == 1 for s in ours["opt_g"]["state"].values())  # a fresh optimizer, one step old

    folder = VQGAN.from_checkpoint(vqgan_run.last).save_pretrained(tmp_path / "folder")
    from_folder, r = fine_tune(cli, images, tmp_path / "b", folder, "--disc-layers", "1")  # 16-pixel images
    assert "with its discriminator" not in r.stdout
    assert_near(from_folder["model"], source["model"])

    path, model, disc = reference_ckpt_with_discriminator(tmp_path)
    ref, r = fine_tune(cli, images, tmp_path / "c", path, "--disc-start", "0")
    assert "(with its discriminator)" in r.stdout and ref["model_config"]["resolution"] == 256
    assert (ref["train_config"]["disc_ndf"], ref["train_config"]["disc_layers"]) == (32, 2)  # read from its weights
    assert_near(ref["model"], model.state_dict())
    assert_near(ref["discriminator"], disc.state_dict())


def test_init_from_refuses_what_would_contradict_the_file(images, vqgan_run, tmp_path, cli):
    common = ["--dataset-path", images, "--output-dir", tmp_path / "r", "--init-from", vqgan_run.last]
    assert_user_error(cli("training_vqgan", *common, "--ch", "64"), "--init-from takes the architecture")
    assert_user_error(cli("training_vqgan", *common, "--resume", "latest"), "give one of them")
    assert_user_error(cli("training_vqgan", *common[:-1], tmp_path / "missing.pt"), "does not exist")
    assert not (tmp_path / "r").exists()
    # the same command run twice with --resume auto: it starts from the weights, then resumes its run
    again = [*common, "--resume", "auto", "--num-workers", "0", "--device", "cpu", "--perceptual-loss-factor", "0",
             "--batch-size", "2", "--disc-layers", "1", "--val-fraction", "0.2", "--sample-every", "100"]
    first = cli("training_vqgan", *again, "--max-steps", "1")
    assert first.returncode == 0 and "fine-tuning" in first.stdout, first.stderr
    second = cli("training_vqgan", *again, "--max-steps", "2")
    assert second.returncode == 0 and "resumed at step 1" in second.stdout and "fine-tuning" not in second.stdout
    assert "changed on resume: init_from" not in second.stdout


def test_stage2_init_from_a_stage2_checkpoint(images, transformer_run, vqgan_run, tmp_path, cli):
    source = load_checkpoint(transformer_run.last)
    out = tmp_path / "ft"
    r = cli("training_transformer", "--dataset-path", images, "--init-from", transformer_run.last, "--output-dir", out,
            "--max-steps", "1", "--learning-rate", "1e-12", "--batch-size", "2", "--num-workers", "0", "--device",
            "cpu", "--val-fraction", "0.2", "--sample-every", "100", "--num-samples", "2")
    assert r.returncode == 0, r.stderr
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["step"] == 1 and ckpt["classes"] == source["classes"] and ckpt["train_config"]["conditional"]
    assert ckpt["model_config"] == source["model_config"]
    assert_near(ckpt["model"], source["model"])
    assert_same_state(ckpt["vqgan"], source["vqgan"])
    assert_user_error(cli("training_transformer", "--dataset-path", images, "--init-from", vqgan_run.last,
                          "--output-dir", tmp_path / "x", *GPT_FLAGS[-4:]), "fine-tuning starts from a GPT trained here")


# ------------------------------------------------------------------------- generation metrics
def test_npz_holds_the_samples_as_uint8(transformer_run, tmp_path, cli):
    common = ["--checkpoint", transformer_run.last, "--device", "cpu", "--top-k", "5", "--batch-size", "2"]
    r = cli("sample_transformer", *common, "--per-class", "2", "--npz", tmp_path / "s.npz", "--out", tmp_path / "png")
    assert r.returncode == 0, r.stderr
    array = np.load(tmp_path / "s.npz")["arr_0"]
    assert array.dtype == np.uint8 and array.shape == (4, 16, 16, 3)  # 2 classes x 2
    for i in range(4):  # the PNGs are the same images
        assert np.array_equal(np.asarray(Image.open(tmp_path / "png" / f"sample_{i:04d}.png").convert("RGB")), array[i])
    r = cli("sample_transformer", *common, "--num-samples", "3", "--npz", tmp_path / "only.npz", "--no-png",
            "--out", tmp_path / "none", "--class-label", "0")
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "only.npz")["arr_0"].shape == (3, 16, 16, 3) and not (tmp_path / "none").exists()
    assert_user_error(cli("sample_transformer", *common, "--no-png"), "give --npz FILE too")
    (tmp_path / "taken.npz").mkdir()
    assert_user_error(cli("sample_transformer", *common, "--npz", tmp_path / "taken.npz"), "is a folder")  # before sampling


@pytest.mark.slow
def test_fid_of_a_set_against_itself_is_zero_and_against_a_shifted_set_not(tmp_path, random_inception, cli):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 24, 24, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=images)
    (tmp_path / "ref").mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / "ref" / f"{i}.png")
    r = cli("fid", "--samples", tmp_path / "samples.npz", "--reference", tmp_path / "ref", "--inception-weights",
            random_inception, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    value = float(r.stdout.split("FID ")[1].split(":")[0])
    assert abs(value) < 1e-2, r.stdout
    from metrics import InceptionFID  # and a shifted set is far from it

    fid = InceptionFID(random_inception, torch.device("cpu"))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    fid.update(x, real=True)
    fid.update((x + 0.3).clamp(0, 1), real=False)
    assert fid.compute() > 1


def test_fid_refuses_what_it_cannot_measure(tmp_path, cli, monkeypatch):
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros((3, 8, 8, 3), dtype=np.float32))
    np.savez(tmp_path / "one.npz", arr_0=np.zeros((1, 8, 8, 3), dtype=np.uint8))
    np.savez(tmp_path / "ok.npz", arr_0=np.zeros((2, 8, 8, 3), dtype=np.uint8))
    assert_user_error(cli("fid", "--samples", tmp_path / "bad.npz", "--reference", tmp_path), "needs uint8")
    assert_user_error(cli("fid", "--samples", tmp_path / "one.npz", "--reference", tmp_path), "at least 2")
    assert_user_error(cli("fid", "--samples", tmp_path / "ok.npz", "--reference", tmp_path / "nope"),
                      "neither an .npz file nor a folder")
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    def offline(*args, **kwargs):
        raise OSError("Temporary failure in name resolution")
    monkeypatch.setattr(fe, "load_state_dict_from_url", offline)
    assert_user_error(cli("fid", "--samples", tmp_path / "ok.npz", "--reference", tmp_path / "ok.npz"),
                      "--inception-weights")
