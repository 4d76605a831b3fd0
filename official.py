"""The released taming-transformers checkpoints (Esser et al. 2021): telling them from ours, their
YAML configs or, without a YAML, the architecture inferred from the tensor shapes. (Their Lightning
`.ckpt` files are read by checkpoint.load_checkpoint's restricted loader, and their weights loaded
by checkpoint.load_strict: nothing in them is imported or run, and nothing that does not match
passes.)

A reference checkpoint is a dict whose `state_dict` holds the VQGAN under our own names (plus
`loss.perceptual_loss.*` and `loss.discriminator.*`), or, for a transformer, `transformer.*`,
`first_stage_model.*` and `cond_stage_model.*`.
"""
from __future__ import annotations

import re
from typing import Optional

from config import GPTConfig, VQGANConfig
from errors import UserError

# n_head is not visible in the weights; these are the released transformers' (width -> heads).
RELEASED_N_HEAD = {1024: 16, 1536: 24, 1664: 16}


def checkpoint_kind(ckpt: dict) -> str:
    """'reference-vqgan' or 'reference-transformer' for the reference's Lightning checkpoints
    (a `state_dict` entry), else the `kind` our checkpoints record ('vqgan' when absent: the
    oldest weights-only files)."""
    state = ckpt.get("state_dict")
    if isinstance(state, dict):
        transformer = any(k.startswith(("transformer.", "first_stage_model.")) for k in state)
        return "reference-transformer" if transformer else "reference-vqgan"
    return str(ckpt.get("kind", "vqgan"))


