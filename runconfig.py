"""A training run's configuration from its command line: flags over the demo's settings over a
preset over the defaults (config.make_config); or a run's saved config.json given with --config;
or, with --resume, the configuration its checkpoint recorded, flags overriding only its training
settings. --print-config shows the result. Both training scripts parse their flags here.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import fields
from typing import Optional

from config import (DEMO_TRANSFORMER, DEMO_VQGAN, GPT_PRESETS, PRESETS, GPTConfig, Preset, TrainTransformerConfig,
                    TrainVQGANConfig, VQGANConfig, build_config, config_to_dict, config_values, make_config)
from errors import UserError
from flags import add_fields, flag_name, given_values


def flat_fields(config: dict, what: str) -> dict:
    """A stored run config (config.json's layout: model fields under "model") as one flat mapping."""
    if not isinstance(config, dict) or not isinstance(config.get("model", {}), dict):
        raise UserError(f"{what} is not a run configuration (a mapping of fields, model fields under 'model').")
    values = {k: v for k, v in config.items() if k != "model"}
    return {**values, **config.get("model", {})}


def read_config_file(path: str) -> dict:
    """--config FILE: a run's config.json, or a YAML file of the same fields, as flat values for a
    new run (its resume entry and history dropped)."""
    try:
        text = open(path).read()
    except OSError as e:
        raise UserError(f"cannot read --config {path} ({e.strerror}): give a run's config.json or a YAML file of "
                        "its fields.") from None
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml  # PyYAML, a requirement (the reference's configs)
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
        raise UserError(f"--config {path} is not valid {'YAML' if path.endswith(('.yaml', '.yml')) else 'JSON'} "
                        f"({str(e).splitlines()[0]}).") from None
    values = flat_fields(data, f"--config {path}")
    for name in ("resume", "history"):
        values.pop(name, None)
    return values


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(list(b) if isinstance(b, tuple) else b, sort_keys=True)


def resumed_config(train_cls, model_cls, given: dict, presets: dict[str, Preset], demo: Optional[dict] = None):
    """The config of a resumed run: the one its checkpoint recorded, with the training settings
    given as flags on top, each change printed and added to the config's history. A model flag
    (or --preset) that differs from the run's is an error. `--resume auto` without a checkpoint:
    the config of a new run."""
    from checkpoint import resume_target, saved_run  # reading a checkpoint needs torch

    # Where to look: OUTPUT_DIR as the flags, the demo's settings or the default give it. No config
    # is built from the flags alone: the model flags given may only make sense with the run's own.
    output_dir = config_values(given, presets, demo).get("output_dir", train_cls.output_dir)
    path, folder = resume_target(output_dir, given["resume"], "output_dir" in given)
    if path is None:  # --resume auto, and no checkpoint yet: a new run
        return make_config(train_cls, model_cls, {**given, "resume": None}, presets, demo)
    saved, step = saved_run(path, train_cls.checkpoint_kind, train_cls.script)
    values = flat_fields(saved, str(path))
    history = list(values.pop("history", None) or [])
    fixed = {f.name for f in fields(model_cls)} | {"preset"}
    refused = [k for k, v in given.items() if k in fixed and not _same(values.get(k), v)]
    if refused:
        raise UserError(f"{path} was trained with " + ", ".join(f"{flag_name(k)} {values.get(k)}" for k in refused)
                        + "; a run's architecture cannot change on resume: drop "
                        + ", ".join(flag_name(k) for k in refused) + ", or start a new run.")
    # --init-from only starts a run: with --resume auto it is the same command line, run again
    given = {k: v for k, v in given.items() if k != "init_from"}
    changes = {k: [values.get(k), v] for k, v in given.items()
               if k not in fixed and k not in ("resume", "output_dir") and not _same(values.get(k), v)}
    if changes:
        if os.environ.get("RANK", "0") == "0":
            for k, (before, after) in changes.items():
                print(f"changed on resume: {k} {before} -> {after}", flush=True)
        history.append({"step": step, "changed": json.loads(json.dumps(changes))})
    values.update({k: v for k, v in given.items() if k not in fixed})
    values.update(resume=str(path), output_dir=folder, history=history)
    return build_config(train_cls, model_cls, values)


def check_init_from(given: dict, model_cls) -> None:
    """--init-from starts a new run with the file's architecture: no model flag or preset that
    would contradict the file, and no --resume but 'auto' (the same command run again, e.g. after
    a preemption, resumes the run it started)."""
    if given.get("resume") not in (None, "auto"):  # auto: start from the weights once, resume after that
        raise UserError("--init-from starts a new run from weights and --resume continues a run: give one of them "
                        "(or --resume auto, which resumes the run once it has a checkpoint).")
    model_flags = [k for k in given if k in {f.name for f in fields(model_cls)} | {"preset"}]
    if model_flags:
        raise UserError(f"--init-from takes the architecture from {given['init_from']}: drop "
                        + ", ".join(flag_name(k) for k in model_flags) + ".")
    if given.get("vqgan_checkpoint") is not None:
        raise UserError("--init-from brings its own VQGAN (a stage-2 model carries one): drop --vqgan-checkpoint.")


def _parse_training(train_cls, model_cls, presets, demo, description, argv):
    parser = argparse.ArgumentParser(description=description, epilog=f"Presets: {', '.join(presets)}. A preset sets "
                                     "defaults; flags override it. Without --dataset-path the demo's settings apply "
                                     f"too: {', '.join(f'{k}={v}' for k, v in demo.items())}. With --resume the "
                                     "run's saved configuration applies, flags overriding its training settings.")
    add_fields(parser, train_cls, "training")
    add_fields(parser, model_cls, "model")
    runs = parser.add_argument_group("run documents")
    runs.add_argument("--config", dest="config_file", metavar="FILE", default=argparse.SUPPRESS,
                      help="start a new run from a run's config.json, or a YAML file of the same fields; flags "
                           "override it")
    runs.add_argument("--print-config", action="store_true", default=argparse.SUPPRESS,
                      help="print the resolved configuration (preset, demo settings, --config, --resume and flags "
                           "applied) as JSON, and exit")
    given = given_values(parser.parse_args(argv))
    config_file, show = given.pop("config_file", None), given.pop("print_config", False)
    if given.get("init_from") is not None:
        check_init_from(given, model_cls)
    if given.get("resume") is not None:
        if config_file is not None:
            raise UserError("--config starts a new run and --resume continues one: give one of them.")
        cfg = resumed_config(train_cls, model_cls, given, presets, demo)
    else:
        cfg = make_config(train_cls, model_cls, {**(read_config_file(config_file) if config_file else {}), **given},
                          presets, demo)
    if show:
        print(json.dumps(config_to_dict(cfg), indent=2))
        raise SystemExit(0)
    return cfg


def parse_train_vqgan(argv: Optional[list[str]] = None) -> TrainVQGANConfig:
    return _parse_training(TrainVQGANConfig, VQGANConfig, PRESETS, DEMO_VQGAN,
                           "Stage 1: train a VQGAN image tokenizer (Esser et al. 2021) on a folder of images.", argv)


def parse_train_transformer(argv: Optional[list[str]] = None) -> TrainTransformerConfig:
    return _parse_training(TrainTransformerConfig, GPTConfig, GPT_PRESETS, DEMO_TRANSFORMER,
                           "Stage 2: train a GPT over the codes of a trained VQGAN (Esser et al. 2021).", argv)
