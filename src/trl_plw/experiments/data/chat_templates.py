"""Chat templates of models this project reproduces, for offline use (the Hub and gated repos out of reach).

`LLAMA2_CHAT_TEMPLATE` is the ``chat_template`` of meta-llama/Llama-2-7b-chat-hf's ``tokenizer_config.json``: the
article's model. ``trl-plw race --preset paper --dry-run`` puts it on an offline tokenizer when the real one cannot
be downloaded, so the paper preset's formatting (``<s>[INST] ... [/INST] B </s>``) is checked without network.
"""

from __future__ import annotations

LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
"""Llama-2 chat: ``<s>[INST] {user} [/INST] {assistant} </s>``; a system message goes inside ``<<SYS>>`` tags."""
