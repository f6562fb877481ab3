"""Generation ratio of a dataset: Rg = completion tokens / prompt tokens, per example.

The prompt-loss-weight article uses Rg to predict when prompt-loss weighting matters: with a small Rg (long
prompts, short answers, like RACE) the prompt tokens dominate an unweighted loss. This module measures it the way
the trainer tokenizes:

* chat data (``prompt``/``completion`` message lists, or one ``messages`` list): the prompt is the chat-template
  rendering of the prompt messages with the generation prompt; the completion is the rest of the full rendering,
  starting where the two token sequences diverge (the common-prefix rule of TRL's SFT tokenization), so
  end-of-turn tokens count as completion tokens, as they do in training;
* plain strings: prompt and completion are tokenized separately, without special tokens.

`summarize_ratios` reports several averages because they answer different questions (see docs/DATA.md): the
arithmetic mean of per-example ratios (the article's Rg, optionally after trimming tails with ``trim=0.0025``), the
geometric mean and median (the typical example), and the ratio of totals Σcompletion / Σprompt (the share of
completion tokens in a token-averaged loss).

CLI: ``trl-plw gen-ratio DATASET [--plot out.png] [--json out.json] ...`` (`trl_plw.cli.gen_ratio`). Torch, transformers and
datasets are imported only when the command runs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "GenerationRatios",
    "compute_generation_ratios",
    "compute_token_lengths",
    "plot_ratios",
    "summarize_ratios",
]


class GenerationRatios(np.ndarray):
    """Per-example ratios (float64 array) that also carry the token counts they were computed from.

    ``prompt_lengths`` and ``completion_lengths`` are integer arrays aligned with the ratios; `summarize_ratios`
    uses them for the ratio of totals. Arrays derived from this one (slices, arithmetic) drop them, so a subset
    never carries counts of the full set.
    """

    prompt_lengths: np.ndarray | None
    completion_lengths: np.ndarray | None

    def __new__(cls, ratios: Any, prompt_lengths: Any = None, completion_lengths: Any = None) -> GenerationRatios:
        obj = np.asarray(ratios, dtype=np.float64).view(cls)
        obj.prompt_lengths = None if prompt_lengths is None else np.asarray(prompt_lengths, dtype=np.int64)
        obj.completion_lengths = None if completion_lengths is None else np.asarray(completion_lengths, dtype=np.int64)
        for lengths in (obj.prompt_lengths, obj.completion_lengths):
            if lengths is not None and lengths.shape != obj.shape:
                raise ValueError(f"token counts of shape {lengths.shape} do not match ratios of shape {obj.shape}")
        return obj

    def __array_finalize__(self, obj: Any) -> None:
        self.prompt_lengths = None
        self.completion_lengths = None

    def __array_wrap__(self, arr: Any, context: Any = None, return_scalar: bool = False) -> Any:
        arr = np.asarray(arr).view(np.ndarray)
        return arr[()] if return_scalar else arr


# --------------------------------------------------------------------------------------------------------------------
# Token counts


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, Mapping) and "role" in m for m in value)


def _content_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """Message contents joined by newlines (the no-chat-template view of a conversation)."""
    parts: list[str] = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):  # multimodal parts: keep the text ones
            parts += [p["text"] for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str)]
    return "\n".join(p for p in parts if p)


def _split_messages(messages: list[Mapping[str, Any]]) -> tuple[list, list]:
    """Prompt = everything before the last assistant message; completion = that message and what follows."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "assistant":
            return list(messages[:i]), list(messages[i:])
    return list(messages), []


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _encode_batch(tokenizer: Any, texts: list[str], batch_size: int) -> list[list[int]]:
    out: list[list[int]] = []
    for start in range(0, len(texts), batch_size):
        out += [
            list(ids) for ids in tokenizer(texts[start : start + batch_size], add_special_tokens=False)["input_ids"]
        ]
    return out


