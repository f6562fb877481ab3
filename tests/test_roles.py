"""Tests of trl_plw.roles: role codes, role weights, tokenization with roles and template matching."""

from __future__ import annotations

import doctest
import inspect
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from trl_plw import roles as roles_module
from trl_plw.roles import (
    Role,
    RoleWeights,
    TemplateMatcher,
    TemplateNotPrefixConsistentError,
    roles_from_assistant_masks,
    roles_from_completion_mask,
    roles_from_templates,
    template_variants,
    tokenize_messages,
    tokenize_prompt_completion,
)

CHATML_ASSISTANT = "<|im_start|>assistant\n"
CHATML_USER = "<|im_start|>user\n"

CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris"},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome"},
]


def _contains(ids, sub) -> bool:
    ids, sub = list(ids), list(sub)
    return any(ids[i : i + len(sub)] == sub for i in range(len(ids) - len(sub) + 1))


def _decode_by_role(tokenizer, ids, roles, role) -> list[str]:
    """Decoded text of each maximal run of tokens with the given role."""
    runs, current = [], []
    for token, r in zip(ids, roles, strict=True):
        if r == role:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


# ----------------------------------------------------------------------------------------------------- role weights
def test_role_codes():
    assert [int(r) for r in Role] == [-1, 0, 1, 2, 3, 4, 5]
    assert Role.COMPLETION not in roles_module.PROMPT_SIDE_ROLES
    assert set(roles_module.PROMPT_SIDE_ROLES) == {Role.PROMPT, Role.SYSTEM, Role.USER, Role.TOOL, Role.TEMPLATE}


def test_role_weights_table_and_fallbacks():
    weights = RoleWeights(prompt=0.25, completion=2.0, user=0.5)
    table = weights.table()
    assert table.dtype == torch.float32
    assert table.tolist() == [0.25, 2.0, 0.25, 0.5, 0.25, 0.25, 0.0]
    codes = torch.tensor([Role.IGNORE, Role.PROMPT, Role.COMPLETION, Role.SYSTEM, Role.USER, Role.TOOL, Role.TEMPLATE])
    assert table[codes].tolist() == [0.0, 0.25, 2.0, 0.25, 0.5, 0.25, 0.25]
    assert weights.lookup([-1, 1]).tolist() == [0.0, 2.0]
    assert weights.weight(Role.IGNORE) == 0.0 and weights.weight(Role.USER) == 0.5
    assert RoleWeights().is_binary and not weights.is_binary


def test_role_weights_from_mapping():
    weights = RoleWeights.from_mapping({"assistant": 0.5, "template": 0.0, "system": None}, prompt=0.1)
    assert weights.resolved() == {
        "prompt": 0.1,
        "completion": 0.5,
        "system": 0.1,
        "user": 0.1,
        "tool": 0.1,
        "template": 0.0,
    }
    with pytest.raises(ValueError, match=r"Unknown role weight key.*'assistent'.*valid keys"):
        RoleWeights.from_mapping({"assistent": 1.0})
    with pytest.raises(ValueError, match="completion=1.0 and assistant=0.5"):
        RoleWeights.from_mapping({"completion": 1.0, "assistant": 0.5})


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_role_weights_reject_non_finite(bad):
    with pytest.raises(ValueError, match=r"RoleWeights.user=.* not finite"):
        RoleWeights(user=bad)


def test_role_weights_negative_only_when_allowed():
    with pytest.raises(ValueError, match=r"RoleWeights.prompt=-0.5 is negative"):
        RoleWeights(prompt=-0.5)
    assert RoleWeights(prompt=-0.5, allow_negative=True).table()[0].item() == -0.5
    with pytest.raises(ValueError, match="must be a number"):
        RoleWeights(completion="1")


def test_roles_from_masks():
    assert roles_from_completion_mask([0, 0, 1, 1]).tolist() == [Role.PROMPT] * 2 + [Role.COMPLETION] * 2
    assert roles_from_assistant_masks(torch.tensor([1, 0, 1])).tolist() == [1, 0, 1]
    assert roles_from_completion_mask(np.array([0, 1])).dtype == np.int8


# ------------------------------------------------------------------------------------------------- tokenize_messages
def test_tokenize_messages_chatml(smollm2_tokenizer):
    tok = smollm2_tokenizer
    out = tokenize_messages(tok, CONVERSATION)
    expected_ids = tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert out["input_ids"] == expected_ids
    ids, roles = out["input_ids"], out["token_roles"]
    assert len(roles) == len(ids)
    # Every assistant turn is completion, including its end-of-turn token, and nothing else is.
    assert _decode_by_role(tok, ids, roles, Role.COMPLETION) == ["Paris<|im_end|>", "Rome<|im_end|>"]
    assert _decode_by_role(tok, ids, roles, Role.SYSTEM) == ["You answer in one word."]
    assert _decode_by_role(tok, ids, roles, Role.USER) == ["Capital of France?", "And of Italy?"]
    template_runs = _decode_by_role(tok, ids, roles, Role.TEMPLATE)
    assert template_runs[0] == "<|im_start|>system\n"
    assert "<|im_end|>\n<|im_start|>assistant\n" in template_runs
    assert template_runs[-1] == "\n"  # the newline after the last <|im_end|> is template boilerplate
    assert Role.PROMPT not in roles


