"""Generation ratio: token counting, statistics checked against hand-computed values, empties, plot and CLI.

Hand computations use a whitespace tokenizer (one token per space-separated word) whose chat template wraps each
message as ``<role> content </s>`` and whose generation prompt is ``<assistant>``, so every count can be read off
the strings below.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trl_plw.cli.gen_ratio import add_cli
from trl_plw.experiments.gen_ratio import (
    GenerationRatios,
    compute_generation_ratios,
    compute_token_lengths,
    plot_ratios,
    summarize_ratios,
)

FIXTURES = Path(__file__).parent / "fixtures"


class WhitespaceTokenizer:
    """One token per whitespace-separated word; a toy chat template."""

    chat_template = "toy"
    eos_token = "</s>"

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, texts, add_special_tokens=False):
        single = isinstance(texts, str)
        batch = [texts] if single else texts
        ids = [[self.vocab.setdefault(word, len(self.vocab)) for word in text.split()] for text in batch]
        return {"input_ids": ids[0] if single else ids}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        assert not tokenize
        text = "".join(f"<{m['role']}> {m['content']} </s> " for m in messages)
        return text + ("<assistant> " if add_generation_prompt else "")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trl-plw")
    add_cli(parser.add_subparsers(dest="command"))
    return parser


PLAIN_ROWS = [json.loads(line) for line in (FIXTURES / "gen_ratio_sample.jsonl").read_text().splitlines()]
# By hand: prompt words 4, 2, 8, 1; completion words 1, 2, 2, 4 -> ratios 1/4, 1, 1/4, 4.


def test_plain_strings_hand_computed():
    ratios = compute_generation_ratios(PLAIN_ROWS, WhitespaceTokenizer())
    assert isinstance(ratios, np.ndarray) and isinstance(ratios, GenerationRatios)
    np.testing.assert_allclose(ratios, [0.25, 1.0, 0.25, 4.0])
    assert ratios.prompt_lengths.tolist() == [4, 2, 8, 1]
    assert ratios.completion_lengths.tolist() == [1, 2, 2, 4]

    s = summarize_ratios(ratios)
    assert s["n"] == 4 and s["n_used"] == 4 and s["n_empty_prompt"] == 0 and s["n_empty_completion"] == 0
    assert s["mean"] == pytest.approx(5.5 / 4)  # (0.25 + 1 + 0.25 + 4) / 4
    assert s["geometric_mean"] == pytest.approx(1 / math.sqrt(2))  # (0.25 * 1 * 0.25 * 4) ** (1/4) = 0.25 ** 0.25
    assert s["median"] == pytest.approx(0.625)  # sorted 0.25, 0.25, 1, 4 -> (0.25 + 1) / 2
    assert s["ratio_of_totals"] == pytest.approx(9 / 15)  # (1 + 2 + 2 + 4) / (4 + 2 + 8 + 1)
    assert s["prompt_tokens_total"] == 15 and s["completion_tokens_total"] == 9
    assert s["min"] == 0.25 and s["max"] == 4.0
    # Linear-interpolated percentiles over 4 sorted values: position 0.05*3 = 0.15 and 0.95*3 = 2.85.
    assert s["p5"] == pytest.approx(0.25) and s["p95"] == pytest.approx(1 + 0.85 * 3)
    assert s["notes"] == []
    json.dumps(s)  # serializable as is


def test_chat_prompt_completion_and_messages_hand_computed():
    tok = WhitespaceTokenizer()
    rows = [
        # "<user> a b c </s> <assistant>" = 6 prompt tokens; "X </s>" = 2 completion tokens.
        {"prompt": [{"role": "user", "content": "a b c"}], "completion": [{"role": "assistant", "content": "X"}]},
    ]
    ratios = compute_generation_ratios(rows, tok)
    assert ratios.prompt_lengths.tolist() == [6] and ratios.completion_lengths.tolist() == [2]

    conversations = [
        # "<system> s </s> <user> a </s> <assistant>" = 7; "X Y Z </s>" = 4.
        [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "X Y Z"},
        ],
        # Multi-turn: prompt is everything before the last assistant turn (3 + 3 + 4 + 1 = 11); "X </s>" = 2.
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c d"},
            {"role": "assistant", "content": "X"},
        ],
    ]
    rows = [{"conversation": c, "other": 1} for c in conversations]
    ratios = compute_generation_ratios(rows, tok, messages_column="conversation")
    assert ratios.prompt_lengths.tolist() == [7, 11] and ratios.completion_lengths.tolist() == [4, 2]
    np.testing.assert_allclose(ratios, [4 / 7, 2 / 11])
    # A "messages" column is found without being named.
    auto = compute_generation_ratios([{"messages": c} for c in conversations], tok)
    np.testing.assert_array_equal(auto, ratios)
    # Without the chat template only the message contents count: "s\na" = 2 words, "X Y Z" = 3.
    raw = compute_generation_ratios(rows, tok, messages_column="conversation", use_chat_template=False)
    assert raw.prompt_lengths.tolist() == [2, 4] and raw.completion_lengths.tolist() == [3, 1]


def test_real_tokenizer_counts(smollm2_tokenizer):
    tok = smollm2_tokenizer
    rows = [
        {"prompt": [{"role": "user", "content": "Hi there"}], "completion": [{"role": "assistant", "content": "B"}]}
    ]
    ratios = compute_generation_ratios(rows, tok)
    # SmolLM2's template adds its default system message: 32 tokens up to and including "<|im_start|>assistant\n";
    # the completion is "B", "<|im_end|>", "\n".
    assert ratios.prompt_lengths.tolist() == [32] and ratios.completion_lengths.tolist() == [3]
    assert ratios[0] == pytest.approx(3 / 32)
    prompt_ids = tok.apply_chat_template(
        rows[0]["prompt"], tokenize=True, add_generation_prompt=True, return_dict=True
    )
    assert len(prompt_ids["input_ids"]) == 32

    plain = compute_generation_ratios([{"prompt": "hello world", "completion": " B"}], tok)
    assert plain.prompt_lengths.tolist() == [2] and plain.completion_lengths.tolist() == [1]


def test_synthetic_race_completions_are_three_tokens(smollm2_tokenizer):
    from trl_plw.experiments.data import load_race

    ratios = compute_generation_ratios(load_race("synthetic", n=40), smollm2_tokenizer)
    assert set(ratios.completion_lengths.tolist()) == {3}
    assert ratios.prompt_lengths.min() > 120
    s = summarize_ratios(ratios)
    assert 0.003 < s["geometric_mean"] < 0.03


def test_empty_prompt_and_completion():
    rows = [
        {"prompt": "a b", "completion": "x"},  # 0.5
        {"prompt": "", "completion": "x y"},  # inf
        {"prompt": "a b c d", "completion": ""},  # 0
        {"prompt": "a", "completion": "x"},  # 1
    ]
    with pytest.warns(UserWarning) as record:
        ratios = compute_generation_ratios(rows, WhitespaceTokenizer())
    messages = " ".join(str(w.message) for w in record)
    assert "1 of 4 example(s) have an empty prompt" in messages
    assert "1 of 4 example(s) have an empty completion" in messages
    assert math.isinf(ratios[1]) and ratios[2] == 0

    s = summarize_ratios(ratios)
    assert s["n"] == 4 and s["n_used"] == 3 and s["n_empty_prompt"] == 1 and s["n_empty_completion"] == 1
    assert s["mean"] == pytest.approx(0.5)  # (0.5 + 0 + 1) / 3
    assert s["median"] == pytest.approx(0.5)
    assert s["geometric_mean"] == pytest.approx(math.sqrt(0.5))  # zero left out: sqrt(0.5 * 1)
    assert s["n_geometric_mean"] == 2
    assert s["ratio_of_totals"] == pytest.approx(4 / 7)  # (1 + 2 + 0 + 1) / (2 + 0 + 4 + 1)
    notes = " ".join(s["notes"])
    assert "empty prompt" in notes and "left out of every per-example statistic" in notes
    assert "empty completion" in notes and "left out of the geometric mean" in notes


def test_nothing_left_is_an_error():
    with pytest.raises(ValueError, match="empty prompt"):
        summarize_ratios([math.inf, math.nan])
    with pytest.raises(ValueError, match="geometric mean"):
        summarize_ratios([0.0, 0.0, math.inf])
    with pytest.raises(ValueError, match="empty"):
        summarize_ratios([])
    with pytest.raises(ValueError, match="dataset is empty"):
        compute_generation_ratios([], WhitespaceTokenizer())
    both = summarize_ratios([math.nan, 1.0])
    assert both["n_empty_prompt"] == 1 and both["n_empty_completion"] == 1
    assert "with an empty completion too" in both["notes"][0]


def test_plain_array_has_no_ratio_of_totals_unless_counts_given():
    s = summarize_ratios(np.array([0.25, 1.0]))
    assert s["ratio_of_totals"] is None and any("ratio_of_totals" in n for n in s["notes"])
    s = summarize_ratios([0.25, 1.0], prompt_lengths=[4, 2], completion_lengths=[1, 2])
    assert s["ratio_of_totals"] == pytest.approx(3 / 6)
    assert summarize_ratios(GenerationRatios([0.5, 2.0], [2, 1], [1, 2]))["ratio_of_totals"] == 1.0
    with pytest.raises(ValueError, match="do not match"):
        summarize_ratios([0.25, 1.0], prompt_lengths=[4], completion_lengths=[1])


def test_trim_reproduces_the_article_slicing():
    values = np.random.default_rng(0).permutation(np.arange(1, 1001)) / 1000.0
    s = summarize_ratios(values, trim=0.0025)
    # int(0.0025 * 1000) = 2 dropped at the bottom, 1000 - int(0.9975 * 1000) = 3 at the top: 0.003 .. 0.997 remain.
    assert s["n_used"] == 995 and s["n_trimmed"] == 5
    assert s["min"] == pytest.approx(0.003) and s["max"] == pytest.approx(0.997)
    assert s["mean"] == pytest.approx((0.003 + 0.997) / 2)
    assert summarize_ratios(values)["mean"] == pytest.approx(0.5005)
    with pytest.raises(ValueError, match="trim"):
        summarize_ratios(values, trim=0.5)


def test_derived_arrays_drop_token_counts():
    ratios = GenerationRatios([0.5, 2.0, 1.0], [2, 1, 1], [1, 2, 1])
    assert ratios[:2].prompt_lengths is None
    assert type(ratios * 2) is np.ndarray
    assert isinstance(ratios.mean(), float)
    with pytest.raises(ValueError, match="do not match"):
        GenerationRatios([0.5, 2.0], [2], [1, 2])


def test_column_errors():
    tok = WhitespaceTokenizer()
    with pytest.raises(KeyError, match="prompt_column"):
        compute_generation_ratios([{"question": "a", "answer": "b"}], tok)
    with pytest.raises(KeyError, match="no column 'chat'"):
        compute_generation_ratios([{"prompt": "a", "completion": "b"}], tok, messages_column="chat")
    out = compute_generation_ratios([{"q": "a b", "a": "c"}], tok, prompt_column="q", completion_column="a")
    assert out.tolist() == [0.5]
    with pytest.raises(ValueError, match="both be strings or both be lists"):
        compute_generation_ratios([{"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}], tok)

    class NoTemplate(WhitespaceTokenizer):
        chat_template = None

    chat = [{"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant", "content": "b"}]}]
    with pytest.raises(ValueError, match="no chat template"):
        compute_generation_ratios(chat, NoTemplate())
    assert compute_generation_ratios(chat, NoTemplate(), use_chat_template=False).tolist() == [1.0]


def test_plot_writes_png(tmp_path):
    ratios = compute_generation_ratios(PLAIN_ROWS, WhitespaceTokenizer())
    out = plot_ratios(ratios, tmp_path / "sub" / "rg.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    same = plot_ratios([1.0, 1.0], tmp_path / "flat.png", title="constant")  # degenerate range still plots
    assert same.stat().st_size > 0


def test_cli_on_local_jsonl(tmp_path, monkeypatch, capsys):
    import trl_plw.experiments.offline_model

    requested = []

    def fake_load_tokenizer(name):
        requested.append(name)
        return WhitespaceTokenizer()

    monkeypatch.setattr(trl_plw.experiments.offline_model, "load_tokenizer", fake_load_tokenizer)
    out_json, out_png = tmp_path / "rg.json", tmp_path / "rg.png"
    args = _parser().parse_args(
        ["gen-ratio", str(FIXTURES / "gen_ratio_sample.jsonl"), "--json", str(out_json), "--plot", str(out_png)]
    )
    assert args.func(args) == 0
    assert requested == ["smollm2-135m"]
    record = json.loads(out_json.read_text())
    assert record["n"] == 4 and record["mean"] == pytest.approx(1.375)
    assert record["geometric_mean"] == pytest.approx(1 / math.sqrt(2))
    assert record["median"] == pytest.approx(0.625) and record["ratio_of_totals"] == pytest.approx(0.6)
    assert out_png.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "ratio of totals" in printed and "1.375" in printed

    args = _parser().parse_args(
        ["gen-ratio", str(FIXTURES / "gen_ratio_sample.jsonl"), "--max-examples", "2", "--tokenizer", "other"]
    )
    assert args.func(args) == 0 and requested[-1] == "other"
    assert "examples               2" in capsys.readouterr().out

    args = _parser().parse_args(["gen-ratio", str(FIXTURES / "gen_ratio_sample.jsonl"), "--prompt-column", "nope"])
    assert args.func(args) == 2
    assert "error" in capsys.readouterr().err


def test_cli_formats_race_schema_with_real_tokenizer(tmp_path, monkeypatch, capsys, smollm2_tokenizer):
    import trl_plw.experiments.offline_model

    monkeypatch.setattr(trl_plw.experiments.offline_model, "load_tokenizer", lambda name: smollm2_tokenizer)
    out_json = tmp_path / "race.json"
    args = _parser().parse_args(["gen-ratio", str(FIXTURES / "race_sample.jsonl"), "--json", str(out_json)])
    assert args.func(args) == 0
    record = json.loads(out_json.read_text())
    assert record["n"] == 3 and record["completion_tokens_mean"] == 3.0
    assert "RACE schema formatted" in record["description"]
    capsys.readouterr()

    args = _parser().parse_args(["gen-ratio", "race-synthetic", "--max-examples", "10", "--json", str(out_json)])
    assert args.func(args) == 0
    assert json.loads(out_json.read_text())["n"] == 10


def test_cli_module_import_is_light():
    code = (
        "import sys, argparse, trl_plw.cli.gen_ratio as g; "
        "p = argparse.ArgumentParser(); g.add_cli(p.add_subparsers()); "
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'trl', 'matplotlib') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_compute_token_lengths_accepts_a_datasets_dataset():
    import datasets

    ds = datasets.Dataset.from_list(PLAIN_ROWS)
    p, c = compute_token_lengths(ds, WhitespaceTokenizer())
    assert p.tolist() == [4, 2, 8, 1] and c.tolist() == [1, 2, 2, 4]