def compute_token_lengths(
    dataset: Iterable[Mapping[str, Any]],
    tokenizer: Any,
    *,
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    messages_column: str | None = None,
    use_chat_template: bool = True,
    batch_size: int = 512,
) -> tuple[np.ndarray, np.ndarray]:
    """Prompt and completion token counts per example (two int64 arrays).

    ``dataset`` is a ``datasets.Dataset`` or any iterable of dict rows. Columns: ``messages_column`` if given (the
    last assistant message and what follows is the completion); otherwise ``prompt_column``/``completion_column``;
    otherwise a ``messages`` column if the rows have one. Chat data is rendered with the tokenizer's chat template
    unless ``use_chat_template=False``, which joins the message contents with newlines and counts them as plain
    text. Plain strings are tokenized separately, without special tokens.
    """
    rows = iter(dataset)
    try:
        first = next(rows)
    except StopIteration:
        raise ValueError("the dataset is empty") from None
    keys = list(first.keys())
    if messages_column is None and not (prompt_column in first and completion_column in first) and "messages" in first:
        messages_column = "messages"
    if messages_column is not None and messages_column not in first:
        raise KeyError(f"no column {messages_column!r}; the rows have {keys}")
    if messages_column is None and not (prompt_column in first and completion_column in first):
        raise KeyError(
            f"need columns {prompt_column!r} and {completion_column!r} (or a messages column); the rows have {keys}. "
            "Choose them with prompt_column/completion_column/messages_column (--prompt-column ... on the CLI)"
        )
    if use_chat_template and not getattr(tokenizer, "chat_template", None):
        chat_template_missing = True
    else:
        chat_template_missing = False

    # Collect texts first, then tokenize them in batches (fast tokenizers are much quicker on lists).
    chat_index: list[int] = []
    chat_prompts: list[str] = []
    chat_fulls: list[str] = []
    plain_index: list[int] = []
    plain_prompts: list[str] = []
    plain_completions: list[str] = []
    n = 0
    for i, row in enumerate(_chain(first, rows)):
        n += 1
        if messages_column is not None:
            messages = row[messages_column]
            if not _is_messages(messages):
                raise ValueError(f"row {i}: column {messages_column!r} is not a list of chat messages")
            prompt, completion = _split_messages(messages)
        else:
            prompt, completion = row[prompt_column], row[completion_column]
        if _is_messages(prompt) and _is_messages(completion):
            if not use_chat_template:
                plain_index.append(i)
                plain_prompts.append(_content_text(prompt))
                plain_completions.append(_content_text(completion))
                continue
            if chat_template_missing:
                raise ValueError(
                    "the data is conversational but the tokenizer has no chat template; pass a chat model's "
                    "tokenizer or use_chat_template=False (--no-chat-template) to count the raw message text"
                )
            chat_index.append(i)
            chat_prompts.append(tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))
            chat_fulls.append(tokenizer.apply_chat_template(prompt + completion, tokenize=False) if completion else "")
        elif (prompt is None or isinstance(prompt, str)) and (completion is None or isinstance(completion, str)):
            plain_index.append(i)
            plain_prompts.append(prompt or "")
            plain_completions.append(completion or "")
        else:
            raise ValueError(
                f"row {i}: prompt and completion must both be strings or both be lists of chat messages, got "
                f"{type(prompt).__name__} and {type(completion).__name__}"
            )

    prompt_lengths = np.zeros(n, dtype=np.int64)
    completion_lengths = np.zeros(n, dtype=np.int64)
    if plain_index:
        p_ids = _encode_batch(tokenizer, plain_prompts, batch_size)
        c_ids = _encode_batch(tokenizer, plain_completions, batch_size)
        prompt_lengths[plain_index] = [len(x) for x in p_ids]
        completion_lengths[plain_index] = [len(x) for x in c_ids]
    if chat_index:
        p_ids = _encode_batch(tokenizer, chat_prompts, batch_size)
        f_ids = _encode_batch(tokenizer, chat_fulls, batch_size)
        diverged = 0
        for k, (p, f) in enumerate(zip(p_ids, f_ids, strict=True)):
            if not f:  # no completion messages
                prompt_lengths[chat_index[k]] = len(p)
                continue
            prefix = _common_prefix(p, f)
            diverged += prefix < len(p)
            # As in training: the prompt is the shared prefix, the completion is everything after it.
            prompt_lengths[chat_index[k]] = prefix
            completion_lengths[chat_index[k]] = len(f) - prefix
        if diverged:
            warnings.warn(
                f"{diverged} example(s): the tokenized prompt is not a prefix of the tokenized prompt+completion "
                "(the chat template renders the prompt differently alone, or tokens merge across the boundary); "
                "their prompt is counted up to where the two diverge, as TRL trains on them",
                UserWarning,
                stacklevel=2,
            )
    return prompt_lengths, completion_lengths


def _chain(first: Any, rest: Iterable[Any]) -> Iterable[Any]:
    yield first
    yield from rest


