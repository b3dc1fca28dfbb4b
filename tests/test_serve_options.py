"""`vllm serve --plugin doc2atom`: the flags it adds and expands, and the settings read back from them."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from vllm_doc2atom.cli_args import LORA_DEFAULTS, MIDDLEWARE, add_arguments, expand
from vllm_doc2atom.settings import ServeSettings


def _parse(argv: list[str]) -> argparse.Namespace:
    from vllm.utils.argparse_utils import FlexibleArgumentParser  # accepts --a_b for --a-b, as vllm serve does

    parser = FlexibleArgumentParser()
    parser.add_argument("--middleware", action="append", default=[])
    parser.add_argument("--enable-lora", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--max-lora-rank", type=int, default=16)
    parser.add_argument("--max-loras", type=int, default=1)
    parser.add_argument("--max-cpu-loras", type=int, default=None)
    add_arguments(parser)
    add_arguments(parser)  # idempotent
    namespace = parser.parse_args(argv)
    expand(namespace, argv)
    return namespace


def test_plugin_flag_expands_into_vllm_options_without_overriding_the_user():
    plain = _parse([])
    assert plain.middleware == [] and plain.enable_lora is None and plain.max_lora_rank == 16
    on = _parse(["--plugin", "doc2atom"])
    assert on.middleware == [MIDDLEWARE]
    assert {k: getattr(on, k) for k in LORA_DEFAULTS} == LORA_DEFAULTS
    user = _parse(["--plugin", "doc2atom", "--max-lora-rank=16", "--max_loras", "2"])
    assert user.max_lora_rank == 16 and user.max_loras == 2 and user.max_cpu_loras == LORA_DEFAULTS["max_cpu_loras"]
    with pytest.raises(SystemExit, match="needs LoRA"):
        _parse(["--plugin", "doc2atom", "--no-enable-lora"])
    with pytest.raises(SystemExit, match="unknown --plugin 'other'"):
        _parse(["--plugin", "other"])


def test_settings_from_args(monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    args = _parse(["--plugin", "doc2atom", "--doc2atom-bank-root", "~/banks", "--doc2atom-threshold", "0.7"])
    args.api_key, args.api_server_count = ["k1"], 2
    settings = ServeSettings.from_args(args)
    assert settings.bank_root == Path("~/banks").expanduser() and settings.threshold == 0.7
    assert settings.api_keys == ("k1",) and settings.shared_engine and settings.max_lora_rank == 64
    assert settings.adapter_dir.name == str(os.getpid())
    assert settings.evidence == "off"
    for argv, mode in ((["--doc2atom-evidence"], "with-adapter"), (["--doc2atom-evidence", "only"], "only")):
        assert ServeSettings.from_args(_parse(["--plugin", "doc2atom", *argv])).evidence == mode
    with pytest.raises(SystemExit):
        _parse(["--plugin", "doc2atom", "--doc2atom-evidence", "sometimes"])
