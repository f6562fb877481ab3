"""RACE multiple-choice reading comprehension as TRL prompt-completion data.

One RACE row (Hub schema of ``ehovy/race``: ``example_id, article, question, options, answer``) becomes one
prompt-completion example: the prompt is `RACE_PROMPT_TEMPLATE` filled with the article, the question and the four
options labelled ``A.``-``D.``; the completion is the answer letter. The conversational form (default) is a pair of
one-message lists, so TRL (and `PLWTrainer`) apply the tokenizer's chat template themselves:

    {"prompt": [{"role": "user", "content": "Choose the correct option ..."}],
     "completion": [{"role": "assistant", "content": "B"}]}

`load_race` reads the offline synthetic generator (``"synthetic"``), a Hub dataset id (``"ehovy/race"``) or a local
file, and formats every source with the same code. This module imports no heavy library at import time; `datasets`
is imported inside the loading functions.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trl_plw.experiments.data.synthetic_race import ANSWER_LETTERS, LENGTH_PRESETS, generate_race_rows

# fmt: off
RACE_PROMPT_TEMPLATE = (
    "Choose the correct option based on the context.\n"
    "Context:{article}\n"
    "Question:{question}\n"
    "Options:\n"
    "{options}"
)
# fmt: on
"""User message of a RACE example. ``{options}`` is the four `OPTION_TEMPLATE` lines joined by newlines.

It keeps the wording of the prompt-loss-weight article (``Choose the correct option based on the context.\\n
Context:{article}\\nQuestion:{question}\\nOptions:{options}``) with one deliberate difference: the article pasted
the options as a raw Python list (``['x', 'y', 'z', 'w']``) and asked for a letter the prompt never showed, while
here each option sits on its own line after its letter, so the completion letter refers to something in the prompt.
"""

OPTION_TEMPLATE = "{letter}. {text}"
"""One option line inside ``{options}``, e.g. ``B. He wanted to see the sea.``"""

RACE_HUB_ID = "ehovy/race"
RACE_CONFIGS = ("all", "middle", "high")
SYNTHETIC_SOURCES = ("synthetic", "race-synthetic")
SYNTHETIC_DEFAULT_SIZE = 1000
SYNTHETIC_CONFIG_LENGTHS: dict[str, str | tuple[int, int]] = {"all": "mixed", "middle": (80, 250), "high": (200, 400)}
"""For the synthetic source the RACE config picks an article length range: RACE-M (middle school) passages are
shorter than RACE-H (high school) ones."""

METADATA_COLUMNS = ("example_id", "answer", "question_type")
"""Source columns kept next to ``prompt``/``completion`` when ``keep_metadata=True``."""

_LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")

__all__ = [
    "ANSWER_LETTERS",
    "METADATA_COLUMNS",
    "OPTION_TEMPLATE",
    "RACE_CONFIGS",
    "RACE_HUB_ID",
    "RACE_PROMPT_TEMPLATE",
    "RaceFormatError",
    "answer_token_ids",
    "answer_token_variants",
    "format_race_example",
    "format_race_prompt",
    "load_race",
    "load_raw_dataset",
    "validate_race_row",
]


class RaceFormatError(ValueError):
    """A row does not follow the RACE schema (four options, answer A-D, non-empty article and question)."""


# --------------------------------------------------------------------------------------------------------------------
# Formatting


def _row_label(row: Mapping[str, Any]) -> str:
    example_id = row.get("example_id")
    return f"RACE row {example_id!r}" if example_id is not None else "RACE row"


_STRING_LITERAL = re.compile(r"'(?:[^'\\]|\\.)*'" + r'|"(?:[^"\\]|\\.)*"')


def _parse_option_list(text: str) -> list[str] | None:
    """A list stored as text (CSV): JSON, a Python list literal, or numpy's repr (``['a' 'b' 'c' 'd']``)."""
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, list):
        return parsed
    stripped = text.strip()
    if not (stripped.startswith("[") and stripped.endswith("]")):
        return None
    # Python and numpy reprs: read each quoted string on its own (numpy omits the commas between them, and
    # Python would concatenate adjacent literals).
    try:
        return [ast.literal_eval(m.group(0)) for m in _STRING_LITERAL.finditer(stripped)]
    except (ValueError, SyntaxError):
        return None


