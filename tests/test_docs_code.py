"""Every Python block a user may copy from README.md and docs/ runs, so a renamed argument breaks CI, not a user.

The blocks of one page run in order in one namespace (as a reader pastes them into one session), in a temporary
working directory. Hub ids are swapped for local stand-ins (the Hub is unreachable in tests): model ids for a tiny
random Llama saved next to the real SmolLM2 tokenizer (fast) and, in the ``slow`` variant, for the real offline
SmolLM2-135M-Instruct; dataset ids for small local files in the same schema. A page can mark a block in its markdown
source, in an HTML comment on the line(s) just above the block (the rendered page does not show it):

* ``<!-- docs-test: setup ... -->``: Python run before the next block, for context the page assumes (a loaded
  tokenizer, tensors of the right shapes);
* ``<!-- docs-test: cuda -->``: the block needs a CUDA device; it is skipped (and said so) without one;
* ``<!-- docs-test: skip <reason> -->``: not run; the reason is required. README.md may not skip any block.

docs/results/ holds recorded runs, not instructions, and is not scanned.
"""

from __future__ import annotations

import json
import re
import shutil
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = sorted(
    [
        ROOT / "README.md",
        *(
            p
            for p in (ROOT / "docs").rglob("*.md")
            if p.relative_to(ROOT / "docs").parts[0] not in ("results", "_tools")
        ),
    ]
)

# Hub ids used in the docs -> which local stand-in replaces them (see the fixtures below).
MODEL_IDS = ("Qwen/Qwen2.5-0.5B-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")
DATASET_IDS = {"trl-lib/Capybara": "chat", "ehovy/race": "race"}

_FENCE = re.compile(r"^```(\w*)\s*$")
_MARKER = re.compile(r"<!--\s*docs-test:\s*(setup|cuda|skip)\b(.*?)-->", re.DOTALL)


@dataclass
class Block:
    """One fenced Python block: its first code line in the markdown file, its code, and the markers above it."""

    path: Path
    line: int
    code: str
    setup: list[tuple[int, str]] = field(default_factory=list)
    skip: str | None = None
    cuda: bool = False


