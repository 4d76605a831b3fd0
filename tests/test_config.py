"""The argparse bridge: one flag per field, aliases, presets, precedence, validation."""
import dataclasses

import pytest

from config import (DEMO_VQGAN, PRESETS, TrainVQGANConfig, UserError, VQGANConfig, build_parser,
                    parse_train_transformer, parse_train_vqgan)


def test_every_field_has_a_flag_with_its_default_in_help():
    parser = build_parser(TrainVQGANConfig, VQGANConfig, "", PRESETS)
    text = parser.format_help()
    for cls in (TrainVQGANConfig, VQGANConfig):
        for f in dataclasses.fields(cls):
            if f.name != "model":
                assert "--" + f.name.replace("_", "-") in text, f.name
    for flag in ("--dataset-path", "--image-size", "--latent-dim", "--num-codebook-vectors", "--beta",
                 "--image-channels", "--batch-size", "--epochs", "--learning-rate", "--beta1", "--beta2",
                 "--disc-start", "--disc-factor", "--rec-loss-factor", "--perceptual-loss-factor", "--device"):
        assert flag in text, flag
    assert "(default: 1 1 2 2 4)" in text and "(default: 2.25e-05)" in text


def test_original_flag_names_set_the_model_fields():
    cfg = parse_train_vqgan(["--dataset-path", "d", "--image-size", "128", "--latent-dim", "64",
                             "--num-codebook-vectors", "512", "--image-channels", "1", "--beta", "0.5"])
    m = cfg.model
    assert (m.resolution, m.z_channels, m.embed_dim, m.n_embed, m.in_channels, m.out_channels, m.beta) == \
        (128, 64, 64, 512, 1, 1, 0.5)
    # an explicit field wins over the shorthand
    assert parse_train_vqgan(["--dataset-path", "d", "--latent-dim", "64", "--embed-dim", "8"]).model.embed_dim == 8


def test_precedence_defaults_preset_demo_flags():
    explicit = parse_train_vqgan(["--dataset-path", "d"])
    assert explicit.model == VQGANConfig() and explicit.max_steps is None  # the reference f16-1024
    demo = parse_train_vqgan([])
    assert demo.preset == "tiny" and demo.model.ch == PRESETS["tiny"]["ch"]
    assert demo.max_steps == DEMO_VQGAN["max_steps"]
    assert demo.batch_size == PRESETS["tiny"]["batch_size"]
    override = parse_train_vqgan(["--preset", "tiny", "--dataset-path", "d", "--ch", "64", "--ch-mult", "1", "2"])
    assert override.model.ch == 64 and override.model.ch_mult == (1, 2) and override.max_steps is None
    assert parse_train_vqgan(["--dataset-path", "d", "--preset", "f16-16384"]).model.n_embed == 16384
    assert parse_train_vqgan(["--dataset-path", "d", "--attn-resolutions"]).model.attn_resolutions == ()
    assert parse_train_vqgan(["--dataset-path", "d", "--no-flip"]).flip is False


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