def _parse_options(options: Any, label: str) -> list[str]:
    if isinstance(options, str):  # CSV files store the list as text
        parsed = _parse_option_list(options)
        if parsed is None:
            raise RaceFormatError(f"{label}: 'options' must be a list of 4 strings, got the string {options!r}")
        options = parsed
    if not isinstance(options, Sequence) or isinstance(options, (str, bytes)):
        raise RaceFormatError(f"{label}: 'options' must be a list of 4 strings, got {type(options).__name__}")
    if len(options) != len(ANSWER_LETTERS):
        raise RaceFormatError(f"{label}: expected exactly 4 options (A-D), got {len(options)}: {list(options)!r}")
    if not all(isinstance(o, str) for o in options):
        raise RaceFormatError(f"{label}: every option must be a string, got {list(options)!r}")
    return [o.strip() for o in options]


def validate_race_row(row: Mapping[str, Any]) -> tuple[str, str, list[str], str]:
    """Check one RACE-schema row and return ``(article, question, options, answer)`` normalized.

    Article, question and options are stripped of surrounding whitespace; the answer is upper-cased. Options stored
    as a JSON or Python list literal (CSV files) are parsed. Raises `RaceFormatError` (a ``ValueError``) naming the
    row's ``example_id`` when a column is missing, the article or question is empty, there are not exactly four
    string options, or the answer is not one of ``A``-``D``.
    """
    label = _row_label(row)
    missing = [c for c in ("article", "question", "options", "answer") if c not in row]
    if missing:
        raise RaceFormatError(
            f"{label}: missing column(s) {missing}; a RACE row has article, question, options, answer"
        )
    article, question, answer = row["article"], row["question"], row["answer"]
    for name, value in (("article", article), ("question", question)):
        if not isinstance(value, str) or not value.strip():
            raise RaceFormatError(f"{label}: '{name}' must be a non-empty string, got {value!r}")
    if not isinstance(answer, str) or answer.strip().upper() not in ANSWER_LETTERS:
        raise RaceFormatError(f"{label}: 'answer' must be one of {', '.join(ANSWER_LETTERS)}, got {answer!r}")
    options = _parse_options(row["options"], label)
    return article.strip(), question.strip(), options, answer.strip().upper()


def format_race_prompt(article: str, question: str, options: Sequence[str]) -> str:
    """Fill `RACE_PROMPT_TEMPLATE` (no validation; see `format_race_example`)."""
    lines = "\n".join(OPTION_TEMPLATE.format(letter=L, text=o) for L, o in zip(ANSWER_LETTERS, options, strict=True))
    return RACE_PROMPT_TEMPLATE.format(article=article, question=question, options=lines)