def python_blocks(path: Path) -> list[Block]:
    """The ```python blocks of a markdown file with their markers; a marker binds to the block right below it."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"{path}:{i + 1}: unclosed code fence"
        if fence.group(1) in ("python", "py"):
            block = Block(path, i + 2, "\n".join(lines[i + 1 : end]))
            _bind_markers(block, lines, i)
            blocks.append(block)
        i = end + 1
    return blocks


def _bind_markers(block: Block, lines: list[str], fence_index: int) -> None:
    """Read the HTML comments directly above the fence (blank lines allowed between them)."""
    j = fence_index - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    while j >= 0 and lines[j].rstrip().endswith("-->"):
        start = j
        while start >= 0 and "<!--" not in lines[start]:
            start -= 1
        comment = "\n".join(lines[start : j + 1])
        marker = _MARKER.search(comment)
        if marker is None:
            break
        kind, body = marker.group(1), marker.group(2)
        if kind == "setup":
            # The code starts on the line after "<!-- docs-test: setup"; keep its line numbers.
            block.setup.insert(0, (start + 2, body.split("\n", 1)[1] if "\n" in body else body))
        elif kind == "cuda":
            block.cuda = True
        else:
            reason = body.strip()
            assert reason, f"{block.path}:{start + 1}: docs-test: skip needs a reason"
            block.skip = reason
        j = start - 1
        while j >= 0 and not lines[j].strip():
            j -= 1


def substitute(code: str, stand_ins: dict[str, str]) -> str:
    for hub_id, local in stand_ins.items():
        code = code.replace(f'"{hub_id}"', repr(local)).replace(f"'{hub_id}'", repr(local))
    return code


def run_page(path: Path, stand_ins: dict[str, str]) -> tuple[dict, list[str]]:
    """Run a page's blocks in one namespace; returns the namespace and what was not run, with why. A failing block
    raises, its traceback naming the markdown file and line."""
    namespace: dict = {"__name__": f"docs_{path.stem}"}
    not_run = []
    for block in python_blocks(path):
        where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{block.line}"
        if block.skip:
            not_run.append(f"{where}: {block.skip}")
            continue
        if block.cuda and not torch.cuda.is_available():
            not_run.append(f"{where}: needs CUDA")
            continue
        for line, code in [*block.setup, (block.line, block.code)]:
            source = "\n" * (line - 1) + substitute(code, stand_ins)
            exec(compile(source, str(path), "exec"), namespace)  # noqa: S102 - running the docs is the point
    return namespace, not_run


# --------------------------------------------------------------------------------------------------------------------
# Local stand-ins for Hub ids


def _chat_rows(n: int = 16) -> list[dict]:
    facts = [("the capital of France", "Paris"), ("two plus two", "4"), ("the colour of the sky", "blue")]
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {facts[i % 3][0]}? (question {i})"},
                {"role": "assistant", "content": f"It is {facts[i % 3][1]}."},
            ]
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def dataset_stand_ins(tmp_path_factory) -> dict[str, str]:
    out = {}
    for hub_id, kind in DATASET_IDS.items():
        folder = tmp_path_factory.mktemp(kind)
        if kind == "chat":
            (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _chat_rows()))
        else:
            shutil.copy(ROOT / "tests" / "fixtures" / "race_sample.jsonl", folder / "train.jsonl")
        out[hub_id] = str(folder)
    return out


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer) -> str:
    path = tmp_path_factory.mktemp("tiny-smollm2")
    make_tiny_llama(vocab_size=len(smollm2_tokenizer)).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return str(path)


def _run(path: Path, model_dir: str, datasets: dict[str, str], tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    stand_ins = {**dict.fromkeys(MODEL_IDS, model_dir), **datasets}
    namespace, not_run = run_page(path, stand_ins)
    if not_run:
        print("not run:", *not_run, sep="\n  ")
    if path.name == "README.md":  # the quick start trains (a block that only builds a trainer would pass silently)
        assert namespace["trainer"].state.global_step >= 1


PAGES = [p for p in DOC_FILES if python_blocks(p)]
PAGE_IDS = [str(p.relative_to(ROOT)) for p in PAGES]


@pytest.mark.parametrize("path", PAGES, ids=PAGE_IDS)
def test_page_blocks_run(path, tiny_model_dir, dataset_stand_ins, tmp_path, monkeypatch):
    _run(path, tiny_model_dir, dataset_stand_ins, tmp_path, monkeypatch)


MODEL_PAGES = [p for p in PAGES if any(m in p.read_text(encoding="utf-8") for m in MODEL_IDS)]


@pytest.mark.slow
@pytest.mark.parametrize("path", MODEL_PAGES, ids=[str(p.relative_to(ROOT)) for p in MODEL_PAGES])
def test_page_blocks_run_with_the_real_model(path, smollm2_model_path, dataset_stand_ins, tmp_path, monkeypatch):
    """The same blocks with the real SmolLM2-135M-Instruct in place of every model id (what a user loads)."""
    _run(path, smollm2_model_path, dataset_stand_ins, tmp_path, monkeypatch)


def test_readme_blocks_are_found_and_none_skipped():
    blocks = python_blocks(ROOT / "README.md")
    assert len(blocks) >= 3, "the README's quick start, collator and kernel blocks"
    assert not [b.line for b in blocks if b.skip or b.cuda], "every README block runs on a CPU"
    quick_start = blocks[0].code
    assert "PLWTrainer" in quick_start and ".train()" in quick_start, "the first block trains"


def test_a_broken_block_fails_with_its_file_and_line(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# A page\n\n```python\nfrom trl_plw import KernelOptions\n```\n\ntext\n\n"
        "```python\nKernelOptions(memory_budget=1)\n```\n"
    )
    with pytest.raises(TypeError, match="memory_budget") as info:
        run_page(page, {})
    frames = traceback.extract_tb(info.value.__traceback__)
    assert (str(page), 10) in [(f.filename, f.lineno) for f in frames]


def test_markers_bind_to_the_block_below(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- docs-test: setup\nx = 2\n-->\n```python\nassert x == 2\n```\n\n"
        "<!-- docs-test: skip needs the Hub -->\n\n```python\nraise RuntimeError\n```\n"
        "<!-- docs-test: cuda -->\n```py\ny = 1\n```\n"
    )
    blocks = python_blocks(page)
    assert [(b.skip, b.cuda, len(b.setup)) for b in blocks] == [
        (None, False, 1),
        ("needs the Hub", False, 0),
        (None, True, 0),
    ]
    _, not_run = run_page(page, {})
    assert not_run[0].endswith("needs the Hub")
    assert (len(not_run) == 2) == (not torch.cuda.is_available())


def test_every_public_name_has_a_reference_entry():
    """Each name of ``trl_plw.__all__`` has a ``:::`` entry in docs/reference. The offline model's loaders are on
    their way out of ``__all__`` (they belong to the experiments; docs/INSTALL.md covers the offline model)."""
    import trl_plw

    documented = set()
    for page in (ROOT / "docs" / "reference").glob("*.md"):
        documented |= {m.rsplit(".", 1)[-1] for m in re.findall(r"^::: ([\w.]+)", page.read_text(), re.MULTILINE)}
    offline_loaders = {"load_model", "load_tokenizer", "load_model_and_tokenizer"}
    missing = set(trl_plw.__all__) - documented - offline_loaders - {"__version__"}
    assert not missing, f"public names without an API reference entry in docs/reference/: {sorted(missing)}"


def test_every_plwconfig_field_has_help():
    """The reference shows each field's ``metadata["help"]`` (docs/_tools/griffe_help.py), the text ``trl-plw sft
    --help`` prints: a field added without one would show up undocumented in both."""
    import dataclasses

    from trl.trainer.sft_config import SFTConfig

    from trl_plw import PLWConfig

    inherited = {f.name for f in dataclasses.fields(SFTConfig)}
    own = [f for f in dataclasses.fields(PLWConfig) if f.name not in inherited]
    assert own, "PLWConfig adds fields to SFTConfig"
    assert not [f.name for f in own if not f.metadata.get("help")], "PLWConfig fields without metadata help"