def sub_state(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def read_yaml(path: str) -> dict:
    import yaml  # PyYAML: the releases ship their configs as YAML

    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read the config {path} ({e}): give the YAML file that came with the checkpoint.") from None
    if not isinstance(config, dict):
        raise UserError(f"the config {path} holds {'nothing' if config is None else 'a ' + type(config).__name__}, not "
                        "a mapping of settings: give the YAML file that came with the checkpoint.")
    return config


def vqgan_config_from_params(params: dict, target: str = "") -> VQGANConfig:
    """`model.params` of a reference VQGAN YAML (or `first_stage_config.params`)."""
    try:
        dd = params["ddconfig"]
        return VQGANConfig(ch=dd["ch"], ch_mult=tuple(dd["ch_mult"]), num_res_blocks=dd["num_res_blocks"],
                           attn_resolutions=tuple(dd["attn_resolutions"]), dropout=dd.get("dropout", 0.0),
                           in_channels=dd["in_channels"], out_channels=dd["out_ch"], resolution=dd["resolution"],
                           z_channels=dd["z_channels"], embed_dim=params["embed_dim"], n_embed=params["n_embed"],
                           legacy_beta=True, quantizer="gumbel" if "Gumbel" in target else "vq")
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(f"the config lacks the VQGAN field {e}: give the YAML of a taming-transformers VQGAN.") from None


def section(mapping: dict, key: str, path: str) -> dict:
    """mapping[key] as a dict (empty when absent); anything else is a UserError naming the file."""
    value = mapping.get(key, {})
    if not isinstance(value, dict):
        raise UserError(f"'{key}' in {path} is a {type(value).__name__}, not a mapping: give the YAML file that came "
                        "with the checkpoint.")
    return value


def vqgan_config_from_yaml(path: str) -> VQGANConfig:
    model = section(read_yaml(path), "model", path)
    return vqgan_config_from_params(section(model, "params", path), str(model.get("target", "")))


def _count(state: dict, pattern: str) -> int:
    found = {int(m.group(1)) for k in state for m in [re.match(pattern, k)] if m}
    return max(found) + 1 if found else 0


def infer_vqgan_config(state: dict) -> VQGANConfig:
    """The architecture of a VQGAN state dict from its tensor shapes. Attention levels are
    expressed for a 256-pixel resolution (the releases' training size); any input whose sides
    are divisible by the downsampling factor still works."""
    try:
        ch, in_channels = state["encoder.conv_in.weight"].shape[:2]
        levels = _count(state, r"encoder\.down\.(\d+)\.")
        ch_mult = tuple(state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(levels))
        num_res_blocks = _count(state, r"encoder\.down\.0\.block\.(\d+)\.")
        attn_levels = [i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in state]
        gumbel = "quantize.embed.weight" in state
        codebook = state["quantize.embed.weight" if gumbel else "quantize.embedding.weight"]
        resolution = 256
        return VQGANConfig(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                           attn_resolutions=tuple(resolution // 2 ** i for i in attn_levels),
                           in_channels=in_channels, out_channels=state["decoder.conv_out.weight"].shape[0],
                           resolution=resolution, z_channels=state["encoder.conv_out.weight"].shape[0],
                           embed_dim=codebook.shape[1], n_embed=codebook.shape[0], legacy_beta=True,
                           quantizer="gumbel" if gumbel else "vq")
    except KeyError as e:
        raise UserError(f"the checkpoint has no tensor {e}: it does not look like a taming-transformers VQGAN. "
                        "Pass its YAML with config=... / --config.") from None


def first_stage_config(params: dict) -> VQGANConfig:
    """The VQGAN config inside a reference transformer YAML's `model.params` (KeyError when absent)."""
    first = params["first_stage_config"]
    return vqgan_config_from_params(first.get("params", {}), first.get("target", ""))


def transformer_vqgan_config(state: dict, config: Optional[str]) -> VQGANConfig:
    """The first stage of a reference transformer checkpoint: from its YAML, else from the weights."""
    if config is None:
        return infer_vqgan_config(sub_state(state, "first_stage_model."))
    params = section(section(read_yaml(config), "model", config), "params", config)
    try:
        return first_stage_config(params)
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{config} lacks the field {e} of a taming-transformers transformer config.") from None


def transformer_configs(state: dict, config: Optional[str]) -> tuple[VQGANConfig, GPTConfig, dict]:
    """(VQGAN config, GPT config, conditioning) of a reference transformer checkpoint.
    conditioning: {"sos_token": int} (unconditional) or {"n_classes": int} (class-conditional)."""
    vq_state = sub_state(state, "first_stage_model.")
    gpt_state = sub_state(state, "transformer.")
    if not vq_state or not gpt_state:
        raise UserError("the checkpoint has no `transformer.*` and `first_stage_model.*` weights: it is not a "
                        "taming-transformers transformer checkpoint.")
    if config is not None:
        params = section(section(read_yaml(config), "model", config), "params", config)
        try:
            vq_cfg = first_stage_config(params)
            g = params["transformer_config"]["params"]
            gpt_cfg = GPTConfig(vocab_size=g["vocab_size"], block_size=g["block_size"], n_layer=g["n_layer"],
                                n_head=g["n_head"], n_embd=g["n_embd"])
        except (KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{config} lacks the field {e} of a taming-transformers transformer config.") from None
        if params.get("permuter_config", {}).get("target", "Identity").split(".")[-1] != "Identity":
            raise UserError("only the identity (raster-order) permuter of the reference is supported.")
        cond = params.get("cond_stage_config")
        if isinstance(cond, dict) and "n_classes" in cond.get("params", {}):
            return vq_cfg, gpt_cfg, {"n_classes": int(cond["params"]["n_classes"])}
        if cond in ("__is_unconditional__", None) or "SOSProvider" in str(cond):
            return vq_cfg, gpt_cfg, {"sos_token": int(params.get("sos_token", 0))}
        raise UserError(f"conditioning {cond} is not supported: only unconditional and class-conditional "
                        "transformers are.")
    n_embd = gpt_state["tok_emb.weight"].shape[1]
    if n_embd not in RELEASED_N_HEAD:
        raise UserError("the number of attention heads is not visible in the weights: pass the checkpoint's "
                        "YAML config (config=... / --config).")
    gpt_cfg = GPTConfig(vocab_size=gpt_state["tok_emb.weight"].shape[0], block_size=gpt_state["pos_emb"].shape[1],
                        n_layer=_count(gpt_state, r"blocks\.(\d+)\."), n_head=RELEASED_N_HEAD[n_embd], n_embd=n_embd)
    return infer_vqgan_config(vq_state), gpt_cfg, {"sos_token": 0}
