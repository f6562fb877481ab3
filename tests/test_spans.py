"""Span weights, presets and per-message weights on conversations rendered by real chat templates.

The expected token sets are built independently of `trl_plw.spans`: the text a span should cover is written out as a
literal and located with ``str.find`` in the rendered conversation, and the tokens the straddle rule must cover are
those whose offsets (from the tokenizer) overlap it. SmolLM2's own ChatML template and a Qwen-style tool-calling
template (written here) are used; token boundaries fall inside the regex boundaries in both (asserted).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from trl_plw import DataCollatorForWeightedCompletionLM as Collator
from trl_plw.message_weights import read_message_weight
from trl_plw.roles import Role, tokenize_messages
from trl_plw.spans import SPAN_PRESETS, SpanRule, resolve_span_rules, token_span_bits

# A Qwen-style template: tool calls rendered after the content as <tool_call> JSON blocks, tool results as a user turn
# wrapped in <tool_response>. Prefix-consistent (each message renders on its own).
QWEN_STYLE_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + (message.content or '') }}"
    "{%- for call in (message.tool_calls or []) %}"
    "{{- '\\n<tool_call>\\n' + (call.function | tojson) + '\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def call(city: str) -> dict:
    return {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}


def tool_conversation(variant: int = 0) -> list[dict]:
    """A multi-turn tool-calling conversation with message weights (Axolotl's `weight`, ms-swift's `loss`)."""
    cities = [("Paris", "Rome"), ("Oslo", "Lima"), ("Kyiv", "Pune")][variant % 3]
    return [
        {"role": "system", "content": "You are a weather agent. Call tools, then answer."},
        {"role": "user", "content": f"Is {cities[0]} warmer than {cities[1]} today?", "weight": 0.5},
        {
            "role": "assistant",
            "content": f"<think>Two cities: call get_weather twice ({variant}).</think>",
            "tool_calls": [call(cities[0]), call(cities[1])],
            "loss": 0.25,
        },
        {"role": "tool", "content": f'{{"city": "{cities[0]}", "celsius": 21}}'},
        {"role": "tool", "content": f'{{"city": "{cities[1]}", "celsius": 25}}', "weight": 0},
        {"role": "assistant", "content": f"Done. <think>25 > 21.</think>. No: {cities[1]} is warmer (25C vs 21C)."},
    ]


@pytest.fixture(scope="module")
def qwen_style_tokenizer(smollm2_tokenizer):
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.chat_template = QWEN_STYLE_TEMPLATE
    return tokenizer


def render(tokenizer, messages) -> tuple[str, list[int], np.ndarray]:
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return text, encoding["input_ids"], np.asarray(encoding["offset_mapping"])


def overlapping(offsets: np.ndarray, start: int, end: int, ids=None, tokenizer=None) -> set[int]:
    """Tokens with at least one character in [start, end) (special tokens left out when ids are given)."""
    special = set(tokenizer.all_special_ids) if tokenizer is not None else set()
    return {
        t
        for t, (s, e) in enumerate(offsets.tolist())
        if s < end and e > start and e > s and (ids is None or ids[t] not in special)
    }


def covered(bits: np.ndarray, bit: int) -> set[int]:
    return {int(t) for t in np.flatnonzero((bits >> bit) & 1)}


def find(text: str, literal: str, start: int = 0) -> tuple[int, int]:
    pos = text.find(literal, start)
    assert pos >= 0, literal
    return pos, pos + len(literal)


def straddles(offsets: np.ndarray, tokens: set[int], start: int, end: int) -> bool:
    """Whether a token of the set crosses the character range's boundary (the case the straddle rule is about)."""
    return any(offsets[t, 0] < start or offsets[t, 1] > end for t in tokens)


