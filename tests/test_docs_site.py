"""The site's hook (docs/_tools/hooks.py): README links rewritten for the site, where the README is the index page.

Needs mkdocs (the ``docs`` extra, which ``make install`` installs); skipped without it. ``make test`` also runs
``mkdocs build --strict``, which fails on any link these rewrites leave broken.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("mkdocs")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def hooks():
    spec = importlib.util.spec_from_file_location("trl_plw_docs_hooks", ROOT / "docs" / "_tools" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_links_become_site_links(hooks):
    readme = hooks._rewrite_links  # the README sits at the root and is built as docs/index.md
    assert readme("[k](docs/KERNEL.md#api)", ".", "docs") == "[k](KERNEL.md#api)"
    assert readme("![f](docs/results/race-cpu-long/race_sweep.png)", ".", "docs") == (
        "![f](results/race-cpu-long/race_sweep.png)"
    )
    # a folder of recorded files links the page that describes it
    assert readme("[d](docs/results/race-cpu-demo)", ".", "docs") == "[d](results/race-cpu-demo/summary.md)"
    # outside docs/ there is nothing to link on the site: the file's name stays, as code
    assert readme("[examples/a.py](examples/a.py)", ".", "docs") == "`examples/a.py`"
    assert readme("[example](examples/a.py)", ".", "docs") == "example (`examples/a.py`)"
    assert (
        readme("[TRL](https://github.com/huggingface/trl)", ".", "docs") == "[TRL](https://github.com/huggingface/trl)"
    )


def test_docs_pages_links_out_of_docs_and_code_fences(hooks):
    page = "see [the test](../tests/test_x.py) and [RACE](RACE.md)\n```\n[not a link](../x)\n```\n"
    assert hooks._rewrite_links(page, "docs", "docs") == (
        "see the test (`tests/test_x.py`) and [RACE](RACE.md)\n```\n[not a link](../x)\n```\n"
    )


def test_trl_style_docstrings_read_as_google_style():
    """The griffe extension (docs/_tools/griffe_help.py) turns TRL's doc-builder parameter lines into Google style."""
    pytest.importorskip("griffe")
    spec = importlib.util.spec_from_file_location("trl_plw_griffe_help", ROOT / "docs" / "_tools" / "griffe_help.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    doc = (
        "Configuration for [`PLWTrainer`], see :func:`weighted_linear_cross_entropy`.\n\n"
        "Parameters:\n"
        "    prompt_loss_weight (`float`, *optional*, defaults to `0.0`):\n"
        "        Weight.\n"
        "    role_weights (`dict[str, float]` or `str`, *optional*):\n"
        "        Roles.\n"
        "    span_weights (`str`, `dict` or `list`, *optional*):\n"
        "        Spans.\n"
        "    plain (int): already Google style.\n"
    )
    assert module.to_google_style(doc) == (
        "Configuration for `PLWTrainer`, see `weighted_linear_cross_entropy`.\n\n"
        "Parameters:\n"
        "    prompt_loss_weight (float):\n"
        "        Weight.\n"
        "    role_weights (dict[str, float] | str):\n"
        "        Roles.\n"
        "    span_weights (str | dict | list):\n"
        "        Spans.\n"
        "    plain (int): already Google style."
    )
