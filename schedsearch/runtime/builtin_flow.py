"""The second embedded model `builtin:mnist-flow`: a class-conditional rectified-flow transformer in the SD3 style.

The denoiser is diffusers' own `SD3Transformer2DModel` (MM-DiT joint attention blocks: an image stream and a context
stream, adaLN-zero modulation, the last block context-pre-only), so everything schedsearch does on SD3/Flux-class
pipelines runs here on trained weights. The class label stands in for the text encoders: `LabelConditioner` maps it
to `n_tokens` context tokens (`prompt_embeds`) and a pooled vector (`pooled_prompt_embeds`), with the extra id
`NULL_CLASS` as the empty prompt of classifier-free guidance. Pixel space (1×28×28, patch 4: 49 image tokens); the
scheduler is diffusers' `FlowMatchEulerDiscreteScheduler` with the config in `SCHEDULER_CONFIG`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from schedsearch.runtime.builtin import ASSETS_DIR, NULL_CLASS, NUM_CLASSES, _load_safetensors

FLOW_WEIGHTS = "mnist_flow.safetensors"
NUM_TRAIN_TIMESTEPS = 1000
CONTEXT_TOKENS = 2
JOINT_ATTENTION_DIM = 64
POOLED_DIM = 64

FLOW_CONFIG: dict[str, Any] = {
    "sample_size": 28,
    "patch_size": 4,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 6,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": JOINT_ATTENTION_DIM,
    "caption_projection_dim": 128,  # = heads × head dim: the context stream's width
    "pooled_projection_dim": POOLED_DIM,
    "pos_embed_max_size": 7,  # 28 / 4 patches per side
    "qk_norm": "rms_norm",  # as SD3.5, for stable training at lr 1e-3
}
# FlowMatch Euler as SD3 ships it, shift chosen for 49-token images (see the manifest's evaluation)
SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": NUM_TRAIN_TIMESTEPS, "shift": 1.0}
DEFAULT_STEPS = 28  # SD3's pipeline default
DEFAULT_GUIDANCE = 2.0


class LabelConditioner(nn.Module):
    """Class id -> (context tokens, pooled vector): the builtin's stand-in for SD3's text encoders."""

    def __init__(self, num_classes: int = NUM_CLASSES, tokens: int = CONTEXT_TOKENS,
                 token_dim: int = JOINT_ATTENTION_DIM, pooled_dim: int = POOLED_DIM) -> None:
        super().__init__()
        self.tokens, self.token_dim = tokens, token_dim
        self.token_embedding = nn.Embedding(num_classes + 1, tokens * token_dim)  # + the null (unconditional) id
        self.pooled_embedding = nn.Embedding(num_classes + 1, pooled_dim)
        nn.init.normal_(self.token_embedding.weight, std=1.0)
        nn.init.normal_(self.pooled_embedding.weight, std=1.0)

    def forward(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.token_embedding(labels).view(len(labels), self.tokens, self.token_dim)
        return {"prompt_embeds": tokens, "pooled_prompt_embeds": self.pooled_embedding(labels)}

    def embeddings(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Conditions for CFG in diffusers' argument names: the labels' and the null label's embeddings."""
        cond = self(labels)
        uncond = self(torch.full_like(labels, NULL_CLASS))
        return cond | {f"negative_{k}": v for k, v in uncond.items()}


class MnistFlow(nn.Module):
    """The trained pair: the SD3 transformer and the label conditioner (one safetensors file, two prefixes)."""

    def __init__(self) -> None:
        super().__init__()
        from diffusers import SD3Transformer2DModel

        self.transformer = SD3Transformer2DModel(**FLOW_CONFIG)
        self.conditioner = LabelConditioner()

    def forward(self, x: torch.Tensor, sigmas: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Velocity prediction at noise levels σ ∈ [0, 1] (the network sees σ·1000, as SD3's pipeline passes it)."""
        cond = self.conditioner(labels)
        return self.transformer(
            hidden_states=x,
            timestep=sigmas * NUM_TRAIN_TIMESTEPS,
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled_prompt_embeds"],
        ).sample


def build_flow() -> MnistFlow:
    """A randomly initialised builtin flow model (the training script and tests start from this)."""
    return MnistFlow()


def load_builtin_flow(assets_dir: Path = ASSETS_DIR) -> MnistFlow:
    """The shipped, trained model in eval mode (weights stored in fp16, computed in fp32)."""
    return _load_safetensors(build_flow(), assets_dir / FLOW_WEIGHTS).float()


def flow_pipeline(flow: MnistFlow) -> Any:
    """diffusers' own `StableDiffusion3Pipeline` around the trained transformer: no text encoders (conditions come
    pre-encoded from the label conditioner) and no VAE (pixel space, so `vae_scale_factor` is 1). Users' calls work
    as on any SD3 pipeline: `pipe(prompt_embeds=..., pooled_prompt_embeds=..., negative_..., height=28, width=28,
    output_type="latent")` returns images in [-1, 1] (unclamped)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=flow.transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.vae_scale_factor = 1  # pixel space
    pipe.default_sample_size = FLOW_CONFIG["sample_size"]
    pipe.set_progress_bar_config(disable=True)
    return pipe
