"""The tokenizer's own chat template: loss only on assistant tokens."""

from __future__ import annotations

from elastic_ft.data.tokenize import IGNORE_INDEX, load_tokenizer, tokenize_rows

ROW = {"messages": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Reverse the word cat"},
                    {"role": "assistant", "content": "tac"},
                    {"role": "user", "content": "And dog?"},
                    {"role": "assistant", "content": "god"}]}


def test_chat_template_masks_all_but_assistant_turns(tiny_assets) -> None:
    tokenizer = load_tokenizer(str(tiny_assets))
    (ids, labels), = tokenize_rows([ROW], tokenizer, "completion", "chat_template")
    assert len(ids) == len(labels)
    trained = tokenizer.decode([t for t, lab in zip(ids, labels, strict=True)
                                if lab != IGNORE_INDEX])
    # exactly the two assistant answers (+ their eos) are trained, nothing of the prompts
    assert trained.replace(" ", "").replace(tokenizer.eos_token, "|") == "tac|god|"
    (all_ids, all_labels), = tokenize_rows([ROW], tokenizer, "all", "chat_template")
    assert all_ids == ids and all_labels[1:] == ids[1:]


def test_template_without_generation_markers_trains_the_assistant_turns(tiny_assets) -> None:
    """Most models' templates have no {% generation %} markers: the turns are found by
    rendering the conversation up to each one (data/chat_spans.py)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                               "{% endfor %}")
    (ids, labels), = tokenize_rows([ROW], tokenizer, "completion", "chat_template")
    trained = [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    assert tokenizer.decode(trained).replace(" ", "") == "tacgod"
