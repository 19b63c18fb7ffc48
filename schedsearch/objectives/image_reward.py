"""ImageReward-v1.0 (Xu et al. 2023): a small, faithful port of its BLIP scorer that loads the official checkpoint.

Why a port: the `image-reward` 1.5 package does not import beside current transformers/timm (it imports
`apply_chunking_to_forward` from `transformers.modeling_utils`, pins timm 0.6.13, needs an undeclared `clip` package,
pulls in `datasets`/`accelerate`/diffusers training code on import, and downloads its tokenizer and config). Scoring
needs only BLIP's ViT-L/16 image encoder, its BERT text encoder with cross-attention to the image tokens, and a
5-layer linear head: about 200 lines of torch. Module names follow the official code (`ImageReward/ImageReward.py`,
`models/BLIP/{vit,med,blip_pretrain}.py`), so the official `ImageReward.pt` state dict loads key for key, with
`torch.load(weights_only=True)` (a plain tensor dict: nothing in the file is executed).

Install: `pip install schedsearch[imagereward]` (transformers, for BERT's WordPiece tokenizer), then provide, from a
machine with network access (schedsearch never downloads):
- `ImageReward.pt` (Hugging Face THUDM/ImageReward): path in $SCHEDSEARCH_IMAGEREWARD_CHECKPOINT or the objective
  option `image_reward_checkpoint`;
- `med_config.json` from the same repository, beside the checkpoint (optional: the official values are built in);
- BERT's `vocab.txt` (bert-base-uncased): beside the checkpoint, in the Hugging Face cache, or
  $SCHEDSEARCH_IMAGEREWARD_VOCAB.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from schedsearch.objectives.base import ObjectiveUnavailableError

CHECKPOINT_ENV = "SCHEDSEARCH_IMAGEREWARD_CHECKPOINT"
VOCAB_ENV = "SCHEDSEARCH_IMAGEREWARD_VOCAB"
CHECKPOINT_FILE, MED_CONFIG_FILE, VOCAB_FILE = "ImageReward.pt", "med_config.json", "vocab.txt"
REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.py: standardisation of the head
MAX_PROMPT_TOKENS = 35  # ImageReward.score: padding="max_length", max_length=35
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Keys of the official checkpoint that scoring does not use (BLIP's text-position buffer).
_IGNORED_KEYS = ("blip.text_encoder.embeddings.position_ids",)


@dataclass(frozen=True)
class ImageRewardConfig:
    """Official: ViT-L/16 at 224 (blip.create_vit('large')) and BLIP's med_config.json (BERT-base, cross-attention)."""

    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 1024
    vision_depth: int = 24
    vision_heads: int = 16
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    vocab_size: int = 30524
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    embed_dim: int = 256  # BLIP_Pretrain's vision_proj/text_proj (in the checkpoint, unused for scoring)
    mlp_widths: tuple[int, ...] = (1024, 128, 64, 16)

    def with_med_config(self, path: Path) -> ImageRewardConfig:
        med = json.loads(Path(path).read_text())
        keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "vocab_size", "layer_norm_eps", "pad_token_id")
        return replace(self, **{k: med[k] for k in keys if k in med})


# ---- BLIP ViT (models/BLIP/vit.py) ---------------------------------------------------------------------------------


class _PatchEmbed(nn.Module):
    def __init__(self, cfg: ImageRewardConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.vision_width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class _ViTAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class _ViTMlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp = _ViTAttention(dim, heads), _ViTMlp(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ImageRewardConfig) -> None:
        super().__init__()
        self.patch_embed = _PatchEmbed(cfg)
        num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.vision_width))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, cfg.vision_width))
        self.blocks = nn.ModuleList(_ViTBlock(cfg.vision_width, cfg.vision_heads) for _ in range(cfg.vision_depth))
        self.norm = nn.LayerNorm(cfg.vision_width, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed[:, : x.shape[1] + 1]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# ---- BLIP's BERT with cross-attention (models/BLIP/med.py, mode="multimodal") -------------------------------------


class _BertEmbeddings(nn.Module):
    def __init__(self, cfg: ImageRewardConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(positions)[None])


class _BertSelfAttention(nn.Module):
    def __init__(self, cfg: ImageRewardConfig, kv_width: int) -> None:
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*x.shape[:2], self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(context)), self._split(self.value(context))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(*x.shape[:2], -1)