# ------------------------------------------------------------------------------------------------------ presets
def test_react_preset_on_rendered_chatml(smollm2_tokenizer):
    """react: Action/Action Input sections x2 (through the newline before the next keyword), the observation text x0,
    the keywords Thought/Observation/Final Answer and the end-of-turn token untouched."""
    tok = smollm2_tokenizer
    answer = (
        'Thought: I need the weather.\nAction: get_weather\nAction Input: {"city": "Paris"}\n'
        "Observation: 21C and sunny\nThought: I know it.\nFinal Answer: 21C"
    )
    messages = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": answer}]
    out = tokenize_messages(tok, messages)
    text, ids, offsets = render(tok, messages)
    assert out["input_ids"] == ids
    rules = resolve_span_rules("react")
    assert [r.name for r in rules] == ["react_action", "react_observation"]
    bits = token_span_bits(tok, out["input_ids"], out["token_roles"], rules)
    a0, _ = find(text, "Action: get_weather")
    _, a1 = find(text, '"Paris"}\n')
    assert covered(bits, 0) == overlapping(offsets, a0, a1)
    o0, o1 = find(text, " 21C and sunny\n")
    assert covered(bits, 1) == overlapping(offsets, o0, o1)
    # "Observation:" ends a token boundary-free region: ":" and " " may merge; the keyword itself is not covered
    keyword = overlapping(offsets, *find(text, "Observation"))
    assert not keyword & covered(bits, 1)
    assert ids[-2] == tok.convert_tokens_to_ids("<|im_end|>") and bits[-2] == 0  # the model still learns to stop


def test_hermes_and_think_presets_on_a_qwen_style_template(qwen_style_tokenizer):
    """hermes: <tool_call> blocks in the answers x2, <tool_response> blocks x0 wherever they are (here in the user
    turn the template writes around tool results, roles TEMPLATE and TOOL); think: each <think> block."""
    tok = qwen_style_tokenizer
    messages = tool_conversation()
    out = tokenize_messages(tok, messages)
    text, ids, offsets = render(tok, messages)
    assert out["input_ids"] == ids
    rules = resolve_span_rules(["hermes", "think=0.5"])
    assert [(r.name, r.weight) for r in rules] == [("tool_call", 2.0), ("tool_response", 0.0), ("think", 0.5)]
    bits = token_span_bits(tok, ids, out["token_roles"], rules)

    expected = {0: set(), 1: set(), 2: set()}
    for bit, (opening, closing) in enumerate(
        [("<tool_call>", "</tool_call>"), ("<tool_response>", "</tool_response>"), ("<think>", "</think>")]
    ):
        cursor = 0
        while (pos := text.find(opening, cursor)) >= 0:
            end = text.index(closing, pos) + len(closing)
            expected[bit] |= overlapping(offsets, pos, end)
            cursor = end
    assert all(expected.values())
    for bit in expected:
        assert covered(bits, bit) == expected[bit], rules[bit].name
    # tool responses sit on the prompt side (TOOL content, TEMPLATE wrappers): roles=all reaches them
    roles = np.asarray(out["token_roles"])
    assert set(roles[sorted(expected[1])].tolist()) == {int(Role.TOOL), int(Role.TEMPLATE)}
    # the regex boundaries do not align with token boundaries somewhere in this conversation
    assert any(
        straddles(offsets, overlapping(offsets, m.start(), m.end()), m.start(), m.end())
        for rule in rules
        for m in __import__("re").finditer(rule.pattern, text)
    )


def test_straddling_token_takes_the_span_weight(smollm2_tokenizer):
    """A match boundary inside a token: the token is covered (at least one of its characters is in the match)."""
    tok = smollm2_tokenizer
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The weather is fine."}]
    out = tokenize_messages(tok, messages)
    text, ids, offsets = render(tok, messages)
    bits = token_span_bits(tok, ids, out["token_roles"], [SpanRule("ather is f", 3.0)])
    start, end = find(text, "ather is f")
    tokens = covered(bits, 0)
    assert tokens == overlapping(offsets, start, end) and straddles(offsets, tokens, start, end)
    assert tok.decode([ids[t] for t in sorted(tokens)]) == " weather is fine"


