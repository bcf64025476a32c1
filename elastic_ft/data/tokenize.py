"""Render canonical rows to (text, trainable) segments and tokenise them in batches.

Each segment is tokenised on its own, so the loss mask is exact at token level: only
completion/assistant tokens are trained on unless `train_on="all"`. Labels use -100 for masked
positions, and the first token of every sample is always masked, so a packed block never
learns to predict one sample's start from the previous sample's end.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

IGNORE_INDEX = -100
ROLE_HEADER = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}


@lru_cache(maxsize=4)
def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """Cached per process: Ray Data tasks reuse worker processes, so this loads once each."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_template(template: str, tokenizer: Any) -> str:
    """`auto`: the model's own chat template when its tokenizer has one, else the default."""
    if template != "auto":
        return template
    return "chat_template" if getattr(tokenizer, "chat_template", None) else "default"


def render_segments(row: dict[str, Any], eos: str, train_on: str,
                    roles_to_train: tuple[str, ...] = ("assistant",)) -> list[tuple[str, bool]]:
    """The default template; mirrors the tiny tokenizer's chat template."""
    train_all = train_on == "all"
    if "messages" in row and row["messages"] is not None:
        segments = []
        for message in row["messages"]:
            header = ROLE_HEADER[message["role"]]
            trained = train_all or message["role"] in roles_to_train
            if message["role"] == "assistant":
                segments.append((header, train_all))
                segments.append((message["content"] + eos, trained))
                segments.append(("\n", train_all))
            elif trained and not train_all:  # the header stays a prompt
                segments.append((header, False))
                segments.append((message["content"] + "\n", True))
            else:
                segments.append((header + message["content"] + "\n", train_all))
        return segments
    if row.get("prompt") is not None:
        return [(row["prompt"], train_all), (row["completion"] + eos, True)]
    return [(row["text"] + eos, True)]


def tokenize_rows(rows: list[dict[str, Any]], tokenizer: Any, train_on: str, template: str,
                  roles_to_train: tuple[str, ...] = ("assistant",),
                  refused: dict[int, str] | None = None) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per canonical row. Conversations go through the model's chat
    template (data/chat_spans.py) when it is used; the rest through the default layout,
    all segments of the batch tokenised in one call. With `refused`, a row the template
    raises on gets empty ids and its message there (by row index) instead of raising."""
    from elastic_ft.data.chat_spans import tokenize_turns

    resolved = resolve_template(template, tokenizer)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = tokenizer.eos_token or ""
    out: list[tuple[list[int], list[int]] | None] = [None] * len(rows)
    rendered: list[list[tuple[str, bool]] | None] = [None] * len(rows)
    chats: list[tuple[int, list[dict[str, Any]]]] = []  # (row, messages): one batched call
    for i, row in enumerate(rows):
        messages = row.get("messages")
        if resolved == "chat_template" and messages is None and template == "chat_template" \
                and row.get("prompt") is not None:
            messages = [{"role": "user", "content": row["prompt"]},
                        {"role": "assistant", "content": row["completion"]}]
        if row.get("input_ids") is not None:
            ids = list(row["input_ids"])
            out[i] = (ids, list(row["labels"]) if row.get("labels") is not None else list(ids))
        elif resolved == "chat_template" and messages is not None:
            chats.append((i, messages))
        else:
            rendered[i] = render_segments(row, eos, train_on, roles_to_train)
    chat_refused: dict[int, str] | None = {} if refused is not None else None
    for k, pair in enumerate(tokenize_turns([m for _, m in chats], tokenizer,
                                            list(roles_to_train), train_on == "all",
                                            chat_refused)):
        out[chats[k][0]] = pair
    if refused is not None and chat_refused:
        refused.update({chats[k][0]: message for k, message in chat_refused.items()})
    flat = [text for segs in rendered if segs for text, _ in segs]
    encoded = iter(tokenizer(flat, add_special_tokens=False)["input_ids"]) if flat else iter(())
    for i, segs in enumerate(rendered):
        if segs is None:
            continue
        ids, labels = list(bos), [IGNORE_INDEX] * len(bos)
        for _, trainable in segs:
            piece = next(encoded)
            ids.extend(piece)
            labels.extend(piece if trainable else [IGNORE_INDEX] * len(piece))
        out[i] = (ids, labels)
    result = []
    for pair in out:
        assert pair is not None
        ids, labels = pair
        if labels:
            labels[0] = IGNORE_INDEX
        result.append((ids, labels))
    return result


def render_prompt(text: str, tokenizer: Any, template: str) -> list[int]:
    """A user turn as training renders it, up to where the assistant's answer starts: the
    prompt a generation continues from (`eval.prompts`, `elastic-ft generate`)."""
    if resolve_template(template, tokenizer) == "chat_template":
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                tokenize=True, add_generation_prompt=True,
                                                return_dict=True)
        return list(encoded["input_ids"])
    segments = render_segments({"messages": [{"role": "user", "content": text}]}, "", "all")
    segments.append((ROLE_HEADER["assistant"], False))  # as training splits it: header, text
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    pieces = tokenizer([s for s, _ in segments], add_special_tokens=False)["input_ids"]
    return bos + [tok for piece in pieces for tok in piece]


def count_trainable(labels: list[int]) -> int:
    return len(labels) - labels.count(IGNORE_INDEX)  # list.count: no Python loop per token
