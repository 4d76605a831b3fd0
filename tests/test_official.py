"""taming-transformers checkpoints: tiny random models saved in the reference's Lightning layout
(with a callbacks entry keyed by a class whose module is gone when loading) load safely, give the
same state and outputs, and sample the same tokens as the reference's sampling loop."""
import json
import pathlib
import zipfile
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
import yaml

from checkpoint import load_checkpoint
from config import GPTConfig, VQGANConfig
from conftest import REFERENCE_TINY as TINY
from conftest import assert_user_error, reference_vqgan, save_lightning
from errors import UserError
from lpips import LPIPS, load_lpips
from official import infer_vqgan_config
from transformer import TokenLayout, VQGANTransformer
from vqgan import VQGAN


def ddconfig_yaml(path, cfg: VQGANConfig, target="taming.models.vqgan.VQModel"):
    params = {"embed_dim": cfg.embed_dim, "n_embed": cfg.n_embed,
              "ddconfig": {"double_z": False, "z_channels": cfg.z_channels, "resolution": cfg.resolution,
                           "in_channels": cfg.in_channels, "out_ch": cfg.out_channels, "ch": cfg.ch,
                           "ch_mult": list(cfg.ch_mult), "num_res_blocks": cfg.num_res_blocks,
                           "attn_resolutions": list(cfg.attn_resolutions), "dropout": 0.0}}
    path.write_text(yaml.safe_dump({"model": {"target": target, "params": params}}))
    return params


def test_reference_vqgan_loads_bit_identical_with_inferred_or_yaml_config(tmp_path):
    original, path = reference_vqgan(tmp_path)
    with pytest.raises(Exception):  # what plain weights-only loading says about such a file
        torch.load(path, weights_only=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    ddconfig_yaml(tmp_path / "model.yaml", TINY)
    for config in (None, str(tmp_path / "model.yaml")):
        loaded = VQGAN.from_checkpoint(path, config=config)
        assert loaded.config == TINY
        assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), loaded.state_dict().values()))
        for a, b in zip(original(x), loaded(x)):
            assert torch.equal(a, b)


def test_shape_inference_recovers_the_release_configuration():
    with torch.device("meta"):
        state = VQGAN(VQGANConfig(legacy_beta=True)).state_dict()  # ImageNet f16-1024
    assert infer_vqgan_config(state) == VQGANConfig(legacy_beta=True)
    with torch.device("meta"):  # a Gumbel f8-like layout
        gumbel = VQGANConfig(ch_mult=(1, 1, 2, 4), attn_resolutions=(32,), n_embed=8192, legacy_beta=True,
                             quantizer="gumbel")
        assert infer_vqgan_config(VQGAN(gumbel).state_dict()) == gumbel


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    model = VQGAN(TINY)
    state = dict(model.state_dict())
    del state["decoder.conv_out.bias"]
    state["decoder.extra.weight"] = torch.zeros(1)
    save_lightning(tmp_path / "bad.ckpt", state)
    ddconfig_yaml(tmp_path / "model.yaml", TINY)
    with pytest.raises(UserError, match=r"missing decoder\.conv_out\.bias; unexpected decoder\.extra\.weight"):
        VQGAN.from_checkpoint(tmp_path / "bad.ckpt", config=str(tmp_path / "model.yaml"))


def test_gumbel_vqgan_loads_and_round_trips(tmp_path):
    cfg = replace(TINY, quantizer="gumbel")
    original, path = reference_vqgan(tmp_path, cfg)
    assert {"quantize.proj.weight", "quantize.proj.bias", "quantize.embed.weight"} <= set(original.state_dict())
    ddconfig_yaml(tmp_path / "gumbel.yaml", cfg, target="taming.models.vqgan.GumbelVQ")
    loaded = VQGAN.from_checkpoint(path, config=str(tmp_path / "gumbel.yaml"))
    assert loaded.config.quantizer == "gumbel"
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z_q, indices, _ = loaded.encode(x)
    assert indices.shape == (2, 16, 16) and indices.max() < 24
    assert torch.equal(loaded.decode_indices(indices), loaded.decode(z_q))  # eval: z_q is the code itself
    assert torch.equal(loaded(x)[0], original(x)[0])
    logits = loaded.quantize.proj(loaded.quant_conv(loaded.encoder(x)))
    assert torch.equal(indices, logits.argmax(1))  # eval: the most likely code


