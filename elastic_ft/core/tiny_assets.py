"""Tiny offline assets: a byte-level BPE tokenizer trained here and a random-init Llama.

Both are written with `save_pretrained`, so the training code loads them through exactly the
`from_pretrained(path)` path it uses for real hub models.
"""

from __future__ import annotations

import json
from pathlib import Path

SAMPLE_DATA = Path(__file__).resolve().parents[2] / "data" / "sample"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
# A minimal chat template so `data.template: chat_template` works with the tiny tokenizer too.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}### Assistant:\n{% generation %}{{ m['content'] }}"
    "{{ eos_token }}{% endgeneration %}\n"
    "{% else %}### {{ m['role'] | capitalize }}:\n{{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


def _corpus(sample_dir: Path) -> list[str]:
    texts: list[str] = []
    for path in sorted(sample_dir.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            texts.append(" ".join(_strings(json.loads(line))))
    texts.append("### User:\n### Assistant:\n### System:\n")
    return texts


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def build_tokenizer(out_dir: Path, vocab_size: int = 1000, sample_dir: Path = SAMPLE_DATA):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(sample_dir), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_model(out_dir: Path, vocab_size: int, seed: int = 0, hidden_size: int = 64,
                num_layers: int = 2) -> int:
    """Tiny by default; wider settings give a Llama-shaped model (head dim 64, Llama's MLP
    ratio) of a few hundred million parameters for memory and throughput measurements."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tiny = hidden_size < 256
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2 if tiny else int(hidden_size * 2.6875),
        num_hidden_layers=num_layers,
        num_attention_heads=4 if tiny else hidden_size // 64,
        num_key_value_heads=2 if tiny else hidden_size // 64,
        max_position_embeddings=1024 if tiny else 4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def make_tiny_assets(out_dir: str | Path, vocab_size: int = 1000, seed: int = 0,
                     hidden_size: int = 64, num_layers: int = 2,
                     model_vocab_size: int | None = None) -> dict[str, str]:
    """Write `OUT/tokenizer` and `OUT/model` (the model dir also holds the tokenizer).

    `model_vocab_size` above the tokenizer's gives a real model's embedding/logit sizes
    (e.g. 32000) while the ids stay within the local tokenizer's vocabulary.
    """
    out = Path(out_dir)
    model_dir, tok_dir = out / "model", out / "tokenizer"
    tokenizer = build_tokenizer(tok_dir, vocab_size=vocab_size)
    n_params = build_model(model_dir, vocab_size=max(len(tokenizer), model_vocab_size or 0),
                           seed=seed, hidden_size=hidden_size, num_layers=num_layers)
    tokenizer.save_pretrained(model_dir)
    return {"model": str(model_dir), "tokenizer": str(tok_dir), "parameters": str(n_params)}
