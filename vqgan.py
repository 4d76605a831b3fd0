"""VQGAN: encoder, vector quantizer and decoder (Esser et al. 2021, Sec. 3.1).

    x (B, 3, H, W) in [-1, 1] -> encoder -> quant_conv -> quantize -> post_quant_conv -> decoder

`VQGAN(cfg).state_dict()` has exactly the reference's names and shapes, so the official weights
load by name. Usage from a notebook:

    from vqgan import VQGAN
    model = VQGAN.from_checkpoint("runs/vqgan/checkpoints/last.pt")   # or VQGAN.from_pretrained(folder)
    x_rec, indices, q_loss = model(x)

`python vqgan.py convert` turns a taming-transformers checkpoint into this project's format;
`python vqgan.py export` turns a training checkpoint (either stage) into a model folder.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from checkpoint import load_checkpoint, load_strict, require_entries, save_checkpoint
from codebook import GumbelQuantizer, VectorQuantizer
from config import VQGANConfig, config_to_dict, model_config_from_dict
from decoder import Decoder
from encoder import Encoder
from errors import UserError
from flags import add_fields, given_values, option
from helper import lecun_init_
from ema import averaged_state
from official import checkpoint_kind, infer_vqgan_config, sub_state, transformer_vqgan_config, vqgan_config_from_yaml
from pretrained import PretrainedMixin
from utils import log, run_cli


class Reconstruction(NamedTuple):
    """What VQGAN.forward returns: the three values of Quantized with the image in place of z_q."""
    x_rec: torch.Tensor  # (B, C, H, W)
    indices: torch.Tensor  # (B, h, w) long
    q_loss: torch.Tensor  # scalar


class VQGAN(PretrainedMixin, nn.Module):
    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        arch = dict(ch=config.ch, ch_mult=config.ch_mult, num_res_blocks=config.num_res_blocks,
                    attn_resolutions=config.attn_resolutions, resolution=config.resolution,
                    z_channels=config.z_channels, dropout=config.dropout,
                    out_norm_groups=config.out_norm_groups)
        self.encoder = Encoder(in_channels=config.in_channels, **arch)
        self.decoder = Decoder(out_channels=config.out_channels, **arch)
        if config.quantizer == "gumbel":  # the reference feeds it quant_conv's output, sized z_channels
            self.quantize = GumbelQuantizer(num_hiddens=config.z_channels, embed_dim=config.embed_dim,
                                            n_embed=config.n_embed, kl_weight=config.gumbel_kl_weight)
        else:
            self.quantize = VectorQuantizer(
                n_embed=config.n_embed, embed_dim=config.embed_dim, beta=config.beta, legacy=config.legacy_beta,
                l2_norm=config.codebook_l2_norm, codebook_dim=config.codebook_dim, ema_decay=config.codebook_ema,
                kmeans_init=config.codebook_kmeans_init, restart_after=config.codebook_restart_after,
                entropy_weight=config.codebook_entropy_weight, warmup=config.codebook_warmup)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        if config.weight_init == "lecun":
            lecun_init_(self)  # the codebook keeps its own initialization (an Embedding)

    def _check_input(self, x: torch.Tensor) -> None:
        f = self.config.downsample_factor
        if x.dim() != 4 or x.shape[1] != self.config.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"VQGAN expects images of shape (B, {self.config.in_channels}, H, W) with H and W "
                             f"divisible by {f}; got {tuple(x.shape)}. Resize or crop the input.")

    def encode(self, x: torch.Tensor, return_stats: bool = False):
        """x (B, C, H, W) -> Quantized(z_q (B, embed_dim, H/f, W/f), indices (B, H/f, W/f), q_loss);
        with return_stats also the codebook statistics for quantize.update()."""
        self._check_input(x)
        return self.quantize(self.quant_conv(self.encoder(x)), return_stats=return_stats)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """z_q (B, embed_dim, h, w) -> image (B, C, h*f, w*f)."""
        return self.decoder(self.post_quant_conv(z_q))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, h, w) long -> image (B, C, h*f, w*f)."""
        return self.decode(self.quantize.lookup(indices))

    def forward(self, x: torch.Tensor, return_stats: bool = False):
        """x -> Reconstruction(x_rec, indices, q_loss); with return_stats also the codebook
        statistics (training: they go to quantize.update() after a successful optimizer step)."""
        if return_stats:
            (z_q, indices, q_loss), stats = self.encode(x, return_stats=True)
            return Reconstruction(self.decode(z_q), indices, q_loss), stats
        z_q, indices, q_loss = self.encode(x)
        return Reconstruction(self.decode(z_q), indices, q_loss)

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight at which the adaptive GAN weight compares gradient norms (Eq. 7)."""
        return self.decoder.conv_out.weight

    def config_dict(self) -> dict:
        return config_to_dict(self.config)

    def checkpoint_entries(self) -> tuple[dict, dict]:
        """(description, weights) of this model: what save_pretrained writes."""
        return {"kind": "vqgan", "format_version": 1, "model_config": self.config_dict()}, self.state_dict()

    @classmethod
    def from_checkpoint(cls, path, config: Optional[str] = None, map_location=None, raw: bool = False) -> "VQGAN":
        """Load a checkpoint written by this project (training checkpoint, weights-only file with
        'model' and 'model_config', or a model folder's .safetensors), or a taming-transformers
        `.ckpt` (architecture from its YAML `config`, else inferred from the weights). A stage-2
        checkpoint, ours or the reference's, gives the VQGAN it was trained over. A checkpoint with
        an EMA of the weights (--ema-decay) gives the averaged weights unless `raw`. Returns the
        model in eval mode."""
        ckpt = load_checkpoint(path, map_location=map_location or "cpu")
        return cls.from_checkpoint_dict(ckpt, str(path), config, raw)

    @classmethod
    def from_checkpoint_dict(cls, ckpt: dict, path: str, config: Optional[str] = None, raw: bool = False) -> "VQGAN":
        kind = checkpoint_kind(ckpt)
        if kind == "transformer":  # a stage-2 checkpoint carries its (frozen) VQGAN
            return vqgan_from_stage2(ckpt, str(path))
        if kind == "reference-transformer":  # its first_stage_model
            state = ckpt["state_dict"]
            model = cls(transformer_vqgan_config(state, config))
            load_strict(model, sub_state(state, "first_stage_model."), f"{path} (first_stage_model)")
            return model.eval()
        if kind == "reference-vqgan":
            state = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("loss.")}
            model = cls(vqgan_config_from_yaml(config) if config else infer_vqgan_config(state))
            load_strict(model, state, str(path))
            return model.eval()
        if kind != "vqgan" or "model" not in ckpt or "model_config" not in ckpt:
            raise UserError(f"{path} is not a VQGAN checkpoint (kind '{kind}'): give the stage-1 "
                            "checkpoint, e.g. runs/vqgan/checkpoints/last.pt.")
        model = cls(model_config_from_dict(VQGANConfig, ckpt["model_config"]))
        load_strict(model, averaged_state(ckpt, raw), str(path) + ("" if raw or "ema" not in ckpt else " (EMA)"))
        return model.eval()


def stage2_entries(ckpt: dict) -> dict:
    """A stage-2 checkpoint dict with the GPT's weights under "model" and the VQGAN's under
    "vqgan": a model folder stores both in one file, prefixed "gpt." and "vqgan."."""
    model = ckpt.get("model")
    if "vqgan" in ckpt or not isinstance(model, dict) or not any(k.startswith("vqgan.") for k in model):
        return ckpt
    return {**ckpt, "model": sub_state(model, "gpt."), "vqgan": sub_state(model, "vqgan.")}


def vqgan_from_stage2(ckpt: dict, what: str = "the stage-2 checkpoint") -> VQGAN:
    """The frozen first stage stored inside one of our stage-2 checkpoints."""
    ckpt = stage2_entries(ckpt)
    require_entries(ckpt, ("vqgan", "vqgan_config"), what, "stage-2 checkpoint")
    vqgan = VQGAN(model_config_from_dict(VQGANConfig, ckpt["vqgan_config"]))
    load_strict(vqgan, ckpt["vqgan"], f"{what} (its VQGAN)")
    return vqgan.eval()


WEIGHT_SUFFIXES = (".pt", ".safetensors")


@dataclass
class ConvertConfig:
    """`python vqgan.py convert`: a taming-transformers VQGAN as this project's weights file."""
    taming_ckpt: Optional[str] = option(None, "the reference's checkpoint (.ckpt)", required=True)
    out: Optional[str] = option(None, "output file, loadable with VQGAN.from_checkpoint: NAME.pt (ours, weights-only) "
                                "or NAME.safetensors (config.json written beside it)", required=True)
    config: Optional[str] = option(None, "its YAML config (default: infer the architecture from the weights)")


def convert(args: ConvertConfig) -> VQGANConfig:
    """Write a taming-transformers VQGAN as this project's weights file (model + config), in the
    format the --out extension names."""
    if Path(args.out).suffix not in WEIGHT_SUFFIXES:
        raise UserError(f"--out {args.out}: the extension names the format, .pt (this project's) or .safetensors; "
                        f"'{Path(args.out).suffix or 'none'}' is neither.")
    model = VQGAN.from_checkpoint(args.taming_ckpt, config=args.config)
    try:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # e.g. --out f16_16384/model.safetensors
        save_checkpoint({"kind": "vqgan", "format_version": 1, "model": model.state_dict(),
                         "model_config": model.config_dict()}, args.out)
    except OSError as e:
        raise UserError(f"cannot write {args.out} ({e.strerror}): choose a writable --out path.") from None
    beside = f" and {Path(args.out).with_name('config.json')}" if args.out.endswith(".safetensors") else ""
    log(f"wrote {args.out}{beside}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"{model.config.n_embed} codes, f{model.config.downsample_factor}")
    return model.config


@dataclass
class ExportConfig:
    """`python vqgan.py export`: a checkpoint of either stage as a model folder (config.json and model.safetensors) for from_pretrained and the Hub."""
    checkpoint: Optional[str] = option(None, "a stage-1 or stage-2 checkpoint (ours, or a taming-transformers .ckpt)", required=True)
    out: Optional[str] = option(None, "the folder to write (created when needed)", required=True)
    config: Optional[str] = option(None, "YAML config of a taming-transformers checkpoint (default: inferred)")
    raw_weights: bool = option(False, "export the trained weights, not their EMA (when the run kept one)")


def export(args: ExportConfig) -> Path:
    """Write the model of a checkpoint as a folder: a VQGAN, or a VQGANTransformer (GPT and its
    VQGAN) for stage-2 checkpoints. The EMA weights when the checkpoint has them."""
    from transformer import VQGANTransformer  # it imports this module

    ckpt = load_checkpoint(args.checkpoint)
    stage2 = checkpoint_kind(ckpt) in ("transformer", "reference-transformer")
    cls = VQGANTransformer if stage2 else VQGAN
    model = cls.from_checkpoint_dict(ckpt, args.checkpoint, args.config, args.raw_weights)
    folder = model.save_pretrained(args.out)
    which = "" if "ema" not in ckpt else (" (trained weights)" if args.raw_weights else " (EMA weights)")
    log(f"wrote {folder / 'config.json'} and {folder / 'model.safetensors'}: a {cls.__name__}{which}; load it with "
        f"{cls.__name__}.from_pretrained({str(folder)!r})")
    return folder


COMMANDS = {"convert": (ConvertConfig, convert), "export": (ExportConfig, export)}


def parse_args(argv: Optional[list[str]] = None):
    parser = argparse.ArgumentParser(description="VQGAN tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (config_cls, _) in COMMANDS.items():
        add_fields(sub.add_parser(name, help=config_cls.__doc__.split(": ", 1)[1]), config_cls)
    given = given_values(parser.parse_args(argv))
    return COMMANDS[given.pop("command")][0](**given)


def run(args):
    return convert(args) if isinstance(args, ConvertConfig) else export(args)


def cli(argv=None) -> int:
    """The command line: exit code 0, or 2 for a user error (one message, no traceback)."""
    return run_cli(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(cli())
