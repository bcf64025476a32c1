"""Which characters of a conversation, rendered by the model's own chat template, are trained.

Most models' templates have no `{% generation %}` markers, so the assistant's tokens are found
the way the model meets them at inference: the conversation rendered up to a turn (with the
generation prompt, for an assistant turn) must be a prefix of the whole rendering, and so must
the conversation rendered through that turn. The text between the two, from the content on,
is the turn: its content and its end token (`<|eot_id|>`, `<|im_end|>`, `</s>`); whitespace after the end
token is layout, not trained. A template for which the prefixes do not hold (one that rewrites
earlier turns, say) is refused with its name, before any data task runs.
"""

from __future__ import annotations

from typing import Any


class TemplateError(ValueError):
    """A chat template whose turns cannot be located in its own rendering."""


class TemplateRefused(ValueError):
    """The template raised on this conversation (e.g. Mistral's on a system turn): a bad row."""


def _render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    from jinja2.exceptions import TemplateError as JinjaError

    if not messages:
        return ""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except JinjaError as error:
        raise TemplateRefused(f"{template_name(tokenizer)} refuses it: {error}") from None


def template_name(tokenizer: Any) -> str:
    return f"the chat template of {getattr(tokenizer, 'name_or_path', '') or 'the tokenizer'}"


def turn_spans(messages: list[dict[str, Any]], tokenizer: Any, roles_to_train: list[str]
               ) -> tuple[str, list[tuple[int, int]]]:
    """(the whole rendering, [start, end) of every turn whose role is trained)."""
    full = _render(tokenizer, messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] not in roles_to_train:
            continue
        before = _render(tokenizer, messages[:i], message["role"] == "assistant")
        # through the last turn is the whole conversation: rendered once (most rows end on
        # the turn they train, so this is a third of the renders)
        through = full if i == len(messages) - 1 else _render(tokenizer, messages[:i + 1], False)
        if not (full.startswith(before) and full.startswith(through)
                and len(before) <= len(through)):
            raise TemplateError(
                f"{template_name(tokenizer)} does not render turn {i + 1} ({message['role']}) "
                "as a prefix of the whole conversation, so its trained tokens cannot be found; "
                "use data.train_on: all, or data.template: default")
        turn = through[len(before):]
        # from the content on: the role header of a turn (its generation prompt, for an
        # assistant) is prompt, not answer
        found = turn.find(message["content"].strip()) if message["content"].strip() else -1
        spans.append((len(before) + max(0, found), len(before) + len(turn.rstrip())))
    return full, spans


def tokenize_turns(conversations: list[list[dict[str, Any]]], tokenizer: Any,
                   roles_to_train: list[str], train_all: bool,
                   refused: dict[int, str] | None = None) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per conversation, all tokenised in one batched call: a token is
    trained when it overlaps a trained turn. With `refused`, a conversation the template
    raises on gets empty ids and its message there (by index) instead of raising."""
    rendered: list[tuple[str, list[tuple[int, int]]]] = []
    for k, messages in enumerate(conversations):
        try:
            rendered.append(turn_spans(messages, tokenizer, [] if train_all else roles_to_train))
        except TemplateRefused as error:
            if refused is None:
                raise
            refused[k] = str(error)
            rendered.append(("", []))
    texts = [full for full, _ in rendered]
    if not texts:
        return []
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [_labelled(list(ids), offsets, spans, train_all) if text else ([], [])
            for text, (_, spans), ids, offsets in zip(
                texts, rendered, encoded["input_ids"], encoded["offset_mapping"], strict=True)]


def _labelled(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]],
              train_all: bool) -> tuple[list[int], list[int]]:
    from elastic_ft.data.tokenize import IGNORE_INDEX

    if train_all:
        return ids, list(ids)
    labels = [IGNORE_INDEX] * len(ids)
    span_iter = iter(sorted(spans))
    span = next(span_iter, None)
    for k, (start, end) in enumerate(offsets):
        while span is not None and span[1] <= start:
            span = next(span_iter, None)
        if span is not None and start < span[1] and end > span[0] and end > start:
            labels[k] = ids[k]
    return ids, labels
