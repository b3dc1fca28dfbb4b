"""`doc2atom train`: the memory compiler and router, by multi-objective distillation."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

from ..inputs import InputError

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
KINDS = {int: "an integer", float: "a number", str: "a text"}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train the memory compiler and router by multi-objective distillation",
        description="Train on a dataset built by `doc2atom data build --model ...`. The config file (YAML or "
                    "JSON) holds TrainConfig fields; see training/amortized/config.py for each one.")
    p.add_argument("--config", required=True,
                   help="YAML/JSON file of TrainConfig fields (data, model, out, ...)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one setting, e.g. --set steps=50")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..amortized.config import TrainConfig
    from ..amortized.trainer import train

    config = TrainConfig.from_file(args.config)
    for setting in args.set or []:
        apply_setting(config, setting)
    print(train(config, resume=args.resume))
    return 0


def apply_setting(config: Any, setting: str) -> None:
    """One `--set KEY=VALUE` on a config dataclass, the value typed like the setting it replaces."""
    key, equals, value = setting.partition("=")
    names = [f.name for f in fields(config)]
    if not equals or not key:
        raise InputError(f"--set {setting}: write KEY=VALUE, e.g. --set steps=50")
    if key not in names:
        raise InputError(f"--set {setting}: unknown setting {key!r} (settings: {', '.join(names)})")
    try:
        setattr(config, key, typed_value(getattr(config, key), value))
    except ValueError as err:
        raise InputError(f"--set {setting}: {err}") from err


def typed_value(current: Any, value: str) -> Any:
    """`value` as the type of `current`; ValueError saying what is expected."""
    if isinstance(current, bool):
        if value.lower() not in TRUE + FALSE:
            raise ValueError(f"expected one of {', '.join(TRUE + FALSE)}")
        return value.lower() in TRUE
    if isinstance(current, list):
        return [v for v in value.split(",") if v]
    if current is None:
        return None if value.lower() in ("", "none", "null") else int(value) if value.isdigit() else value
    if type(current) not in KINDS:
        raise ValueError("set it in the config file instead")
    try:
        return type(current)(value)
    except ValueError:
        raise ValueError(f"expected {KINDS[type(current)]}, e.g. {current}") from None