class _BertSelfOutput(nn.Module):
    def __init__(self, cfg: ImageRewardConfig, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(hidden) + residual)


class _BertAttention(nn.Module):
    def __init__(self, cfg: ImageRewardConfig, kv_width: int) -> None:
        super().__init__()
        self.self = _BertSelfAttention(cfg, kv_width)
        self.output = _BertSelfOutput(cfg, cfg.hidden_size)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, context, mask), x)


class _BertIntermediate(nn.Module):
    def __init__(self, cfg: ImageRewardConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # med_config hidden_act "gelu": the exact (erf) form


class _BertLayer(nn.Module):
    def __init__(self, cfg: ImageRewardConfig) -> None:
        super().__init__()
        self.attention = _BertAttention(cfg, cfg.hidden_size)
        self.crossattention = _BertAttention(cfg, cfg.vision_width)
        self.intermediate = _BertIntermediate(cfg)
        self.output = _BertSelfOutput(cfg, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, x, mask)
        x = self.crossattention(x, image, None)  # every image token attends (image_atts are all ones)
        return self.output(self.intermediate(x), x)


class _BertEncoder(nn.Module):
    def __init__(self, cfg: ImageRewardConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_BertLayer(cfg) for _ in range(cfg.num_hidden_layers))


class BertTextEncoder(nn.Module):
    def __init__(self, cfg: ImageRewardConfig) -> None:
        super().__init__()
        self.embeddings = _BertEmbeddings(cfg)
        self.encoder = _BertEncoder(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)
        # med.py get_extended_attention_mask: (1 - mask) * -10000 added to the scores of padded keys
        mask = ((1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0).to(x.dtype)
        for layer in self.encoder.layer:
            x = layer(x, mask, image)
        return x


class Blip(nn.Module):
    def __init__(self, cfg: ImageRewardConfig) -> None:
        super().__init__()
        self.visual_encoder = VisionTransformer(cfg)
        self.text_encoder = BertTextEncoder(cfg)
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.hidden_size, cfg.embed_dim)


class RewardHead(nn.Module):
    """ImageReward.py's MLP: linear layers only (its ReLUs are commented out); dropouts at indices 1, 3, 5."""

    def __init__(self, cfg: ImageRewardConfig) -> None:
        super().__init__()
        widths = (cfg.hidden_size, *cfg.mlp_widths)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(widths)):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(nn.Dropout(0.0))
        layers.append(nn.Linear(widths[-1], 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ImageRewardModel(nn.Module):
    def __init__(self, cfg: ImageRewardConfig | None = None) -> None:
        super().__init__()
        self.config = cfg or ImageRewardConfig()
        self.blip = Blip(self.config)
        self.mlp = RewardHead(self.config)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Standardised rewards (N,) of CLIP-normalised 224×224 pixels and tokenised prompts (ImageReward.score)."""
        image = self.blip.visual_encoder(pixels)
        text = self.blip.text_encoder(input_ids, attention_mask, image)
        return ((self.mlp(text[:, 0, :].float()) - REWARD_MEAN) / REWARD_STD).squeeze(-1)


def load_state_dict_checked(model: ImageRewardModel, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Strict load but for the known unused keys: a checkpoint of another layout fails loudly instead of silently
    leaving random layers (the official loader uses strict=False)."""
    state_dict = {k: v for k, v in state_dict.items() if k not in _IGNORED_KEYS}
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{source}: not an ImageReward-v1.0 state dict: missing {result.missing_keys[:5]} "
            f"({len(result.missing_keys)}), unexpected {result.unexpected_keys[:5]} ({len(result.unexpected_keys)})"
        )


def resolve_checkpoint(checkpoint: str | Path | None = None) -> Path:
    value = checkpoint or os.environ.get(CHECKPOINT_ENV)
    if not value:
        raise ObjectiveUnavailableError(
            f"objective 'image_reward' needs the ImageReward-v1.0 checkpoint {CHECKPOINT_FILE} (Hugging Face "
            f"THUDM/ImageReward) on this machine; schedsearch never downloads: set ${CHECKPOINT_ENV} to its path "
            "(or the objective option image_reward_checkpoint), with med_config.json and BERT's vocab.txt beside it"
        )
    path = Path(value).expanduser()
    if not path.is_file():
        raise ObjectiveUnavailableError(f"ImageReward checkpoint {path} does not exist (${CHECKPOINT_ENV} or option)")
    return path


def resolve_vocab(checkpoint: Path, vocab: str | Path | None = None) -> Path:
    """BERT-base-uncased vocab.txt: explicit, $SCHEDSEARCH_IMAGEREWARD_VOCAB, beside the checkpoint, or HF cache."""
    explicit = vocab or os.environ.get(VOCAB_ENV)
    candidates = [Path(explicit).expanduser()] if explicit else [checkpoint.parent / VOCAB_FILE]
    if not explicit:
        try:
            from huggingface_hub import try_to_load_from_cache

            for repo in ("google-bert/bert-base-uncased", "bert-base-uncased"):
                hit = try_to_load_from_cache(repo, VOCAB_FILE)
                if isinstance(hit, str):
                    candidates.append(Path(hit))
        except ImportError:
            pass
    for path in candidates:
        if path.is_file():
            return path
    raise ObjectiveUnavailableError(
        f"objective 'image_reward' needs BERT's {VOCAB_FILE} (bert-base-uncased), looked at "
        f"{[str(p) for p in candidates]}: put it beside {checkpoint.name} or set ${VOCAB_ENV}"
    )


class ImageRewardScorer:
    """Tokeniser + model + preprocessing: `scorer(images in [-1, 1], prompts) -> rewards (N,)`."""

    def __init__(self, model: ImageRewardModel, vocab: Path, batch_size: int = 16) -> None:
        from transformers import BertTokenizer

        self.model, self.batch_size = model.eval(), batch_size
        tokenizer = BertTokenizer(str(vocab), do_lower_case=True)  # first argument: vocab_file (v4) or vocab (v5)
        # blip.init_tokenizer adds these two; they change tokenisation only where a prompt contains them
        tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
        self.tokenizer = tokenizer

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path | None = None,
        vocab: str | Path | None = None,
        config: ImageRewardConfig | None = None,
    ) -> ImageRewardScorer:
        path = resolve_checkpoint(checkpoint)
        vocab_path = resolve_vocab(path, vocab)
        if config is None:
            config = ImageRewardConfig()
            if (path.parent / MED_CONFIG_FILE).is_file():
                config = config.with_med_config(path.parent / MED_CONFIG_FILE)
        model = ImageRewardModel(config)
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state_dict, dict) and "state_dict" in state_dict:
            state_dict = state_dict["state_dict"]
        load_state_dict_checked(model, state_dict, str(path))
        return cls(model, vocab_path)

    def tokens(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS,
                             return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        from schedsearch.objectives.clip_score import _clip_pixels

        if len(images) != len(prompts) or len(images) == 0:
            raise ValueError(f"image_reward: {len(images)} images and {len(prompts)} prompts (need equal, non-zero)")
        out = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                pixels = _clip_pixels(images[start : start + self.batch_size], self.model.config.image_size,
                                      CLIP_MEAN, CLIP_STD)
                ids, mask = self.tokens(prompts[start : start + self.batch_size])
                out.append(self.model(pixels, ids, mask).float())
        return torch.cat(out)


def state_dict_shapes(config: ImageRewardConfig | None = None) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the model's state dict, built on the meta device (no memory): to check a layout cheaply."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in ImageRewardModel(config).state_dict().items()}


__all__ = [
    "CHECKPOINT_ENV",
    "VOCAB_ENV",
    "ImageRewardConfig",
    "ImageRewardModel",
    "ImageRewardScorer",
    "load_state_dict_checked",
    "resolve_checkpoint",
    "resolve_vocab",
    "state_dict_shapes",
]