def test_malicious_pickle_does_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    model = VQGAN(TINY)
    torch.save({"state_dict": model.state_dict(), "payload": Payload()}, tmp_path / "evil.ckpt")
    loaded = VQGAN.from_checkpoint(tmp_path / "evil.ckpt")  # loads the weights, ignores the payload
    assert not marker.exists()
    assert torch.equal(loaded.decoder.conv_out.weight, model.decoder.conv_out.weight)
    assert "placeholder" in repr(load_checkpoint(tmp_path / "evil.ckpt")["payload"])
    assert not marker.exists()


def test_convert_writes_a_weights_only_checkpoint(tmp_path, cli):
    original, path = reference_vqgan(tmp_path)
    out = tmp_path / "converted.pt"
    r = cli("vqgan", "convert", "--taming-ckpt", path, "--out", out)
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["kind"] == "vqgan" and ckpt["model_config"]["n_embed"] == 24
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(VQGAN.from_checkpoint(out)(x)[0], original(x)[0])
    r = cli("vqgan", "convert", "--taming-ckpt", tmp_path / "nope.ckpt", "--out", out)
    assert_user_error(r, "does not exist")


def test_convert_writes_the_format_its_extension_names(tmp_path, cli):
    from safetensors import safe_open
    from safetensors.torch import load_file

    original, path = reference_vqgan(tmp_path)
    out = tmp_path / "st" / "vqgan.safetensors"  # its folder is made, as the README's command needs
    r = cli("vqgan", "convert", "--taming-ckpt", path, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "config.json" in r.stdout
    with open(out, "rb") as f:
        assert f.read(2) != b"PK" and not zipfile.is_zipfile(out)  # not torch.save's zip of pickles
    tensors = load_file(out)  # the safetensors library itself reads it
    assert tensors.keys() == original.state_dict().keys()
    assert all(torch.equal(tensors[k], v) for k, v in original.state_dict().items())
    config = json.loads((out.parent / "config.json").read_text())
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["checkpoint"]) == config
    assert config["kind"] == "vqgan" and config["model_config"]["n_embed"] == 24
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    loaded = VQGAN.from_checkpoint(out)
    assert loaded.config == original.config and torch.equal(loaded(x)[0], original(x)[0])
    # another model's config.json beside the file is never overwritten
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"kind": "something else"}')
    assert_user_error(cli("vqgan", "convert", "--taming-ckpt", path, "--out", tmp_path / "other" / "v.safetensors"),
                      "describes another model")
    assert not (tmp_path / "other" / "v.safetensors").exists()
    # an extension that names no format is refused before anything is read or written
    for name in ("v.bin", "v"):
        assert_user_error(cli("vqgan", "convert", "--taming-ckpt", path, "--out", tmp_path / name), "extension")
        assert not (tmp_path / name).exists()


