"""The one bridge from argparse to dataclasses that every script uses to build its flags: a
field declared with `option` is a flag (its name with dashes), with one help line and one
default shown; ALIASES are other names for fields. Flags not given stay absent, so presets and
the demo's settings can fill them (config.py).

Stdlib only.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import field, fields
from typing import Optional


def option(default, help: str, *, choices=None, required: bool = False, nargs=None, metavar=None):
    """A dataclass field that is also a command-line flag: its default, its one help line, and
    argparse details (choices, required, nargs, metavar). Every script declares its options so."""
    return field(default=default, metadata=dict(help=help, choices=choices, required=required, nargs=nargs,
                                                metavar=metavar))


# Other names for fields (the original flat implementation's flags); one may set several fields.
# A field's own flag wins over an alias.
ALIASES: dict[str, tuple[tuple[str, ...], str]] = {
    "--image-size": (("resolution",), "the same as --resolution"),
    "--num-codebook-vectors": (("n_embed",), "the same as --n-embed"),
    "--latent-dim": (("z_channels", "embed_dim"), "sets both --z-channels and --embed-dim"),
    "--image-channels": (("in_channels", "out_channels"), "sets both --in-channels and --out-channels"),
    "--checkpoint-path": (("vqgan_checkpoint",), "the same as --vqgan-checkpoint"),
}


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _value_type(tp):
    """X of Optional[X]; other types as they are."""
    return next(a for a in typing.get_args(tp) if a is not type(None)) if typing.get_origin(tp) is typing.Union else tp


def _help(cls, name: str) -> dict:
    """A field's metadata, from the nearest class in the hierarchy that declares its help (a
    subclass may change only the default)."""
    for klass in cls.__mro__:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and f.metadata.get("help"):
            return f.metadata
    return {}


def add_fields(parser, cls, title: Optional[str] = None, skip=()) -> None:
    """One flag per field of the dataclass `cls` (not nested configs, derived or skipped fields),
    the class's own fields first, each with its help line and default; plus the ALIASES whose
    fields are all here. Flags given are collected under their field names (SUPPRESS: a flag not
    given is absent, so presets and demo settings can fill it)."""
    group = parser.add_argument_group(title) if title else parser
    hints = typing.get_type_hints(cls)
    own = {name for name in getattr(cls, "__annotations__", {}) if cls.__dataclass_fields__[name].metadata.get("help")}
    names = set()
    for f in sorted(fields(cls), key=lambda f: f.name not in own):
        meta = _help(cls, f.name) or f.metadata
        if dataclasses.is_dataclass(hints[f.name]) or f.metadata.get("derived") or f.name in skip:
            continue
        names.add(f.name)
        tp = _value_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        help = meta.get("help", "").replace("%", "%%")
        own_default = meta.get("required") or "(default:" in help  # the help line says it already
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=help if own_default else f"{help} (default: {shown})")
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is tuple:
            kw.update(nargs=meta.get("nargs") or "*", type=typing.get_args(tp)[0], metavar=meta.get("metavar") or "N")
        else:
            kw["type"] = tp
        for key in ("choices", "required", "metavar"):
            if meta.get(key) and key not in kw:
                kw[key] = meta[key]
        group.add_argument(flag_name(f.name), **kw)
    for flag, (targets, help) in ALIASES.items():
        if set(targets) <= names:
            group.add_argument(flag, dest="alias:" + flag, default=argparse.SUPPRESS, help=help,
                               type=_value_type(hints[targets[0]]), metavar=targets[0].upper())


def given_values(namespace: argparse.Namespace) -> dict:
    """The flags given, as field name -> value, aliases expanded (a field's own flag wins)."""
    given = {k: v for k, v in vars(namespace).items() if not k.startswith("alias:")}
    for key, value in vars(namespace).items():
        if key.startswith("alias:"):
            for target in ALIASES[key[len("alias:"):]][0]:
                given.setdefault(target, value)
    return given


def parse_into(cls, argv: Optional[list[str]], description: str):
    """A script's flags (one per field of `cls`) parsed into an instance of `cls`."""
    parser = argparse.ArgumentParser(description=description)
    add_fields(parser, cls)
    return cls(**given_values(parser.parse_args(argv)))
