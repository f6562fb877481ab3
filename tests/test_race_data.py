"""RACE formatting, loading (local file, monkeypatched Hub, synthetic) and the synthetic generator's guarantees."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import pytest

from trl_plw.experiments.data import (
    ANSWER_LETTERS,
    QUESTION_TYPES,
    RACE_PROMPT_TEMPLATE,
    RaceFormatError,
    answer_token_ids,
    answer_token_variants,
    format_race_example,
    generate_race_rows,
    load_race,
)
from trl_plw.experiments.data import synthetic_race as sr

FIXTURE = Path(__file__).parent / "fixtures" / "race_sample.jsonl"


def fixture_rows() -> list[dict]:
    return [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------------------------
# Formatting


def test_format_real_row_matches_template_literally():
    row = fixture_rows()[0]
    out = format_race_example(row)
    expected = (
        "Choose the correct option based on the context.\n"
        "Context:Tom lives in a small town near the sea. Every morning he walks his dog along the beach before school. "
        "Last Saturday he found an old bottle in the sand. Inside the bottle there was a letter written by a girl from "
        "Norway. Tom decided to write back to her, and now they are pen friends.\n"
        "Question:What did Tom find on the beach?\n"
        "Options:\n"
        "A. A dog\n"
        "B. An old bottle\n"
        "C. A shell\n"
        "D. A map"
    )
    assert out == {
        "prompt": [{"role": "user", "content": expected}],
        "completion": [{"role": "assistant", "content": "B"}],
    }


def test_format_strips_whitespace_and_keeps_inner_newlines():
    rows = fixture_rows()
    third = format_race_example(rows[2])["prompt"][0]["content"]
    assert third == (
        "Choose the correct option based on the context.\n"
        "Context:Mrs. Green teaches music at our school. She can play the piano, the violin and the guitar. On Fridays "
        "she gives free lessons to students who want to join the school band.\n"
        "Question:The passage is mainly about _ .\n"
        "Options:\nA. a music teacher\nB. a school band\nC. a piano lesson\nD. a student"
    )
    second = format_race_example(rows[1])
    assert "more easily.\nA good night's sleep" in second["prompt"][0]["content"]
    assert second["completion"][0]["content"] == "C"


def test_template_documents_its_placeholders():
    assert RACE_PROMPT_TEMPLATE.startswith("Choose the correct option based on the context.\nContext:{article}")
    for field in ("{article}", "{question}", "{options}"):
        assert field in RACE_PROMPT_TEMPLATE


def test_chat_rendering_with_smollm2(smollm2_tokenizer):
    tok = smollm2_tokenizer
    for row in fixture_rows():
        ex = format_race_example(row)
        prompt_text = tok.apply_chat_template(ex["prompt"], tokenize=False, add_generation_prompt=True)
        assert prompt_text.endswith("<|im_start|>assistant\n")
        letter = ex["completion"][0]["content"]
        assert letter in ANSWER_LETTERS and len(letter) == 1
        full = tok.apply_chat_template(ex["prompt"] + ex["completion"], tokenize=False)
        assert full == prompt_text + letter + "<|im_end|>\n"

        plain = format_race_example(row, conversational=False, tokenizer=tok)
        assert plain["prompt"] == prompt_text
        assert plain["completion"] == letter + "<|im_end|>"


def test_system_prompt_replaces_the_template_default(smollm2_tokenizer):
    tok = smollm2_tokenizer
    row = fixture_rows()[0]
    default = format_race_example(row)
    empty = format_race_example(row, system_prompt="")
    assert empty["prompt"][0] == {"role": "system", "content": ""} and empty["prompt"][1:] == default["prompt"]
    assert empty["completion"] == default["completion"]
    n_default, n_empty = (
        len(tok(tok.apply_chat_template(e["prompt"], tokenize=False, add_generation_prompt=True))["input_ids"])
        for e in (default, empty)
    )
    assert "SmolLM" in tok.apply_chat_template(default["prompt"], tokenize=False)  # the template's own default
    assert n_default - n_empty == 16
    loaded = load_race("synthetic", n=2, system_prompt="Answer with one letter.")
    assert all(p[0] == {"role": "system", "content": "Answer with one letter."} for p in loaded["prompt"])


def test_plain_variant_needs_a_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        format_race_example(fixture_rows()[0], conversational=False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"answer": "E"}, "answer"),
        ({"answer": 1}, "answer"),
        ({"options": ["a", "b", "c"]}, "exactly 4 options"),
        ({"options": ["a", "b", "c", "d", "e"]}, "exactly 4 options"),
        ({"options": ["a", "b", "c", 4]}, "string"),
        ({"article": "   "}, "'article' must be a non-empty string"),
        ({"question": ""}, "'question' must be a non-empty string"),
    ],
)
def test_validation_errors_name_the_row(change, message):
    row = {**fixture_rows()[0], **change}
    with pytest.raises(RaceFormatError, match=re.escape(message)) as info:
        format_race_example(row)
    assert "middle-fixture-001.txt" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_column_and_lenient_answer_and_string_options():
    row = fixture_rows()[0]
    with pytest.raises(RaceFormatError, match="missing column"):
        format_race_example({k: v for k, v in row.items() if k != "options"})
    lower = format_race_example({**row, "answer": " b "})
    assert lower["completion"][0]["content"] == "B"
    as_text = format_race_example({**row, "options": "['A dog', 'An old bottle', 'A shell', 'A map']"})
    assert as_text == format_race_example(row)


# ---------------------------------------------------------------------------------------------------------------------
# Answer tokens


def test_answer_token_ids_smollm2(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = answer_token_ids(tok)
    assert len(ids) == 4 and len(set(ids)) == 4
    assert [tok.decode([i]) for i in ids] == list(ANSWER_LETTERS)
    # Independently: the first token after the generation prompt in a full rendering of a real example.
    for row in fixture_rows():
        ex = format_race_example(row)
        prompt_text = tok.apply_chat_template(ex["prompt"], tokenize=False, add_generation_prompt=True)
        full_text = tok.apply_chat_template(ex["prompt"] + ex["completion"], tokenize=False)
        prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
        full_ids = tok(full_text, add_special_tokens=False)["input_ids"]
        assert full_ids[: len(prompt_ids)] == prompt_ids
        assert full_ids[len(prompt_ids)] == ids[ANSWER_LETTERS.index(row["answer"])]

    variants = answer_token_variants(tok)
    for letter, first in zip(ANSWER_LETTERS, ids, strict=True):
        assert variants[letter][0] == first
        spaced = tok(" " + letter, add_special_tokens=False)["input_ids"]
        assert len(spaced) == 1 and spaced[0] in variants[letter] and spaced[0] != first
    flat = answer_token_ids(tok, include_variants=True)
    assert flat == [i for letter in ANSWER_LETTERS for i in variants[letter]] and len(flat) == 8


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic generator


def test_synthetic_is_deterministic_and_seed_dependent():
    a = generate_race_rows(30, seed=3)
    assert a == generate_race_rows(30, seed=3)
    assert generate_race_rows(10, seed=3) == a[:10]  # row i does not depend on n
    assert generate_race_rows(5, seed=3, start=10) == a[10:15]
    b = generate_race_rows(30, seed=4)
    assert all(x["article"] != y["article"] for x, y in zip(a, b, strict=True))
    val = generate_race_rows(30, seed=3, split="validation")
    assert not {r["article"] for r in a} & {r["article"] for r in val}
    assert len({r["example_id"] for r in a + val}) == 60


def test_synthetic_schema_letters_and_lengths():
    rows = generate_race_rows(2000, seed=0)
    for row in rows:
        assert set(row) == {"example_id", "article", "question", "options", "answer", "question_type"}
        assert row["answer"] in ANSWER_LETTERS
        assert len(row["options"]) == 4 and all(isinstance(o, str) and o for o in row["options"])
        format_race_example(row)  # valid RACE row
    letters = Counter(r["answer"] for r in rows)
    assert all(0.2 < letters[L] / len(rows) < 0.3 for L in ANSWER_LETTERS), letters
    types = Counter(r["question_type"] for r in rows)
    assert set(types) == set(QUESTION_TYPES) and min(types.values()) > 0.12 * len(rows), types
    words = [len(r["article"].split()) for r in rows]
    assert 75 <= min(words) <= 100 and 380 <= max(words) <= 430
    assert statistics.pstdev(words) > 60
    assert all(r["article"].count("\n") >= 4 for r in rows)  # several paragraphs

    short = [len(r["article"].split()) for r in generate_race_rows(200, length="short")]
    long = [len(r["article"].split()) for r in generate_race_rows(200, length="long")]
    assert max(short) < min(long)
    custom = [len(r["article"].split()) for r in generate_race_rows(100, length=(120, 160))]
    assert min(custom) >= 115 and max(custom) <= 180


def _sentences(article: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", article) if s]


def _has(text: str, value: str) -> bool:
    return re.search(r"(?<!\w)" + re.escape(value) + r"(?!\w)", text, flags=re.IGNORECASE) is not None


def test_synthetic_answers_are_only_in_the_passage():
    vocab = sr.JOBS + sr.COLOURS + sr.ANIMALS + sr.INSTRUMENTS
    for row in generate_race_rows(600, seed=1):
        article, question, options = row["article"], row["question"], row["options"]
        answer = options[ANSWER_LETTERS.index(row["answer"])]
        assert len({o.lower() for o in options}) == 4, "distractors must be distinct"
        assert all(_has(article, o) for o in options), "all options, distractors included, occur in the passage"
        assert not any(_has(question, o) for o in options), "the question must not name an option"
        assert answer.lower() not in question.lower()
        sentences = _sentences(article)
        if row["question_type"] == "who":
            # The answer is the one person whose sentence states the attribute value named by the question.
            keys = [v for v in vocab if _has(question, v)] or [question.rstrip("?").split()[-1]]
            key = max(keys, key=len)
            holders = {o for o in options if any(_has(s, o.split()[0]) and _has(s, key) for s in sentences)}
            assert holders == {answer}, (question, holders)
        else:
            first = next(w for w in re.findall(r"[A-Z][a-z]+", question) if w in sr.FIRST_NAMES)
            assert any(_has(s, first) and _has(s, answer) for s in sentences), (question, answer)


def test_synthetic_facts_never_contradict():
    patterns = {
        "age": r"(\w+) (?:is|turned) (\d+)(?: years old| this year)",
        "pet": r"(\w+) (?:has|keeps) an? ([a-z ]+?) (?:called|named) (\w+)",
        "year": r"(\w+) (?:moved to|arrived in|came to live in) \w+ in (\d{4})",
        "job": r"(\w+) (?:works as|is|earns a living as) an? ([a-z ]+?)\.",
    }
    for row in generate_race_rows(400, seed=2):
        for name, pattern in patterns.items():
            facts: dict[str, set] = {}
            for match in re.finditer(pattern, row["article"]):
                facts.setdefault(match.group(1), set()).add(match.groups()[1:])
            assert all(len(v) == 1 for v in facts.values()), (name, facts)
            values = [next(iter(v)) for v in facts.values()]
            assert len(values) == len(set(values)), f"two people share a {name}"


def test_synthetic_vocabularies_are_disjoint_and_arguments_checked():
    sr._check_vocabularies()
    with pytest.raises(ValueError, match="length"):
        generate_race_rows(2, length="huge")
    with pytest.raises(ValueError, match="question_types"):
        generate_race_rows(2, question_types=["why"])
    only_who = generate_race_rows(20, question_types=["who"])
    assert {r["question_type"] for r in only_who} == {"who"}


def test_synthetic_rows_are_distinct_at_scale():
    # Generation speed is a benchmark concern (no timed unit tests); here: many rows, no duplicates.
    rows = generate_race_rows(2000, seed=9)
    assert len({r["example_id"] for r in rows}) == 2000
    assert len({(r["article"], r["question"]) for r in rows}) == 2000


# ---------------------------------------------------------------------------------------------------------------------
# load_race


def test_load_race_local_jsonl():
    ds = load_race(str(FIXTURE))
    assert isinstance(ds, datasets.Dataset)
    assert ds.column_names == ["prompt", "completion"]
    assert [ex["completion"][0]["content"] for ex in ds] == ["B", "C", "A"]
    assert ds[0] == format_race_example(fixture_rows()[0])

    meta = load_race(FIXTURE, keep_metadata=True)
    assert set(meta.column_names) == {"prompt", "completion", "example_id", "answer"}
    subset = load_race(FIXTURE, n=2, seed=0, keep_metadata=True)
    assert len(subset) == 2 and set(subset["example_id"]) <= set(meta["example_id"])


def test_load_race_local_csv_and_parquet(tmp_path):
    table = datasets.Dataset.from_list(fixture_rows())
    table.to_csv(tmp_path / "race.csv")
    table.to_parquet(tmp_path / "race.parquet")
    expected = load_race(FIXTURE)["prompt"]
    assert load_race(tmp_path / "race.csv")["prompt"] == expected
    assert load_race(str(tmp_path / "race.parquet"))["prompt"] == expected


def test_load_race_missing_file_and_wrong_schema(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_race(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(RaceFormatError, match="missing column"):
        load_race(bad)


def test_load_race_hub_path_is_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_list(fixture_rows())

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_race("ehovy/race", config="middle", split="validation", keep_metadata=True)
    assert calls == [(("ehovy/race", "middle"), {"split": "validation"})]
    assert set(ds.column_names) == {"example_id", "answer", "prompt", "completion"}
    assert ds[1]["completion"] == [{"role": "assistant", "content": "C"}]

    calls.clear()
    load_race("ehovy/race", config="high", split="test", revision="main")
    assert calls == [(("ehovy/race", "high"), {"split": "test", "revision": "main"})]
    with pytest.raises(ValueError, match="configs"):
        load_race("ehovy/race", config="college")


def test_load_race_synthetic():
    ds = load_race("synthetic", n=20, seed=5, keep_metadata=True)
    assert len(ds) == 20
    rows = generate_race_rows(20, seed=5)
    assert ds["example_id"] == [r["example_id"] for r in rows]
    assert ds[0]["prompt"] == format_race_example(rows[0])["prompt"]
    assert load_race("synthetic", n=20, seed=5)["prompt"] == ds["prompt"]
    val = load_race("synthetic", split="validation", n=20, seed=5)
    assert not set(p[0]["content"] for p in val["prompt"]) & set(p[0]["content"] for p in ds["prompt"])
    assert len(load_race("synthetic")) == 1000
    middle = [len(r[0]["content"].split()) for r in load_race("synthetic", config="middle", n=100)["prompt"]]
    high = [len(r[0]["content"].split()) for r in load_race("synthetic", config="high", n=100)["prompt"]]
    assert statistics.mean(middle) < statistics.mean(high)
    with pytest.raises(ValueError, match="config"):
        load_race("synthetic", config="college")


def test_load_race_plain_strings(smollm2_tokenizer):
    ds = load_race("synthetic", n=3, conversational=False, tokenizer=smollm2_tokenizer)
    for ex in ds:
        assert isinstance(ex["prompt"], str) and ex["prompt"].endswith("<|im_start|>assistant\n")
        assert re.fullmatch(r"[ABCD]<\|im_end\|>", ex["completion"])


def test_data_package_import_is_light():
    code = (
        "import sys, trl_plw.experiments.data, trl_plw.experiments.data.race, trl_plw.experiments.data.synthetic_race; "
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'trl') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_synthetic_residents_short_passages_one_stated_option():
    rows = generate_race_rows(400, seed=2, length=(20, 40), residents=1)
    letters = Counter(r["answer"] for r in rows)
    assert all(0.18 < letters[L] / len(rows) < 0.32 for L in ANSWER_LETTERS), letters
    for row in rows:
        format_race_example(row)
        correct = row["options"]["ABCD".index(row["answer"])]
        # exactly one option occurs in the passage: the asked person's value; the others are never stated
        assert [_has(row["article"], o) for o in row["options"]] == [o == correct for o in row["options"]], row
        assert len(row["article"].split()) < 60
    two = generate_race_rows(200, seed=2, length=(20, 40), residents=2)
    # with two residents, one distractor is in the passage too (stated for the other person)
    assert all(sum(_has(r["article"], o) for o in r["options"]) == 2 for r in two)
    assert generate_race_rows(30, seed=3) == generate_race_rows(30, seed=3, residents=None)  # default unchanged
    with pytest.raises(ValueError, match="residents"):
        generate_race_rows(2, residents=0)