def test_tokenize_messages_default_system_prompt_is_template(smollm2_tokenizer):
    # SmolLM2's template injects a default system prompt; it is template text, not the user's content. The user's
    # content "a" also occurs inside that default prompt: roles must come from the message position, not a search.
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    out = tokenize_messages(smollm2_tokenizer, messages)
    ids, roles = out["input_ids"], out["token_roles"]
    assert _decode_by_role(smollm2_tokenizer, ids, roles, Role.USER) == ["a"]
    assert _decode_by_role(smollm2_tokenizer, ids, roles, Role.COMPLETION) == ["b<|im_end|>"]
    assert "You are a helpful AI assistant" in _decode_by_role(smollm2_tokenizer, ids, roles, Role.TEMPLATE)[0]


def test_tokenize_messages_other_template_and_tool_role(smollm2_tokenizer):
    template = (
        "{% for m in messages %}### {{ m['role'] | capitalize }}:\n{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}<|endoftext|>{% endif %}\n\n{% endfor %}"
        "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
    )
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Calling the tool."},
        {"role": "tool", "content": "18C, sunny"},
        {"role": "assistant", "content": "It is 18C and sunny."},
    ]
    out = tokenize_messages(smollm2_tokenizer, messages, chat_template=template)
    ids, roles = out["input_ids"], out["token_roles"]
    assert (
        ids == smollm2_tokenizer.apply_chat_template(messages, chat_template=template, return_dict=True)["input_ids"]
    )
    assert _decode_by_role(smollm2_tokenizer, ids, roles, Role.COMPLETION) == [
        "Calling the tool.<|endoftext|>",
        "It is 18C and sunny.<|endoftext|>",
    ]
    assert _decode_by_role(smollm2_tokenizer, ids, roles, Role.TOOL) == ["18C, sunny"]


def test_tokenize_messages_rejects_non_prefix_consistent_template(smollm2_tokenizer):
    # The header counts the messages: rendering a prefix of the conversation gives a different header.
    template = (
        "{{ messages | length }} turns\n{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    with pytest.raises(TemplateNotPrefixConsistentError, match="not prefix-consistent"):
        tokenize_messages(smollm2_tokenizer, CONVERSATION, chat_template=template)
    assert issubclass(TemplateNotPrefixConsistentError, ValueError)


# -------------------------------------------------------------------------------------- tokenize_prompt_completion
def _trl_prepare(tokenizer, rows):
    """Run TRL's own dataset preparation (tokenize_fn, add_eos, label building) on prompt-completion rows."""
    from datasets import Dataset
    from trl import SFTConfig
    from trl.trainer.sft_trainer import SFTTrainer

    args = SFTConfig(
        output_dir="/tmp/trl-plw-test",
        completion_only_loss=True,
        max_length=None,
        shuffle_dataset=False,
        report_to=[],
        bf16=False,
        use_cpu=True,
    )
    fake_trainer = SimpleNamespace(_tokenizer=tokenizer, chat_template=None, completion_only_loss=True, _is_vlm=False)
    if hasattr(SFTTrainer, "_tokenize"):  # older TRL 1.x tokenize through this method (a staticmethod in 1.7)
        static = isinstance(inspect.getattr_static(SFTTrainer, "_tokenize"), staticmethod)
        fake_trainer._tokenize = (
            SFTTrainer._tokenize if static else lambda *a, **k: SFTTrainer._tokenize(fake_trainer, *a, **k)
        )
    return list(SFTTrainer._prepare_dataset(fake_trainer, Dataset.from_list(rows), tokenizer, args, False, None, "t"))


CONVERSATIONAL_PAIRS = [
    {
        "prompt": [{"role": "user", "content": "What is 2+2?"}],
        "completion": [{"role": "assistant", "content": "4"}],
    },
    {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a color."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another one?"},
        ],
        "completion": [{"role": "assistant", "content": "Green."}],
    },
]
TEXT_PAIRS = [
    {"prompt": "Translate to French: cat =>", "completion": " chat"},
    {"prompt": "The capital of Spain is", "completion": " Madrid.<|im_end|>"},
]


