"""Chat data as the model sees it: the real chat templates of the Llama-3, ChatML (Qwen2.5) and
Mistral families, set on the local tokenizer with their special tokens; the trained tokens
must be exactly each assistant turn's content and end token."""

from __future__ import annotations

import pytest

from elastic_ft.data.chat_spans import TemplateError
from elastic_ft.data.tokenize import IGNORE_INDEX, tokenize_rows

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML = (
    "{%- for message in messages %}{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\n' }}{%- endif %}{{- '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n' }}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\n' }}{%- endif %}")
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant "
    "roles are supported!') }}{% endif %}{% endfor %}")
FAMILIES = {  # template, its special tokens, the end token of an assistant turn
    "llama3": (LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>"),
    "chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
    "mistral": (MISTRAL, [], "</s>"),
}
TURNS = [{"role": "user", "content": "Reverse the word cat"},
         {"role": "assistant", "content": "tac"},
         {"role": "user", "content": "And dog?"},
         {"role": "assistant", "content": "god, of course"}]


def _tokenizer(tiny_assets, family: str):
    from transformers import AutoTokenizer

    template, specials, _ = FAMILIES[family]
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets)
    if specials:
        tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.chat_template = template
    return tokenizer


def _trained_runs(ids: list[int], labels: list[int], tokenizer) -> list[str]:
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_only_assistant_content_and_end_tokens_are_trained(tiny_assets, family) -> None:
    tokenizer = _tokenizer(tiny_assets, family)
    system = [] if family == "mistral" else [{"role": "system", "content": "Be brief."}]
    row = {"messages": system + TURNS}
    ((ids, labels),) = tokenize_rows([row], tokenizer, "completion", "auto")
    end = FAMILIES[family][2]
    assert _trained_runs(ids, labels, tokenizer) == [f"tac{end}", f"god, of course{end}"]
    # the model sees exactly its template's text
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(row["messages"],
                                                                  tokenize=False)
    ((all_ids, all_labels),) = tokenize_rows([row], tokenizer, "all", "auto")
    assert all_ids == ids and all_labels[1:] == ids[1:]


def test_roles_to_train_adds_user_turns(tiny_assets) -> None:
    tokenizer = _tokenizer(tiny_assets, "chatml")
    ((ids, labels),) = tokenize_rows([{"messages": TURNS}], tokenizer, "completion", "auto",
                                     ("user", "assistant"))
    assert _trained_runs(ids, labels, tokenizer) == [
        "Reverse the word cat<|im_end|>", "tac<|im_end|>", "And dog?<|im_end|>",
        "god, of course<|im_end|>"]


def test_a_template_that_rewrites_earlier_turns_is_refused_by_name(tiny_assets) -> None:
    tokenizer = _tokenizer(tiny_assets, "chatml")
    tokenizer.chat_template = ("{{ messages | length }} turns\n{% for m in messages %}"
                               "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    with pytest.raises(TemplateError, match=r"chat template of .* turn 2 \(assistant\)"):
        tokenize_rows([{"messages": TURNS}], tokenizer, "completion", "auto")


def test_auto_uses_the_default_layout_without_a_template(tiny_assets) -> None:
    tokenizer = _tokenizer(tiny_assets, "chatml")
    tokenizer.chat_template = None
    ((ids, labels),) = tokenize_rows([{"messages": TURNS}], tokenizer, "completion", "auto")
    assert tokenizer.decode(ids).startswith("<s>### User:\nReverse the word cat\n")
    assert _trained_runs(ids, labels, tokenizer) == ["tac</s>", "god, of course</s>"]