def test_spans_only_read_their_roles_and_never_cross_turns(smollm2_tokenizer):
    tok = smollm2_tokenizer
    messages = [
        {"role": "user", "content": "say <think>x</think>"},
        {"role": "assistant", "content": "ok <think>"},
        {"role": "user", "content": "</think> done"},
        {"role": "assistant", "content": "fine"},
    ]
    out = tokenize_messages(tok, messages)
    assert not token_span_bits(tok, out["input_ids"], out["token_roles"], resolve_span_rules("think")).any()
    user = SpanRule(r"<think>.*?</think>", 0.0, roles=("user",), name="user_think")
    bits = token_span_bits(tok, out["input_ids"], out["token_roles"], [user])
    text, _, offsets = render(tok, messages)
    assert covered(bits, 0) == overlapping(offsets, *find(text, "<think>x</think>"))


def test_span_rule_parsing_and_errors():
    assert resolve_span_rules(None) == () and resolve_span_rules("") == ()
    rules = resolve_span_rules("react+react_observation=0.1+think")
    assert [(r.name, r.weight) for r in rules] == [("react_action", 2.0), ("react_observation", 0.1), ("think", 1.0)]
    mixed = resolve_span_rules(['{"Final Answer:": 3}', {"x+": {"weight": 0.5, "roles": ["user"], "name": "xs"}}])
    assert mixed == (SpanRule("Final Answer:", 3.0), SpanRule("x+", 0.5, ("user",), "xs"))
    assert resolve_span_rules('{"a": 2}') == (SpanRule("a", 2.0),)
    assert set(SPAN_PRESETS) == {"react", "hermes", "think"}
    for bad, message in [
        ("reactt", "unknown preset 'reactt'"),
        ("think=abc", "weight after '=' must be a number"),
        ({"(": 1.0}, "not a valid regular expression"),
        ({"a": float("nan")}, "not finite"),
        ({"a": {"weight": 1, "role": ["user"]}}, "give a number, or a mapping with 'weight'"),
        ({"a": {"weight": 1, "roles": ["bot"]}}, "roles"),
        ({"a": {"weight": 1, "name": "a b"}}, "must be an identifier"),
        ("{not json", "not valid JSON"),
        (3, "must be a preset chain"),
    ]:
        with pytest.raises(ValueError, match=message):
            resolve_span_rules(bad)


def test_collator_refuses_negative_span_weights_without_opt_in(smollm2_tokenizer):
    with pytest.raises(ValueError, match="negative.*allow_negative_weights=True on the collator"):
        Collator(tokenizer=smollm2_tokenizer, span_weights={"x": -1.0})
    Collator(tokenizer=smollm2_tokenizer, span_weights={"x": -1.0}, allow_negative_weights=True)
    with pytest.raises(ValueError, match="span_weights needs the tokenizer"):
        Collator(pad_token_id=0, span_weights="think")


