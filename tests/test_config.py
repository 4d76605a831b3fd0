"""The argparse bridge: one flag per field, aliases, presets, precedence, validation, help."""
import argparse
import dataclasses

import pytest

from config import DEMO_TRANSFORMER, DEMO_VQGAN, PRESETS, TrainTransformerConfig, TrainVQGANConfig, VQGANConfig, make_config
from errors import UserError
from flags import add_fields
from runconfig import parse_train_transformer, parse_train_vqgan
from vqgan import VQGAN


def help_text(*classes) -> str:
    parser = argparse.ArgumentParser()
    for cls in classes:
        add_fields(parser, cls, cls.__name__)
    return parser.format_help()


def test_every_field_has_a_flag_with_its_default_in_help():
    text = help_text(TrainVQGANConfig, VQGANConfig)
    for cls in (TrainVQGANConfig, VQGANConfig):
        for f in dataclasses.fields(cls):
            if f.name != "model" and not f.metadata.get("derived"):  # derived: filled in, never typed
                assert "--" + f.name.replace("_", "-") in text, f.name
    for flag in ("--dataset-path", "--image-size", "--latent-dim", "--num-codebook-vectors", "--beta",
                 "--image-channels", "--batch-size", "--epochs", "--learning-rate", "--beta1", "--beta2",
                 "--disc-start", "--disc-factor", "--rec-loss-factor", "--perceptual-loss-factor", "--device"):
        assert flag in text, flag
    assert "(default: 1 1 2 2 4)" in text and "(default: 2.25e-05)" in text


def test_a_shared_field_is_declared_once_and_takes_each_stage_s_default():
    """RunConfig declares the fields both runs have; stage 2 changes only their defaults, and its
    help shows its own default with the one help line."""
    stage1, stage2 = TrainVQGANConfig(), TrainTransformerConfig()
    assert (stage1.batch_size, stage1.learning_rate, stage1.lr_schedule) == (8, 2.25e-5, "constant")
    assert (stage2.batch_size, stage2.learning_rate, stage2.lr_schedule) == (16, 4.5e-4, "cosine")
    text = help_text(TrainTransformerConfig)
    assert "--lr-schedule" in text and "(default: cosine)" in text and "(default: 0.00045)" in text
    assert text.count("\n  --batch-size") == 1  # one flag
    assert parse_train_transformer(["--lr-schedule", "constant"]).lr_schedule == "constant"


def test_original_flag_names_set_the_model_fields():
    cfg = parse_train_vqgan(["--dataset-path", "d", "--image-size", "128", "--latent-dim", "64",
                             "--num-codebook-vectors", "512", "--image-channels", "1", "--beta", "0.5"])
    m = cfg.model
    assert (m.resolution, m.z_channels, m.embed_dim, m.n_embed, m.in_channels, m.out_channels, m.beta) == \
        (128, 64, 64, 512, 1, 1, 0.5)
    # an explicit field wins over the alias
    assert parse_train_vqgan(["--dataset-path", "d", "--latent-dim", "64", "--embed-dim", "8"]).model.embed_dim == 8
    assert parse_train_vqgan(["--dataset-path", "d", "--image-size", "64", "--resolution", "32"]).model.resolution == 32
    assert parse_train_transformer(["--checkpoint-path", "x.pt"]).vqgan_checkpoint == "x.pt"


def test_precedence_defaults_preset_demo_flags():
    explicit = parse_train_vqgan(["--dataset-path", "d"])
    assert explicit.model == VQGANConfig() and explicit.max_steps is None  # the reference f16-1024
    demo = parse_train_vqgan([])
    assert demo.preset == "tiny" and demo.model.ch == PRESETS["tiny"].model["ch"]
    assert demo.max_steps == DEMO_VQGAN["max_steps"]
    assert demo.batch_size == DEMO_VQGAN["batch_size"] != PRESETS["tiny"].run["batch_size"]  # demo over preset
    assert demo.disc_start == PRESETS["tiny"].run["disc_start"]  # the preset's, which the demo leaves alone
    # the demo trains without LPIPS on every machine (no VGG16 download, the time it was measured in)
    assert demo.perceptual_loss_factor == 0 and explicit.perceptual_loss_factor == 1.0
    assert parse_train_vqgan(["--perceptual-loss-factor", "1"]).perceptual_loss_factor == 1.0
    override = parse_train_vqgan(["--preset", "tiny", "--dataset-path", "d", "--ch", "64", "--ch-mult", "1", "2",
                                  "--attn-resolutions", "32"])
    assert override.model.ch == 64 and override.model.ch_mult == (1, 2) and override.max_steps is None
    assert parse_train_vqgan(["--dataset-path", "d", "--preset", "f16-16384"]).model.n_embed == 16384
    assert parse_train_vqgan(["--dataset-path", "d", "--attn-resolutions"]).model.attn_resolutions == ()
    assert parse_train_vqgan(["--dataset-path", "d", "--no-flip"]).flip is False


def test_presets_keep_model_fields_apart_from_run_settings():
    model_names = {f.name for f in dataclasses.fields(VQGANConfig)}
    run_names = {f.name for f in dataclasses.fields(TrainVQGANConfig)} - {"model"}
    for name, preset in PRESETS.items():
        assert set(preset.model) <= model_names, name
        assert set(preset.run) <= run_names, name