def test_tokenize_prompt_completion_matches_trl(smollm2_tokenizer):
    tok = smollm2_tokenizer
    for rows in (CONVERSATIONAL_PAIRS, TEXT_PAIRS):
        for row, trl_row in zip(rows, _trl_prepare(tok, rows), strict=True):
            out = tokenize_prompt_completion(tok, row["prompt"], row["completion"])
            assert out["input_ids"] == trl_row["input_ids"]
            completion = [int(r == Role.COMPLETION) for r in out["token_roles"]]
            if "labels" in trl_row:  # TRL 1.16 folds its mask into the labels
                assert completion == [int(label != -100) for label in trl_row["labels"]]
            else:  # older TRL 1.x keep it as a column
                assert completion == list(trl_row["completion_mask"])


def test_tokenize_prompt_completion_prompt_roles(smollm2_tokenizer):
    tok = smollm2_tokenizer
    row = CONVERSATIONAL_PAIRS[1]
    out = tokenize_prompt_completion(tok, row["prompt"], row["completion"])
    ids, roles = out["input_ids"], out["token_roles"]
    assert _decode_by_role(tok, ids, roles, Role.SYSTEM) == ["Be brief."]
    assert _decode_by_role(tok, ids, roles, Role.USER) == ["Name a color.", "Another one?"]
    assert _decode_by_role(tok, ids, roles, Role.PROMPT) == ["Blue.<|im_end|>"]  # an assistant turn in the prompt
    assert _decode_by_role(tok, ids, roles, Role.COMPLETION) == ["Green.<|im_end|>\n"]  # TRL's completion span
    text = tokenize_prompt_completion(tok, "Q: 1+1? A:", " 2")
    assert tok.decode(text["input_ids"]) == "Q: 1+1? A: 2<|im_end|>"  # EOS appended, like TRL
    assert set(text["token_roles"]) == {Role.PROMPT, Role.COMPLETION}
    no_eos = tokenize_prompt_completion(tok, "Q: 1+1? A:", " 2", add_eos=False)
    assert len(no_eos["input_ids"]) == len(text["input_ids"]) - 1
    with pytest.raises(ValueError, match="both be strings or both be lists of messages"):
        tokenize_prompt_completion(tok, "a", [{"role": "assistant", "content": "b"}])


# ------------------------------------------------------------------------------------------------------- templates
def test_alpaca_template_found_in_context_where_standalone_differs(smollm2_tokenizer):
    tok = smollm2_tokenizer
    text = "### Instruction: Add 2 and 3. ### Response: 5<|im_end|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    standalone = tok("### Response:", add_special_tokens=False)["input_ids"]
    # The premise of the test: in this context "###" tokenizes as " ###", so the standalone ids are not in the text.
    assert not _contains(ids, standalone)
    matcher = TemplateMatcher(tok, "### Response:")
    assert tuple(standalone) in matcher.response_variants
    assert any(_contains(ids, v) for v in matcher.response_variants)
    roles, found = matcher.roles(ids)
    assert found
    completion = [t for t, r in zip(ids, roles, strict=True) if r == Role.COMPLETION]
    assert tok.decode(completion) == " 5<|im_end|>"
    # Token ids given as is (the old collator's way) miss it: that is what the variants fix.
    assert not roles_from_templates(ids, standalone)[1]


def test_template_variants_cover_contexts(smollm2_tokenizer):
    tok = smollm2_tokenizer
    variants = template_variants(tok, "### Response:")
    for context in ("x ### Response: y", "x\n### Response:\ny", "x\n\n### Response:\n\ny", "x.### Response: y"):
        ids = tok(context, add_special_tokens=False)["input_ids"]
        assert any(_contains(ids, v) for v in variants), context
    # No tiny leftover (such as a lone " Response" or ":") that would match everywhere.
    assert all(len(v) >= 2 for v in variants)
    assert template_variants(None, [1, 2, 3]) == ((1, 2, 3),)
    assert template_variants(None, [[1, 2], [3, 4]]) == ((1, 2), (3, 4))
    with pytest.raises(ValueError, match="tokenizer is needed"):
        template_variants(None, "### Response:")


@pytest.mark.parametrize(
    ("template", "text", "trained"),
    [
        (
            "### Response:",
            "### Instruction:\nWrite a plan.\n\n### Response:\nThen write the Response: a short paragraph.",
            "\nThen write the Response: a short paragraph.",
        ),
        ("### Answer:", "Q: 6 x 7?\n### Answer:\nThe Answer: 42", "\nThe Answer: 42"),
    ],
)
def test_template_inner_tokens_in_prose_do_not_move_the_completion(smollm2_tokenizer, template, text, trained):
    """A core variant (the template's inner tokens, e.g. [" Response", ":"]) also occurs in ordinary prose; such a
    match must not count as the last template occurrence, or the start of the answer would get the prompt weight.
    The old TRL collator (exact standalone ids) trained the whole answer here, and so must this one."""
    tok = smollm2_tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    matcher = TemplateMatcher(tok, template)
    inner = [v for v in matcher.response_variants if _contains(ids, v)]
    assert len(inner) >= 2  # the prose really contains a variant besides the template itself
    roles, found = matcher.roles(ids)
    assert found
    assert _decode_by_role(tok, ids, roles.tolist(), Role.COMPLETION) == [trained]