def test_a_damaged_safetensors_file_is_one_message(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_checkpoint(bad)


def test_lpips_weights_from_a_reference_checkpoint(tmp_path):
    torch.manual_seed(0)
    lp = LPIPS()
    for p in lp.parameters():
        p.data.normal_(0, 0.05)
    state = {f"loss.perceptual_loss.{k}": v for k, v in lp.state_dict().items()}
    save_lightning(tmp_path / "vq.ckpt", {**VQGAN(TINY).state_dict(), **state})
    loaded = load_lpips(str(tmp_path / "vq.ckpt"), allow_download=False)
    for (k, a), b in zip(lp.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k  # VGG16 and the linear layers, not the lpips package's


# ------------------------------------------------------------------------------ transformers
SMALL = VQGANConfig(ch=32, ch_mult=(1, 1, 1, 2), num_res_blocks=1, attn_resolutions=(), resolution=32,
                    z_channels=8, embed_dim=8, n_embed=40, legacy_beta=True)  # 4x4 tokens


def reference_transformer(tmp_path, cond):
    """A Net2NetTransformer-style checkpoint and its YAML; vocab = codes, like the releases."""
    torch.manual_seed(1)
    vqgan = VQGAN(SMALL)
    n_classes = cond.get("n_classes", 0)
    gpt = VQGANTransformer(vqgan, GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32),
                           [str(k) for k in range(n_classes)], TokenLayout(40, n_classes, reference=True)).gpt
    state = {**{f"first_stage_model.{k}": v for k, v in vqgan.state_dict().items()},
             **{f"transformer.{k}": v for k, v in gpt.state_dict().items()},
             **{f"transformer.blocks.{i}.attn.mask": torch.ones(1, 1, 16, 16).tril() for i in range(2)}}
    save_lightning(tmp_path / "gpt.ckpt", state)
    first = ddconfig_yaml(tmp_path / "first.yaml", SMALL)
    params = {"transformer_config": {"target": "taming.modules.transformer.mingpt.GPT",
                                     "params": {"vocab_size": 40, "block_size": 16, "n_layer": 2, "n_head": 2,
                                                "n_embd": 32}},
              "first_stage_config": {"target": "taming.models.vqgan.VQModel", "params": first},
              "cond_stage_config": ({"target": "taming.modules.util.Labelator", "params": cond}
                                    if "n_classes" in cond else "__is_unconditional__")}
    (tmp_path / "gpt.yaml").write_text(yaml.safe_dump({"model": {"params": params}}))
    return gpt, tmp_path / "gpt.ckpt", str(tmp_path / "gpt.yaml")


def reference_sampling(gpt, first_token: int, n: int, steps: int, top_k, generator):
    """The reference's sampling loop: no cache, full forward each step, top-k by threshold."""
    x = torch.full((n, 1), first_token, dtype=torch.long)
    for _ in range(steps):
        logits = gpt(x)[:, -1, :]
        if top_k is not None:
            v, _ = torch.topk(logits, top_k)
            logits = logits.clone()
            logits[logits < v[:, [-1]]] = -float("inf")
        ix = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
        x = torch.cat((x, ix), dim=1)
    return x[:, 1:]


@pytest.mark.parametrize("cond", [{}, {"n_classes": 10}])
def test_reference_transformer_samples_the_reference_tokens(tmp_path, cond):
    gpt, path, config = reference_transformer(tmp_path, cond)
    model = VQGANTransformer.from_checkpoint(path, config=config)
    assert model.layout.reference and model.gpt.config.vocab_size == 40
    assert all(torch.equal(a, b) for a, b in zip(gpt.state_dict().values(), model.gpt.state_dict().values()))
    label = 7 if cond else None
    first = 7 if cond else 0  # class k is token k; the start token shares id 0 with code 0
    # cached and uncached logits agree up to rounding: in float64 no draw can fall between them
    model.double()
    gpt.double()
    for top_k in (None, 5):
        ours = model.sample(3, class_labels=label, top_k=top_k, generator=torch.Generator().manual_seed(4))
        theirs = reference_sampling(gpt.eval(), first, 3, 16, top_k, torch.Generator().manual_seed(4))
        assert torch.equal(ours.flatten(1), theirs)
    if cond:
        with pytest.raises(ValueError, match="guidance"):
            model.sample(1, class_labels=1, cfg_scale=2.0)
    images = model.indices_to_images(model.sample(1, class_labels=label))
    assert images.shape == (1, 3, 32, 32)


def test_reference_transformer_without_config_needs_known_width(tmp_path):
    _, path, _ = reference_transformer(tmp_path, {})
    with pytest.raises(UserError, match="attention heads"):
        VQGANTransformer.from_checkpoint(path)  # width 32 is no released model's: n_head unknown