def test_bad_configuration_is_a_user_error():
    with pytest.raises(UserError, match="not divisible by the downsampling factor 16"):
        parse_train_vqgan(["--dataset-path", "d", "--image-size", "100"])
    with pytest.raises(UserError, match="unknown preset"):
        parse_train_vqgan(["--preset", "huge"])
    with pytest.raises(UserError, match="multiple of 32"):
        VQGANConfig(ch=48, ch_mult=(1,))
    with pytest.raises(SystemExit):  # argparse: bad choice
        parse_train_vqgan(["--disc-loss", "wasserstein"])
    for flags, message in ((["--batch-size", "0"], "--batch-size 0 is out of range"),
                           (["--log-every", "0"], "--log-every 0"), (["--ch-mult", "1", "0"], "--ch-mult 1 0"),
                           (["--val-fraction", "1"], "--val-fraction"),
                           (["--in-channels", "1"], "--in-channels 1 and --out-channels 3")):
        with pytest.raises(UserError, match=message):
            parse_train_vqgan(["--dataset-path", "d", *flags])
    with pytest.raises(UserError, match="not divisible by --n-head"):
        parse_train_transformer(["--n-embd", "30", "--n-head", "4"])
    for flags in (["--top-k", "0"], ["--temperature", "0"], ["--pkeep", "0"], ["--sample-every", "0"]):
        with pytest.raises(UserError):
            parse_train_transformer(flags)


def test_config_round_trips_through_a_dict():
    from config import config_to_dict, model_config_from_dict

    cfg = VQGANConfig(ch_mult=(1, 2), attn_resolutions=())
    assert model_config_from_dict(VQGANConfig, config_to_dict(cfg)) == cfg
    with pytest.raises(UserError, match="does not know"):
        model_config_from_dict(VQGANConfig, {**config_to_dict(cfg), "new_field": 1})
    older = {k: v for k, v in config_to_dict(cfg).items() if k != "gumbel_kl_weight"}  # written before the field
    assert model_config_from_dict(VQGANConfig, older) == cfg
    # a tiny run of an earlier version: its config does not name the output GroupNorm's groups, the
    # codebook warm-up or the initialization, and it was trained with the reference's 32 groups, no
    # warm-up and PyTorch's initialization
    tiny = {k: v for k, v in config_to_dict(make_config(TrainVQGANConfig, VQGANConfig, {"preset": "tiny"}, PRESETS).model).items()
            if k not in ("out_norm_groups", "codebook_warmup", "weight_init")}
    old_tiny = model_config_from_dict(VQGANConfig, tiny)
    assert (old_tiny.out_norm_groups, old_tiny.codebook_warmup, old_tiny.weight_init) == (32, 0, "pytorch")
    assert VQGAN(old_tiny).encoder.norm_out.num_groups == VQGAN(old_tiny).decoder.norm_out.num_groups == 32
    assert PRESETS["tiny"].model["out_norm_groups"] == 1 and PRESETS["tiny"].model["codebook_warmup"] == 50
    assert PRESETS["tiny"].model["weight_init"] == "lecun" and "weight_init" not in PRESETS["f16-1024"].model


def help_entries(text: str) -> dict[str, str]:
    """--flag -> its whole help entry (the option lines and their continuation lines)."""
    entries, current = {}, None
    for line in text.splitlines():
        stripped = line.strip()
        if line.startswith("  -"):
            current = stripped.split()[0].rstrip(",")
            entries[current] = stripped
        elif current and line.startswith("    ") and stripped:
            entries[current] += " " + stripped
        else:
            current = None
    return entries


@pytest.mark.parametrize("command", [["training_vqgan"], ["training_transformer"], ["evaluate_vqgan"],
                                     ["sample_transformer"], ["vqgan", "convert"], ["vqgan", "export"],
                                     ["benchmark", "stage1"], ["benchmark", "gpt"], ["benchmark", "sample"], ["fid"]])
def test_every_cli_renders_its_help(cli, command):
    """Help renders (a stray % would be a traceback or a raw dict), one default per flag, and the
    training scripts say where the demo's settings and a resumed run's configuration apply."""
    r = cli(*command, "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage:") and "Traceback" not in r.stderr
    assert "%(" not in r.stdout and "{'" not in r.stdout
    entries = help_entries(r.stdout)
    assert len(entries) > 3
    for flag, entry in entries.items():
        assert entry.count("(default:") <= 1, entry
    if command[0].startswith("training_"):
        text = " ".join(r.stdout.split())
        demo = DEMO_VQGAN if command[0] == "training_vqgan" else DEMO_TRANSFORMER
        assert "Without --dataset-path the demo's settings apply too" in text
        assert all(f"{k}={v}" in text for k, v in demo.items())
        assert "With --resume the run's saved configuration applies" in text
        assert "--print-config" in entries and "--config" in entries


@pytest.mark.parametrize("flags, message", [
    (["--codebook-warmup", "10"], "add --codebook-kmeans-init"),
    (["--out-norm-groups", "3"], "does not divide the widths it normalizes"),
    (["--out-norm-groups", "0"], "--out-norm-groups 0 is out of range"),
])
def test_output_norm_and_warmup_flags_are_checked(flags, message):
    with pytest.raises(UserError, match=message):
        parse_train_vqgan(["--dataset-path", "d", *flags])