def _render_chat_pair(
    prompt: list[dict[str, str]], completion: list[dict[str, str]], tokenizer: Any
) -> tuple[str, str]:
    """Prompt and completion as plain strings through ``tokenizer``'s chat template.

    The prompt is the rendering with the generation prompt (ending, for ChatML, in ``<|im_start|>assistant\\n``); the
    completion is the rest of the full conversation. Text after the last EOS token (ChatML's trailing newline) is
    dropped, because TRL appends an EOS to plain completions that do not end with one.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "conversational=False renders the example through the tokenizer's chat template, but this tokenizer has "
            "none; use conversational=True or a chat model's tokenizer"
        )
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError(
            "the chat template renders the prompt differently alone and followed by the answer, so the example "
            "cannot be split into plain prompt and completion strings; use conversational=True"
        )
    completion_text = full_text[len(prompt_text) :]
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos in completion_text and completion_text.rstrip().endswith(eos):
        completion_text = completion_text.rstrip()
    return prompt_text, completion_text


def format_race_example(
    row: Mapping[str, Any],
    *,
    conversational: bool = True,
    tokenizer: Any | None = None,
    system_prompt: str | None = None,
) -> dict[str, Any]:
    """Turn one RACE-schema row into a TRL prompt-completion example.

    With ``conversational=True`` (default): ``{"prompt": [{"role": "user", "content": <RACE_PROMPT_TEMPLATE
    filled>}], "completion": [{"role": "assistant", "content": "B"}]}``; the trainer applies the chat template.

    With ``conversational=False``: plain strings already rendered through ``tokenizer``'s chat template; for ChatML
    ``prompt`` ends with ``<|im_start|>assistant\\n`` and ``completion`` is ``"B<|im_end|>"``.

    ``system_prompt`` (a string, ``""`` included) opens the prompt with that system message. Chat templates that
    insert a default system prompt when none is given (SmolLM2, Qwen2) then render this one instead; ``""`` shortens
    every SmolLM2 row by 16 tokens. None (default): no system message, the template's own default.

    Raises `RaceFormatError` for an invalid row (see `validate_race_row`).
    """
    article, question, options, answer = validate_race_row(row)
    prompt = [{"role": "user", "content": format_race_prompt(article, question, options)}]
    if system_prompt is not None:
        prompt.insert(0, {"role": "system", "content": system_prompt})
    completion = [{"role": "assistant", "content": answer}]
    if conversational:
        return {"prompt": prompt, "completion": completion}
    if tokenizer is None:
        raise ValueError("conversational=False needs a tokenizer whose chat template renders the strings")
    prompt_text, completion_text = _render_chat_pair(prompt, completion, tokenizer)
    return {"prompt": prompt_text, "completion": completion_text}


# --------------------------------------------------------------------------------------------------------------------
# Loading


def _local_format(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        suffixes.pop()
    return _LOCAL_FORMATS.get(suffixes[-1]) if suffixes else None


def _select_split(dataset_dict: Any, split: str | None, where: str) -> Any:
    import datasets

    if split in (None, "all"):
        return datasets.concatenate_datasets([dataset_dict[k] for k in dataset_dict])
    if split not in dataset_dict:
        raise KeyError(f"{where} has no split {split!r}; available: {sorted(dataset_dict)}")
    return dataset_dict[split]


def load_raw_dataset(source: str | Path, config: str | None = None, split: str | None = "train", **load_kwargs: Any):
    """Load a table as a ``datasets.Dataset`` from a Hub id, a local file or a local folder (no formatting).

    * a file (``.jsonl``/``.json``/``.parquet``/``.csv``/``.arrow``, optionally compressed):
      ``datasets.load_dataset(<format>, data_files=...)``; ``config`` and ``split`` are ignored (one file is one
      split);
    * a folder written by ``save_to_disk``: ``datasets.load_from_disk``, then ``split``;
    * another folder: ``datasets.load_dataset(folder, split=...)`` (split names inferred from file names);
    * anything else is a Hub id: ``datasets.load_dataset(source, config, split=split, **load_kwargs)``.

    ``split="all"`` (or ``None``) concatenates every split. A path with a known data-file extension that does not
    exist raises ``FileNotFoundError`` instead of being sent to the Hub.
    """
    import datasets

    path = Path(source).expanduser()
    if path.is_file():
        fmt = _local_format(path)
        if fmt is None:
            raise ValueError(f"{path}: unknown data file type; use one of {sorted(_LOCAL_FORMATS)}")
        return datasets.load_dataset(fmt, data_files={"train": str(path)}, split="train", **load_kwargs)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            return _select_split(loaded, split, str(path)) if isinstance(loaded, datasets.DatasetDict) else loaded
        if split in (None, "all"):
            return _select_split(datasets.load_dataset(str(path), **load_kwargs), None, str(path))
        return datasets.load_dataset(str(path), split=split, **load_kwargs)
    if _local_format(path) is not None:
        raise FileNotFoundError(f"no such data file: {path}")
    if split in (None, "all"):
        return _select_split(datasets.load_dataset(str(source), config, **load_kwargs), None, str(source))
    return datasets.load_dataset(str(source), config, split=split, **load_kwargs)


def load_race(
    source: str | Path = "synthetic",
    config: str = "all",
    split: str = "train",
    n: int | None = None,
    seed: int = 0,
    *,
    conversational: bool = True,
    tokenizer: Any | None = None,
    keep_metadata: bool = False,
    length: str | tuple[int, int] | None = None,
    residents: int | tuple[int, int] | None = None,
    system_prompt: str | None = None,
    num_proc: int | None = None,
    **load_kwargs: Any,
):
    """RACE as a ``datasets.Dataset`` of prompt-completion examples (see `format_race_example`).

    Args:
        source: ``"synthetic"`` (offline generator, `generate_race_rows`), a Hub id such as ``"ehovy/race"``, or
            a local file/folder in the Hub schema (``article, question, options, answer``; ``example_id``
            optional).
        config: RACE config ``"all"``, ``"middle"`` or ``"high"``. Passed to the Hub; for the synthetic source it
            picks the article length range (`SYNTHETIC_CONFIG_LENGTHS`); ignored for local files.
        split: split to load (``"all"`` concatenates them). For the synthetic source, different splits are
            different random streams, so train/validation/test never share a row.
        n: number of examples. Synthetic: rows to generate (default `SYNTHETIC_DEFAULT_SIZE`). Other sources: a
            random subset of ``n`` rows drawn with ``seed`` (default: every row, in source order).
        seed: generator seed (synthetic) or subset seed (other sources).
        conversational: message lists (default) or plain strings rendered with ``tokenizer``'s chat template.
        tokenizer: needed only when ``conversational=False``.
        keep_metadata: keep the source's `METADATA_COLUMNS` (``example_id``, ``answer``, ...) next to
            ``prompt``/``completion``.
        length: synthetic only: overrides the length range chosen by ``config`` (see `LENGTH_PRESETS`).
        residents: synthetic only: people per article (see `generate_race_rows`); default 4-7.
        system_prompt: the system message of every example (see `format_race_example`); None: the template's.
        num_proc: processes for ``Dataset.map`` (Hub and local sources).
        **load_kwargs: forwarded to ``datasets.load_dataset`` (``revision``, ``cache_dir``, ...).
    """
    import datasets

    source_name = str(source)
    if source_name in SYNTHETIC_SOURCES:
        if config not in SYNTHETIC_CONFIG_LENGTHS:
            raise ValueError(f"config must be one of {RACE_CONFIGS}, got {config!r}")
        if length is not None and isinstance(length, str) and length not in LENGTH_PRESETS:
            raise ValueError(f"length must be one of {sorted(LENGTH_PRESETS)} or a (min, max) pair, got {length!r}")
        rows = generate_race_rows(
            SYNTHETIC_DEFAULT_SIZE if n is None else n,
            seed=seed,
            length=SYNTHETIC_CONFIG_LENGTHS[config] if length is None else length,
            split=split,
            residents=residents,
        )
        examples = []
        for row in rows:
            example = format_race_example(
                row, conversational=conversational, tokenizer=tokenizer, system_prompt=system_prompt
            )
            if keep_metadata:
                example.update({c: row[c] for c in METADATA_COLUMNS if c in row})
            examples.append(example)
        return datasets.Dataset.from_list(examples)

    if source_name == RACE_HUB_ID and config not in RACE_CONFIGS:
        raise ValueError(f"{RACE_HUB_ID} has configs {RACE_CONFIGS}, got {config!r}")
    raw = load_raw_dataset(source, config, split, **load_kwargs)
    missing = [c for c in ("article", "question", "options", "answer") if c not in raw.column_names]
    if missing:
        raise RaceFormatError(
            f"{source_name}: not in the RACE schema, missing column(s) {missing}; columns are {raw.column_names}"
        )
    if n is not None and n < len(raw):
        raw = raw.shuffle(seed=seed).select(range(n))
    keep = set(METADATA_COLUMNS) if keep_metadata else set()
    remove = [c for c in raw.column_names if c not in keep]
    return raw.map(
        format_race_example,
        fn_kwargs={"conversational": conversational, "tokenizer": tokenizer, "system_prompt": system_prompt},
        remove_columns=remove,
        num_proc=num_proc,
        desc="Formatting RACE",
    )


# --------------------------------------------------------------------------------------------------------------------
# Answer tokens


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _first_completion_token(tokenizer: Any, letter: str) -> int:
    """Id of the first completion token when the assistant answers ``letter`` after the generation prompt."""
    prompt = [{"role": "user", "content": format_race_prompt("Text.", "Question?", ["w", "x", "y", "z"])}]
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": letter}], tokenize=False)
    prompt_ids, full_ids = _encode(tokenizer, prompt_text), _encode(tokenizer, full_text)
    start = 0
    for a, b in zip(prompt_ids, full_ids, strict=False):
        if a != b:
            break
        start += 1
    if start >= len(full_ids):
        raise ValueError(f"the chat template rendered no completion tokens for the answer {letter!r}")
    token = full_ids[start]
    if tokenizer.decode([token]).strip() != letter:
        raise ValueError(
            f"the first completion token for the answer {letter!r} is {tokenizer.decode([token])!r} (id {token}), "
            "which is not the letter alone; answer-letter accuracy cannot be read from one token with this tokenizer"
        )
    return token


def answer_token_variants(tokenizer: Any) -> dict[str, list[int]]:
    """Token ids that can stand for each answer letter, most likely first.

    For each letter: the first completion token after the chat template's assistant header (when the tokenizer
    has a chat template), then the letter alone and the letter with a leading space, each only if it is a single
    token and not already listed. With SmolLM2 (ChatML) that is ``{"A": [49, 330], "B": [50, 389], ...}``: ``A`` in
    context is the bare-letter token and ``" A"`` is a separate token.
    """
    variants: dict[str, list[int]] = {}
    for letter in ANSWER_LETTERS:
        ids: list[int] = []
        if getattr(tokenizer, "chat_template", None):
            ids.append(_first_completion_token(tokenizer, letter))
        for text in (letter, " " + letter):
            encoded = _encode(tokenizer, text)
            if len(encoded) == 1 and encoded[0] not in ids and tokenizer.decode(encoded).strip() == letter:
                ids.append(encoded[0])
        if not ids:
            raise ValueError(f"no single token stands for the answer letter {letter!r} in this tokenizer")
        variants[letter] = ids
    flat = [i for ids in variants.values() for i in ids]
    if len(flat) != len(set(flat)):
        raise ValueError(f"answer letters share token ids: {variants}")
    return variants


def answer_token_ids(tokenizer: Any, *, include_variants: bool = False) -> list[int]:
    """Token ids of the answer letters, for reading the model's choice off the first completion position.

    By default four ids in ``A, B, C, D`` order: the token each letter becomes right after the assistant header
    (``<|im_start|>assistant\\n`` for ChatML), i.e. what the model predicts at the first completion position;
    ``argmax`` over these four logits is the model's answer. ``include_variants=True`` returns every id of
    `answer_token_variants` (letter-major), e.g. to also count ``" B"`` as a B.
    """
    variants = answer_token_variants(tokenizer)
    if include_variants:
        return [i for letter in ANSWER_LETTERS for i in variants[letter]]
    return [variants[letter][0] for letter in ANSWER_LETTERS]
