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


def render_segments(row: dict[str, Any], eos: str, train_on: str) -> list[tuple[str, bool]]:
    """The default template; mirrors the tiny tokenizer's chat template."""
    train_all = train_on == "all"
    if "messages" in row and row["messages"] is not None:
        segments = []
        for message in row["messages"]:
            header = ROLE_HEADER[message["role"]]
            if message["role"] == "assistant":
                segments.append((header, train_all))
                segments.append((message["content"] + eos, True))
                segments.append(("\n", train_all))
            else:
                segments.append((header + message["content"] + "\n", train_all))
        return segments
    if row.get("prompt") is not None:
        return [(row["prompt"], train_all), (row["completion"] + eos, True)]
    return [(row["text"] + eos, True)]


def tokenize_rows(rows: list[dict[str, Any]], tokenizer: Any, train_on: str,
                  template: str) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per canonical row, tokenising all segments of the batch in one call."""
    if template == "chat_template":
        return [_chat_template(row, tokenizer, train_on) for row in rows]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = tokenizer.eos_token or ""
    rendered = [None if "input_ids" in row and row.get("input_ids") is not None
                else render_segments(row, eos, train_on) for row in rows]
    flat = [text for segs in rendered if segs for text, _ in segs]
    encoded = iter(tokenizer(flat, add_special_tokens=False)["input_ids"]) if flat else iter(())
    out = []
    for row, segs in zip(rows, rendered, strict=True):
        if segs is None:
            ids = list(row["input_ids"])
            labels = list(row["labels"]) if row.get("labels") is not None else list(ids)
        else:
            ids, labels = list(bos), [IGNORE_INDEX] * len(bos)
            for _, trainable in segs:
                piece = next(encoded)
                ids.extend(piece)
                labels.extend(piece if trainable else [IGNORE_INDEX] * len(piece))
        labels[0] = IGNORE_INDEX
        out.append((ids, labels))
    return out


def _chat_template(row: dict[str, Any], tokenizer: Any, train_on: str) -> tuple[list[int], list[int]]:
    messages = row.get("messages") or [
        {"role": "user", "content": row.get("prompt") or ""},
        {"role": "assistant", "content": row.get("completion") or row.get("text") or ""},
    ]
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    ids = list(encoded["input_ids"])
    mask = encoded.get("assistant_masks") or []
    if train_on == "all":
        labels = list(ids)
    elif not any(mask):
        raise ValueError(
            "the tokenizer's chat template has no {% generation %} markers, so assistant tokens "
            "cannot be found; use data.template: default or data.train_on: all"
        )
    else:
        labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(ids, mask, strict=True)]
    labels[0] = IGNORE_INDEX
    return ids, labels


def count_trainable(labels: list[int]) -> int:
    return sum(1 for label in labels if label != IGNORE_INDEX)
