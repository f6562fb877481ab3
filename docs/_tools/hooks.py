"""MkDocs hooks: the README is the site's landing page, and links that leave docs/ stay readable.

Why a hook instead of a copy: the README is the one page written for a TRL user, and the site must say the same
thing without a second file to keep in sync. Its links are relative to the repository root (``docs/KERNEL.md``,
``examples/x.py``); on the site, ``docs/`` links become page links and links to files outside docs/ (examples,
tests, source) become code spans naming the file, since the site has no copy of them.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.trl_plw")

# Pages that other work adds to docs/; listed in the nav already. Until a page lands, a stub stands in for it
# (generated here, never committed), so that the nav and the links to it build.
EXPECTED_PAGES = {
    "COMPATIBILITY.md": "Supported configurations",
    "WEIGHTS.md": "Token weights",
    "CLI.md": "The trl-plw command line",
}

_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")
_REPO_ROOT = Path(__file__).resolve().parents[2]


def _rewrite_links(markdown: str, page_dir: str, site_dir: str) -> str:
    """Rewrite the relative links of a page whose source sits in ``page_dir`` (relative to the repository root) and
    whose built page sits where ``site_dir``'s files do (``docs`` for the README, which becomes the site's index)."""

    def replace(match: re.Match) -> str:
        bang, text, target = match.groups()
        if re.match(r"^[a-z]+:|^#|^/", target):
            return match.group(0)
        path, _, anchor = target.partition("#")
        resolved = posixpath.normpath(posixpath.join(page_dir, path))
        if resolved == "docs" or resolved.startswith("docs/"):
            site_path = posixpath.relpath(resolved, site_dir)
            folder = _REPO_ROOT / resolved
            if folder.is_dir():  # a folder of recorded files: link the page that describes it
                page = next((n for n in ("README.md", "summary.md") if (folder / n).is_file()), None)
                if page is None:
                    return f"{text} (`{resolved}`)" if not bang else match.group(0)
                site_path += "/" + page
            return f"{bang}[{text}]({site_path}{'#' + anchor if anchor else ''})"
        if bang:
            return match.group(0)
        label = text if text.startswith("`") else f"`{text}`"
        return label if text.strip("`") == resolved else f"{text} (`{resolved}`)"

    out, in_fence = [], False
    for line in markdown.splitlines(keepends=True):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        out.append(line if in_fence else _LINK.sub(replace, line))
    return "".join(out)


def on_files(files: Files, config) -> Files:
    readme = _REPO_ROOT / "README.md"
    index = File.generated(config, "index.md", content=_rewrite_links(readme.read_text(encoding="utf-8"), ".", "docs"))
    files.append(index)
    for name, title in EXPECTED_PAGES.items():
        if files.get_file_from_path(name) is None:
            log.info("docs/%s is not written yet: a stub stands in for it", name)
            files.append(File.generated(config, name, content=f"# {title}\n\nThis page is being written.\n"))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Links out of docs/ in the docs pages themselves (e.g. ``../examples/x.py``) get the same treatment."""
    if page.file.src_uri == "index.md":
        return markdown
    page_dir = posixpath.join("docs", posixpath.dirname(page.file.src_uri))
    return _rewrite_links(markdown, page_dir, page_dir)