# ------------------------------------------------------------------------------------------------ message weights
def expected_message_weights(tok, messages, text: str, offsets: np.ndarray) -> np.ndarray:
    """Per-token message weights written from the rule, with literal searches in the rendered text: a weighted
    assistant message covers its completion (end of the generation prompt through its <|im_end|>), any other its
    content and the next <|im_end|> token."""
    expected = np.ones(offsets.shape[0])
    for i, message in enumerate(messages):
        weight = message.get("weight", message.get("loss"))
        if weight is None:
            continue
        if message["role"] == "assistant":
            start = len(tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
            tokens = overlapping(offsets, start, find(text, "<|im_end|>", start)[1])
        else:
            previous = len(tok.apply_chat_template(messages[:i], tokenize=False)) if i else 0
            start, end = find(text, message["content"], previous)
            tokens = overlapping(offsets, start, end) | overlapping(offsets, *find(text, "<|im_end|>", end))
        expected[sorted(tokens)] *= weight
    return expected


def expected_span_weights(tok, ids, text: str, offsets: np.ndarray, weights: dict[str, float]) -> np.ndarray:
    """Per-token product of the hermes/think span weights, from literal <tag>...</tag> searches (special tokens
    excluded, the straddle rule by offsets)."""
    expected = np.ones(offsets.shape[0])
    for name, (opening, closing) in {
        "tool_call": ("<tool_call>", "</tool_call>"),
        "tool_response": ("<tool_response>", "</tool_response>"),
        "think": ("<think>", "</think>"),
    }.items():
        cursor = 0
        while (pos := text.find(opening, cursor)) >= 0:
            end = text.index(closing, pos) + len(closing)
            expected[sorted(overlapping(offsets, pos, end, ids, tok))] *= weights[name]
            cursor = end
    return expected


def test_message_weights_multiply_content_and_end_of_turn(qwen_style_tokenizer):
    """Each weighted message multiplies its content and the end-of-turn token closing it; template boilerplate
    (<|im_start|>role, the <tool_response> wrapper) keeps weight 1. The assistant's `loss` (ms-swift) covers its
    whole completion: content, tool calls and <|im_end|>."""
    tok = qwen_style_tokenizer
    messages = tool_conversation()
    out = tokenize_messages(tok, messages, message_weight_key="weight")
    text, ids, offsets = render(tok, messages)
    weights = np.asarray(out["message_weights"])
    expected = np.ones(len(ids))

    def eot_after(pos: int) -> set[int]:
        return overlapping(offsets, *find(text, "<|im_end|>", pos))

    user_start, user_end = find(text, messages[1]["content"])
    expected[sorted(overlapping(offsets, user_start, user_end) | eot_after(user_end))] *= 0.5
    gen_prompt = len(tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True))
    assistant_end = find(text, "<|im_end|>", gen_prompt)[1]
    expected[sorted(overlapping(offsets, gen_prompt, assistant_end))] *= 0.25
    tool_start, tool_end = find(text, messages[4]["content"])
    expected[sorted(overlapping(offsets, tool_start, tool_end) | eot_after(tool_end))] *= 0.0
    np.testing.assert_array_equal(weights, expected)
    np.testing.assert_array_equal(weights, expected_message_weights(tok, messages, text, offsets))
    wrapper = overlapping(offsets, *find(text, "<tool_response>", tool_start - 20))
    assert (weights[sorted(wrapper)] == 1).all()
    # without the key, no column; another key name reads only that key (no alias)
    assert "message_weights" not in tokenize_messages(tok, messages)
    renamed = [{**m, "w": m["weight"]} if "weight" in m else m for m in messages]
    custom = tokenize_messages(tok, renamed, message_weight_key="w")["message_weights"]
    assert 0.25 not in custom and 0.5 in custom


@pytest.mark.parametrize(
    ("message", "match"),
    [
        ({"weight": "0.5"}, r"Message 3 \('user'\): `weight`='0.5' must be a number"),
        ({"loss": float("nan")}, r"Message 3 \('user'\): `loss`=nan is not finite"),
        ({"weight": -1}, r"Message 3 .* is negative.*allow_negative_weights=True"),
        ({"weight": True}, r"must be a number"),
        ({"weight": 1.0, "loss": 0.5}, r"Message 3 has both"),
    ],
)
def test_bad_message_weights_name_the_message(smollm2_tokenizer, message, match):
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "user", "content": "d", **message},
        {"role": "assistant", "content": "e"},
    ]
    with pytest.raises(ValueError, match=match):
        tokenize_messages(smollm2_tokenizer, messages, message_weight_key="weight")


def test_negative_message_weight_with_opt_in():
    assert read_message_weight({"role": "user", "weight": -0.5}, 0, "weight", allow_negative=True) == -0.5
    assert read_message_weight({"role": "user", "weight": 1, "loss": 1.0}, 0, "weight") == 1.0
    assert read_message_weight({"role": "user"}, 0, "weight") is None
    assert math.isclose(read_message_weight({"role": "user", "loss": np.float32(0.5)}, 0, "weight"), 0.5)


