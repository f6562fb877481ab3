"""Griffe extension: a dataclass field's ``metadata={"help": ...}`` becomes its docstring in the API reference.

Why: TRL-style configs document each field twice, in the class docstring and in the ``help`` that ``HfArgumentParser``
prints for ``--help``. Rendering the ``help`` string as the field's docstring makes the reference and
``trl-plw sft --help`` say the same thing, from one source. Static analysis only: the source is parsed, never
imported, so the site builds without torch.
"""

from __future__ import annotations

import ast
from typing import Any

import griffe


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
