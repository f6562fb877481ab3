"""Flag spelling shared by every command built on ``trl.TrlParser`` (``sft``, ``sweep``, ``race``, the examples).

HfArgumentParser writes a boolean field X as ``--X [true|false]`` (plus ``--no_X`` when X defaults to True). The
commands also accept ``--no-X``/``--no_X`` for every boolean field, as argparse's BooleanOptionalAction would, so
``--no-bf16`` or ``--no-packing`` mean the same everywhere.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def bool_fields(parser: argparse.ArgumentParser) -> set[str]:
    """The destinations HfArgumentParser parses as booleans (its ``string_to_bool`` type)."""
    return {a.dest for a in parser._actions if getattr(a.type, "__name__", "") == "string_to_bool"}


def negate_bool_flags(argv: Sequence[str], fields: set[str]) -> list[str]:
    """``argv`` with ``--no-X``/``--no_X`` written as ``--X false`` for each boolean field X in ``fields``."""
    out: list[str] = []
    for arg in argv:
        negated = arg[5:].replace("-", "_") if arg.startswith(("--no-", "--no_")) else None
        out += [f"--{negated}", "false"] if negated in fields else [arg]
    return out