def compute_generation_ratios(
    dataset: Iterable[Mapping[str, Any]],
    tokenizer: Any,
    *,
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    messages_column: str | None = None,
    use_chat_template: bool = True,
    batch_size: int = 512,
) -> GenerationRatios:
    """Per-example generation ratios Rg = completion tokens / prompt tokens.

    Returns a `GenerationRatios` (a float64 ``np.ndarray``) that also carries ``prompt_lengths`` and
    ``completion_lengths``. An empty prompt gives ``inf`` (``nan`` if the completion is empty too); an empty
    completion gives ``0``. Both are reported with a ``UserWarning`` and handled by `summarize_ratios`. Arguments
    as in `compute_token_lengths`.
    """
    prompt_lengths, completion_lengths = compute_token_lengths(
        dataset,
        tokenizer,
        prompt_column=prompt_column,
        completion_column=completion_column,
        messages_column=messages_column,
        use_chat_template=use_chat_template,
        batch_size=batch_size,
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = completion_lengths / prompt_lengths.astype(np.float64)
    empty_prompt = int((prompt_lengths == 0).sum())
    empty_completion = int((completion_lengths == 0).sum())
    if empty_prompt:
        warnings.warn(
            f"{empty_prompt} of {len(ratios)} example(s) have an empty prompt (0 tokens): their ratio is infinite "
            "and summaries leave them out",
            UserWarning,
            stacklevel=2,
        )
    if empty_completion:
        warnings.warn(
            f"{empty_completion} of {len(ratios)} example(s) have an empty completion (0 tokens): their ratio is 0 "
            "and the geometric mean leaves them out",
            UserWarning,
            stacklevel=2,
        )
    return GenerationRatios(ratios, prompt_lengths, completion_lengths)


# --------------------------------------------------------------------------------------------------------------------
# Statistics


def summarize_ratios(
    ratios: Any,
    *,
    trim: float = 0.0,
    prompt_lengths: Any = None,
    completion_lengths: Any = None,
) -> dict[str, Any]:
    """Summary statistics of per-example generation ratios.

    Per-example statistics (``mean``, ``geometric_mean``, ``median``, ``p5``, ``p95``, ``min``, ``max``) use the
    finite ratios: examples with an empty prompt (``inf``/``nan``) are counted in ``n_empty_prompt`` and left out.
    With ``trim > 0`` the sorted finite ratios are cut to ``sorted[int(trim*m) : int((1-trim)*m)]`` before these
    statistics (``trim=0.0025`` reproduces the article's ``gen_ratios.py``, whose Rg is the mean of that slice).
    Ratios of 0 (empty completions) count in every statistic except the geometric mean, which needs logarithms.

    ``ratio_of_totals`` = Σcompletion tokens / Σprompt tokens over all examples (untrimmed). It needs the token
    counts: they come with the output of `compute_generation_ratios`, or pass ``prompt_lengths`` and
    ``completion_lengths``; otherwise it is ``None``.

    Every exclusion is explained in ``notes``. Raises ``ValueError`` when no example is left for a statistic.
    """
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    values = np.asarray(ratios, dtype=np.float64).reshape(-1)
    n = int(values.size)
    if n == 0:
        raise ValueError("no ratios to summarize (empty input)")
    if prompt_lengths is None and completion_lengths is None and isinstance(ratios, GenerationRatios):
        prompt_lengths, completion_lengths = ratios.prompt_lengths, ratios.completion_lengths
    notes: list[str] = []

    finite_mask = np.isfinite(values)
    n_empty_prompt = int((~finite_mask).sum())
    n_both_empty = int(np.isnan(values).sum())
    n_empty_completion = int((values == 0).sum()) + n_both_empty
    if n_empty_prompt:
        both = f" ({n_both_empty} with an empty completion too)" if n_both_empty else ""
        notes.append(
            f"{n_empty_prompt} of {n} example(s) have an empty prompt{both}: Rg is undefined (division by 0 prompt "
            "tokens), so they are left out of every per-example statistic"
        )
    finite = np.sort(values[finite_mask])
    if finite.size == 0:
        raise ValueError(f"every one of the {n} examples has an empty prompt; no generation ratio can be computed")

    m = int(finite.size)
    lo, hi = (int(trim * m), int((1 - trim) * m)) if trim > 0 else (0, m)
    kept = finite[lo:hi]
    if trim > 0:
        notes.append(f"trim={trim}: dropped the {lo} lowest and {m - hi} highest of {m} finite ratios")
    if kept.size == 0:
        raise ValueError(f"trim={trim} leaves no ratio out of {m}")

    positive = kept[kept > 0]
    n_zero = int(kept.size - positive.size)
    if n_zero:
        notes.append(
            f"{n_zero} example(s) have an empty completion (Rg = 0): counted in the mean, median and percentiles, "
            "but left out of the geometric mean (log 0 is undefined)"
        )
    if positive.size == 0:
        raise ValueError(
            f"all {kept.size} remaining example(s) have an empty completion (Rg = 0); the geometric mean is undefined"
        )

    p5, median, p95 = np.percentile(kept, [5, 50, 95])
    summary: dict[str, Any] = {
        "n": n,
        "n_used": int(kept.size),
        "n_empty_prompt": n_empty_prompt,
        "n_empty_completion": n_empty_completion,
        "n_trimmed": int(m - kept.size),
        "trim": float(trim),
        "mean": float(kept.mean()),
        "geometric_mean": float(math.exp(np.log(positive).mean())),
        "n_geometric_mean": int(positive.size),
        "median": float(median),
        "p5": float(p5),
        "p95": float(p95),
        "min": float(kept[0]),
        "max": float(kept[-1]),
        "ratio_of_totals": None,
        "prompt_tokens_total": None,
        "completion_tokens_total": None,
        "prompt_tokens_mean": None,
        "completion_tokens_mean": None,
    }
    if prompt_lengths is not None and completion_lengths is not None:
        p = np.asarray(prompt_lengths, dtype=np.int64).reshape(-1)
        c = np.asarray(completion_lengths, dtype=np.int64).reshape(-1)
        if p.size != n or c.size != n:
            raise ValueError(f"token counts ({p.size}, {c.size}) do not match the {n} ratios")
        total_p, total_c = int(p.sum()), int(c.sum())
        summary.update(
            ratio_of_totals=total_c / total_p if total_p else math.inf,
            prompt_tokens_total=total_p,
            completion_tokens_total=total_c,
            prompt_tokens_mean=total_p / n,
            completion_tokens_mean=total_c / n,
        )
    else:
        notes.append(
            "ratio_of_totals needs the token counts: summarize the output of compute_generation_ratios, or pass "
            "prompt_lengths and completion_lengths"
        )
    summary["notes"] = notes
    return summary


# --------------------------------------------------------------------------------------------------------------------
# Plot


def plot_ratios(
    ratios: Any,
    path: str | Path,
    *,
    title: str | None = None,
    bins: int = 50,
    summary: Mapping[str, Any] | None = None,
) -> Path:
    """Two histograms side by side (linear x, log10 x) with the mean, geometric mean and median marked.

    Uses matplotlib's Agg canvas directly (no pyplot, no display needed). Empty prompts are not drawn; empty
    completions (Rg = 0) appear only on the linear panel. The markers come from ``summary`` if given, else from
    `summarize_ratios` (untrimmed). Returns the written path.
    """
    from trl_plw.experiments import require_matplotlib

    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = np.asarray(ratios, dtype=np.float64).reshape(-1)
    finite = values[np.isfinite(values)]
    positive = finite[finite > 0]
    if positive.size == 0:
        raise ValueError("no positive finite ratio to plot")
    if summary is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            summary = summarize_ratios(ratios)
    marks = (
        ("mean", summary["mean"], "tab:red", "--"),
        ("geometric mean", summary["geometric_mean"], "tab:green", "-."),
        ("median", summary["median"], "tab:orange", ":"),
    )

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_lin, ax_log = fig.subplots(1, 2)
    ax_lin.hist(finite, bins=bins, color="tab:blue", alpha=0.75)
    ax_lin.set_xlabel("Rg = completion tokens / prompt tokens")
    ax_lin.set_title("linear x")
    lo, hi = float(positive.min()), float(positive.max())
    if lo == hi:
        lo, hi = lo / 1.5, hi * 1.5
    ax_log.hist(positive, bins=np.logspace(math.log10(lo), math.log10(hi), bins + 1), color="tab:blue", alpha=0.75)
    ax_log.set_xscale("log")
    ax_log.set_xlabel("Rg (log10 scale)")
    ax_log.set_title("log10 x")
    for ax in (ax_lin, ax_log):
        ax.set_ylabel("examples")
        for label, value, color, style in marks:
            if ax is ax_lin or value > 0:
                ax.axvline(value, color=color, linestyle=style, linewidth=1.6, label=f"{label} = {value:.4g}")
        ax.legend(fontsize=8)
    fig.suptitle(title or f"Generation ratio (n = {summary['n_used']})")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


# --------------------------------------------------------------------------------------------------------------------
# CLI