def test_instruction_template_inner_tokens_in_an_answer_do_not_end_it(smollm2_tokenizer):
    tok = smollm2_tokenizer
    text = (
        "### Instruction:\nMake cards.\n\n### Response:\nEach card has a title. The Instruction: list the steps."
        "\n\n### Instruction:\nThanks!\n\n### Response:\nYou are welcome."
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    roles, _ = TemplateMatcher(tok, "### Response:", "### Instruction:").roles(ids)
    assert _decode_by_role(tok, ids, roles.tolist(), Role.COMPLETION) == [
        "\nEach card has a title. The Instruction: list the steps.\n\n",
        "\nYou are welcome.",
    ]


def test_chatml_response_template_without_instruction_uses_last_match(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    roles, found = TemplateMatcher(tok, CHATML_ASSISTANT).roles(ids)
    assert found
    assert _decode_by_role(tok, ids, roles.tolist(), Role.COMPLETION) == ["Rome<|im_end|>\n"]


def test_chatml_multi_turn_with_instruction_template(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    roles, found = TemplateMatcher(tok, CHATML_ASSISTANT, CHATML_USER).roles(ids)
    assert found
    assert roles.dtype == np.int8 and roles.shape == (len(ids),)
    assert _decode_by_role(tok, ids, roles.tolist(), Role.COMPLETION) == ["Paris<|im_end|>\n", "Rome<|im_end|>\n"]
    assert _decode_by_role(tok, ids, roles.tolist(), Role.TEMPLATE) == [CHATML_USER, CHATML_ASSISTANT] * 2
    # Agrees with the chat-template analysis up to the newline after <|im_end|>, which the template semantics
    # (completion runs until the next instruction) include.
    by_messages = np.array(tokenize_messages(tok, CONVERSATION)["token_roles"]) == Role.COMPLETION
    by_template = roles == Role.COMPLETION
    assert (by_template[by_messages]).all()
    assert [tok.decode([t]) for t in np.array(ids)[by_template & ~by_messages]] == ["\n", "\n"]


def test_roles_from_templates_token_ids():
    ids = [5, 9, 7, 1, 2, 3, 9, 8, 4, 9, 7, 6]
    roles, found = roles_from_templates(ids, [9, 7])
    assert found and roles.tolist() == [0, 5, 5, 0, 0, 0, 0, 0, 0, 5, 5, 1]  # after the LAST response only
    roles, found = roles_from_templates(ids, [9, 7], [9, 8])
    assert roles.tolist() == [0, 5, 5, 1, 1, 1, 5, 5, 0, 5, 5, 1]
    roles, found = roles_from_templates(ids, [[42, 7], [9, 7]])  # several variants: any one matches
    assert found
    roles, found = roles_from_templates(ids, [4, 4])
    assert not found and (roles == Role.PROMPT).all()
    roles, _ = roles_from_templates([9, 7, 9, 8], [9, 7], [9, 8])  # empty completion: the instruction wins
    assert roles.tolist() == [5, 5, 5, 5]
    roles, _ = roles_from_templates(np.array([1, 9, 7]), [9, 7])  # template at the very end
    assert roles.tolist() == [0, 5, 5]


def test_overlapping_variant_matches_are_one_occurrence():
    # Variants (9, 7, 6) and (7, 6) match the same occurrence; the completion starts after the longest.
    roles, _ = roles_from_templates([1, 9, 7, 6, 2, 3], [[7, 6], [9, 7, 6]], [[1]])
    assert roles.tolist() == [5, 5, 5, 5, 1, 1]


def test_doctests():
    result = doctest.testmod(roles_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


def test_missing_template_with_a_literal_backslash_n_says_how_to_write_a_newline(smollm2_tokenizer):
    """`--response_template '### Response:\\n'` on a command line arrives as a backslash and an 'n'; the
    not-found error says so and how to pass a real newline."""
    tok = smollm2_tokenizer
    ids = tok("### Instruction:\nSay hi.\n### Response:\nHi!", add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match=r"not found.*backslash followed by 'n', not a newline.*\$'### Response:\\n'"):
        TemplateMatcher(tok, "### Response:\\n").document_roles(ids)
    assert TemplateMatcher(tok, "### Response:\n").document_roles(ids)[1] == []  # the real newline is found
