"""Tiny text encoders for the tiny pipelines' tests, built offline (the real tokenizers cannot be downloaded): a CLIP
stand-in for T5/UMT5 where the pipeline only needs input ids, an attention mask and the encoder's first output, and a
real T5 tokenizer and encoder (CogVideoX) of a handful of pieces."""

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


def t5_stand_in(width: int) -> tuple:
    """A T5 tokenizer (the pipelines' class, a Unigram model of letters and word-initial letters, `</s>` appended,
    `<pad>` padding) and a 1-layer T5 encoder of `width`: CogVideoXPipeline's components, built without downloads."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(ch, -3.0) for ch in letters] + [("\u2581" + ch, -2.5) for ch in letters]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    config = T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    return tokenizer, T5EncoderModel(config).eval()
