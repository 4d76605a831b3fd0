"""VQGAN: encoder, vector quantizer and decoder (Esser et al. 2021, Sec. 3.1).

    x (B, 3, H, W) in [-1, 1] -> encoder -> quant_conv -> quantize -> post_quant_conv -> decoder

`VQGAN(cfg).state_dict()` has exactly the reference's names and shapes, so the official weights
load by name. Usage from a notebook:

    from vqgan import VQGAN
    model = VQGAN.from_checkpoint("runs/vqgan/checkpoints/last.pt")
    x_rec, indices, q_loss = model(x)
"""
from __future__ import annotations

import torch
import torch.nn as nn

from codebook import VectorQuantizer
from config import UserError, VQGANConfig, config_to_dict, model_config_from_dict
from decoder import Decoder
from encoder import Encoder


class VQGAN(nn.Module):
    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        arch = dict(ch=config.ch, ch_mult=config.ch_mult, num_res_blocks=config.num_res_blocks,
                    attn_resolutions=config.attn_resolutions, resolution=config.resolution,
                    z_channels=config.z_channels, dropout=config.dropout)
        self.encoder = Encoder(in_channels=config.in_channels, **arch)
        self.decoder = Decoder(out_channels=config.out_channels, **arch)
        self.quantize = VectorQuantizer(n_embed=config.n_embed, embed_dim=config.embed_dim,
                                        beta=config.beta, legacy=config.legacy_beta)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    def _check_input(self, x: torch.Tensor) -> None:
        f = self.config.downsample_factor
        if x.dim() != 4 or x.shape[1] != self.config.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"VQGAN expects images of shape (B, {self.config.in_channels}, H, W) with H and W "
                             f"divisible by {f}; got {tuple(x.shape)}. Resize or crop the input.")

    def encode(self, x: torch.Tensor):
        """x (B, C, H, W) -> z_q (B, embed_dim, H/f, W/f), indices (B, H/f, W/f), q_loss."""
        self._check_input(x)
        z = self.quant_conv(self.encoder(x))  # (B, embed_dim, h, w)
        z_q, q_loss, indices = self.quantize(z)
        return z_q, indices, q_loss

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """z_q (B, embed_dim, h, w) -> image (B, C, h*f, w*f)."""
        return self.decoder(self.post_quant_conv(z_q))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, h, w) long -> image (B, C, h*f, w*f)."""
        return self.decode(self.quantize.lookup(indices))

    def forward(self, x: torch.Tensor):
        z_q, indices, q_loss = self.encode(x)
        return self.decode(z_q), indices, q_loss

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight at which the adaptive GAN weight compares gradient norms (Eq. 7)."""
        return self.decoder.conv_out.weight

    def config_dict(self) -> dict:
        return config_to_dict(self.config)

    @classmethod
    def from_checkpoint(cls, path, map_location=None) -> "VQGAN":
        """Load a checkpoint written by this project (a training checkpoint or weights-only
        file with 'model' and 'model_config'). Returns the model in eval mode."""
        from utils import load_checkpoint  # utils imports torchvision and friends: load lazily

        ckpt = load_checkpoint(path, map_location=map_location or "cpu")
        kind = ckpt.get("kind", "vqgan")
        if kind != "vqgan" or "model" not in ckpt or "model_config" not in ckpt:
            raise UserError(f"{path} is not a VQGAN checkpoint (kind '{kind}'): give the stage-1 "
                            "checkpoint, e.g. runs/vqgan/checkpoints/last.pt.")
        model = cls(model_config_from_dict(VQGANConfig, ckpt["model_config"]))
        model.load_state_dict(ckpt["model"], strict=True)
        return model.eval()