# ------------------------------------------------------------------------------------------------------ collator
def test_collator_matches_spans_itself_like_dataset_preparation(qwen_style_tokenizer):
    """Without a `token_spans` column the collator matches the rules on the decoded tokens, per document of a
    packed row: the same bits, weights and masks as with the column prepared by `token_span_bits`."""
    tok = qwen_style_tokenizer
    docs = [tokenize_messages(tok, tool_conversation(v), message_weight_key="weight") for v in range(2)]
    rules = "hermes+think=0.5"
    for doc in docs:
        doc["token_spans"] = token_span_bits(
            tok, doc["input_ids"], doc["token_roles"], resolve_span_rules(rules)
        ).tolist()
    packed = {k: sum((d[k] for d in docs), []) for k in docs[0]}
    packed["seq_lengths"] = [len(d["input_ids"]) for d in docs]
    collator = Collator(tokenizer=tok, span_weights=rules, prompt_loss_weight=0.25, loss_weights_applied=True)
    prepared = collator([packed])
    matched = collator([{k: v for k, v in packed.items() if k != "token_spans"}])
    for key in prepared:
        assert torch.equal(prepared[key], matched[key]), key
    assert prepared["token_spans"].any()
    # the product: role (0.25 on the prompt side) x message x span, e.g. a tool call in the 0.25-weighted answer: 0.5
    weights, spans = prepared["loss_weights"][0], prepared["token_spans"][0]
    assert torch.unique(weights[(spans == 1)]).tolist() == [0.5]
    with pytest.raises(ValueError, match="built with other span rules"):
        Collator(tokenizer=tok, span_weights="think", loss_weights_applied=True)([packed])


def test_plwconfig_reads_span_weights_and_message_key_from_the_command_line():
    from trl import TrlParser

    from trl_plw import PLWConfig

    parser = TrlParser((PLWConfig,))
    common = ["--output_dir", "unused", "--report_to", "none", "--use_cpu", "true"]
    (chain,) = parser.parse_args_into_dataclasses([*common, "--span_weights", "hermes+think=0.3"])
    assert [r.weight for r in resolve_span_rules(chain.span_weights)] == [2.0, 0.0, 0.3]
    assert chain.message_weight_key == "weight"
    (mapping,) = parser.parse_args_into_dataclasses(
        [*common, "--span_weights", '{"(?s)<a>.*?</a>": 2}', "--message_weight_key", "loss"]
    )
    assert mapping.span_weights == {"(?s)<a>.*?</a>": 2} and mapping.message_weight_key == "loss"
    with pytest.raises(ValueError, match="not a valid regular expression"):
        PLWConfig("unused", report_to="none", use_cpu=True, span_weights={"(": 1.0})


@pytest.mark.parametrize("kind", ["prompt_completion", "conversational", "text_with_template"])
def test_span_rules_on_every_data_format(smollm2_tokenizer, tmp_path, kind):
    """PLWTrainer stores `token_spans` for prompt-completion, chat-style prompt-completion and text + response
    template data alike; the rule reads the completion only (the <think> in the prompt is not covered)."""
    from conftest import make_tiny_llama
    from datasets import Dataset

    from trl_plw import PLWConfig, PLWTrainer

    tok = smollm2_tokenizer
    question, answer = "Q: <think>not mine</think> 2+2?", "<think>two plus two</think> 4"
    row, extra = {
        "prompt_completion": ({"prompt": question + "\nA:", "completion": " " + answer}, {}),
        "conversational": (
            {
                "prompt": [{"role": "user", "content": question}],
                "completion": [{"role": "assistant", "content": answer}],
            },
            {},
        ),
        "text_with_template": (
            {"text": f"{question}\n### Response:\n{answer}"},
            {"response_template": "### Response:\n"},
        ),
    }[kind]
    trainer = PLWTrainer(
        make_tiny_llama(vocab_size=len(tok)),
        args=PLWConfig(
            str(tmp_path),
            report_to="none",
            use_cpu=True,
            bf16=False,
            span_weights="think",
            prompt_loss_weight=0.5,
            **extra,
        ),  # fmt: skip
        train_dataset=Dataset.from_list([row] * 2),
        processing_class=tok,
    )
    example = trainer.train_dataset[0]
    ids = example["input_ids"]
    text = tok.decode(ids)
    encoding = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert encoding["input_ids"] == ids
    offsets = np.asarray(encoding["offset_mapping"])
    start = text.rindex("<think>")
    expected = overlapping(offsets, start, text.index("</think>", start) + len("</think>"), ids, tok)
    assert covered(np.asarray(example["token_spans"]), 0) == expected
