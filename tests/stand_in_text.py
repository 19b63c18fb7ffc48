"""A tiny text encoder standing in for T5/UMT5 in the tiny video pipelines' tests: their tokenizers cannot be built
offline, and the pipelines only need input ids, an attention mask and the encoder's first output."""

from __future__ import annotations

import json
from pathlib import Path


def clip_stand_in(tmp: Path, width: int, max_length: int) -> tuple:
    """A character-level CLIP tokenizer padding to `max_length` and a 1-layer CLIP text encoder of `width`."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(ch + "</w>" for ch in letters)]
    (tmp / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (tmp / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), model_max_length=max_length)
    config = CLIPTextConfig(vocab_size=len(tokens), hidden_size=width, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=max_length, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1)
    return tokenizer, CLIPTextModel(config).eval()
