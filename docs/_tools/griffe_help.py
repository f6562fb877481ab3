"""Griffe extension for the API reference: read TRL-style docstrings and dataclass field help as the site shows them.

Why: trl-plw follows TRL's conventions, written for Hugging Face's doc-builder: a config documents each field in its
class docstring as ``name (`type`, *optional*, defaults to `x`):`` and again in the ``metadata={"help": ...}`` that
``HfArgumentParser`` prints for ``--help``; cross-references are ``[`Name`]``; older docstrings use Sphinx roles
(``:func:`name```). mkdocstrings reads Google style. This extension

* gives each dataclass field its ``help`` string as docstring, so the reference and ``trl-plw sft --help`` say the
  same thing, from one source, and shows the field's default instead of its ``field(...)`` call;
* rewrites the doc-builder parameter lines to Google style (``name (type):``; the default comes from the
  signature), and ``[`Name`]`` and Sphinx roles to code spans.

Static analysis only: the source is parsed, never imported, so the site builds without torch.
"""

from __future__ import annotations

import ast
import re
from typing import Any

import griffe

_PARAM = re.compile(r"^(?P<indent>\s+)(?P<name>\*{0,2}\w+) \((?P<type>.*)\):(?P<rest>.*)$")
_XREF = re.compile(r"\[`([^`\]]+)`\]")
_ROLE = re.compile(r":(?:func|class|meth|attr|data|mod|obj):`~?([^`]+)`")


def _google_type(doc_builder_type: str) -> str:
    """```dict[str, float]` or `str`, *optional*, defaults to `0.0``` -> ``dict[str, float] | str``."""
    parts = [p.strip() for p in doc_builder_type.split(",")]
    kept = []
    for part in parts:
        if part == "*optional*" or part.startswith("defaults to"):
            continue
        kept.append(part)
    text = ", ".join(kept)  # commas inside a type (dict[str, float]) come back here
    text = re.sub(r"`\s*,\s*`", "` or `", text)  # `str`, `dict` or `list`: a list of alternatives
    return " | ".join(t.strip().strip("`") for t in text.split(" or "))


def to_google_style(text: str) -> str:
    lines = []
    for line in text.splitlines():
        match = _PARAM.match(line)
        if match and ("`" in match["type"] or "*optional*" in match["type"]):
            line = f"{match['indent']}{match['name']} ({_google_type(match['type'])}):{match['rest']}"
        lines.append(line)
    text = "\n".join(lines)
    return _ROLE.sub(r"`\1`", _XREF.sub(r"`\1`", text))


def _default_of(value: ast.Call) -> str | None:
    """The source of ``field(default=...)`` (or ``default_factory``'s call), for the reference's ``name: type = x``."""
    for keyword in value.keywords:
        if keyword.arg == "default":
            return ast.unparse(keyword.value)
        if keyword.arg == "default_factory":
            return f"{ast.unparse(keyword.value)}()"
    return None


def _help_of(value: ast.expr | None) -> str | None:
    """The literal ``help`` string of ``field(..., metadata={"help": "..."})``, or None."""
    if not isinstance(value, ast.Call):
        return None
    for keyword in value.keywords:
        if keyword.arg == "metadata" and isinstance(keyword.value, ast.Dict):
            for key, item in zip(keyword.value.keys, keyword.value.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == "help":
                    try:
                        text = ast.literal_eval(item)
                    except ValueError:  # a computed help string: leave the field undocumented, not wrong
                        return None
                    return text if isinstance(text, str) else None
    return None


class FieldHelpAsDocstring(griffe.Extension):
    def on_attribute_instance(self, *, node: Any, attr: griffe.Attribute, **kwargs: Any) -> None:
        if attr.docstring is not None or not isinstance(node, ast.AnnAssign):
            return
        text = _help_of(node.value)
        if text:
            attr.docstring = griffe.Docstring(text, parent=attr)
            attr.value = _default_of(node.value)  # show `= default`, not the whole field(...) call

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_google_style(obj.docstring.value)
