"""diffusers pipelines as schedsearch models: `load_model("diffusers:<local dir or hub id>")`.

The pipeline is only a container here: we take its denoiser (transformer or UNet), scheduler config, text encoders
and VAE, and expose them through the same `LoadedModel` interface as the builtin model, so the unified sampler and the
cache hooks see one calling convention for every family:

- `denoise(x, t, step_index)` gets x in the *unpacked* latent layout `info.sample_shape` and the sampler's model time
  t ∈ [0, num_train_timesteps); it returns the raw network output (ε, v or flow velocity) with guidance applied.
- For flow-matching models t is the *unshifted* time of `FlowSchedule`; the network receives the shifted σ(t) in the
  unit its pipeline uses (SD3: σ·T, Flux: σ), which is what diffusers' `FlowMatchEulerDiscreteScheduler.timesteps`
  holds (σ·T after the shift). With shift = 1 the two coincide.

Nothing is ever downloaded: a hub id must already be in the local Hugging Face cache.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from schedsearch.errors import UserInputError
from schedsearch.runtime.experts import ExpertPair, experts_of
from schedsearch.runtime.models import BlockGroup, LoadedModel, ModelInfo, ModelNotAvailableError
from schedsearch.runtime.noise import FlowSchedule, NoiseSchedule, VPSchedule
from schedsearch.runtime.scheduler_plan import refuse_stochastic
from schedsearch.spaces.baselines import expert_of_time

# denoiser class name -> family ("sd" UNets with SDXL's text_time added conditioning become "sdxl")
FAMILY_BY_CLASS = {
    "DiTTransformer2DModel": "dit",
    "PixArtTransformer2DModel": "pixart",
    "SanaTransformer2DModel": "sana",
    "UNet2DConditionModel": "sd",
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
    "WanTransformer3DModel": "wan",
    "HunyuanVideoTransformer3DModel": "hunyuan_video",
    "LTXVideoTransformer3DModel": "ltx",
    "QwenImageTransformer2DModel": "qwen_image",
    "CogVideoXTransformer3DModel": "cogvideox",
}
# the pipelines' own `guidance_scale` defaults (Qwen-Image: `true_cfg_scale`, its CFG scale)
GUIDANCE_DEFAULTS = {"dit": 4.0, "pixart": 4.5, "sana": 4.5, "sd": 7.5, "sdxl": 5.0, "sd3": 7.0, "flux": 3.5,
                     "wan": 5.0, "hunyuan_video": 6.0, "ltx": 3.0, "qwen_image": 4.0, "cogvideox": 6.0}
VIDEO_FAMILIES = ("wan", "hunyuan_video", "ltx", "cogvideox")
# guidance-distilled families: guidance is a network input (×1000 for HunyuanVideo), never a CFG pair
DISTILLED_GUIDANCE_SCALE = {"flux": 1.0, "hunyuan_video": 1000.0}
# the video pipelines' defaults (height, frames; we sample square videos of `resolution`); CogVideoX's come from its
# transformer config (sample_height · spatial factor, sample_frames), as CogVideoXPipeline.__call__ reads them
VIDEO_DEFAULTS = {"wan": (480, 81), "hunyuan_video": (720, 129), "ltx": (512, 161)}
LTX_FRAME_RATE = 25  # LTXPipeline's default `frame_rate`, which scales the rotary positions in time
# Pre-encoded conditions: a dict with these keys (diffusers' own `__call__` argument names), each batched (N, ...),
# plus `negative_<key>` for the unconditional branch of CFG (batch N or 1). Flux is guidance-distilled: no negatives.
EMBEDDING_KEYS = {
    "pixart": ("prompt_embeds", "prompt_attention_mask"),  # the mask is optional (default: all tokens)
    "sana": ("prompt_embeds", "prompt_attention_mask"),
    "sd": ("prompt_embeds",),
    "sdxl": ("prompt_embeds", "pooled_prompt_embeds"),
    "sd3": ("prompt_embeds", "pooled_prompt_embeds"),
    "flux": ("prompt_embeds", "pooled_prompt_embeds"),
    "wan": ("prompt_embeds",),
    "hunyuan_video": ("prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds"),
    "ltx": ("prompt_embeds", "prompt_attention_mask"),
    "qwen_image": ("prompt_embeds", "prompt_embeds_mask"),
    "cogvideox": ("prompt_embeds",),  # T5 padded to max_sequence_length, no mask (the pipeline passes none)
}
# the text mask among a family's EMBEDDING_KEYS: every token is attended when it is not given, and a pair of
# conditional and unconditional embeddings of different lengths is zero-padded to one length under it
TEXT_MASK_KEYS = {"pixart": "prompt_attention_mask", "sana": "prompt_attention_mask",
                  "hunyuan_video": "prompt_attention_mask", "ltx": "prompt_attention_mask",
                  "qwen_image": "prompt_embeds_mask"}
# families whose prompt encoding changed after teacher images may have been cached from it: the new encoding's
# name enters the calibration set's hash (absent for the others, whose hashes stay as they were)
TEXT_ENCODING_CHANGES = {"wan": "max_sequence_length=512"}  # Wan: __call__'s 512 tokens, not encode_prompt's 226
DECODE_BATCH = 4  # VAE decoding at full resolution is memory-bound on CPU

Conds = dict[str, torch.Tensor]
Forward = Callable[[torch.Tensor, float, Conds], torch.Tensor]
Denoise = Callable[[torch.Tensor, float, int], torch.Tensor]
Guide = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]  # (uncond, cond, scale) -> guided output
# class ids (N,) -> pre-encoded conditions with their `negative_` keys (the builtin flow model's label embedding)
ClassConditioner = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]


# ---------------------------------------------------------------------------------------------------- locating


def _hub_cache(cache_dir: str | os.PathLike | None) -> Path:
    from huggingface_hub import constants

    return Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)


def _looks_like_path(path_or_id: str) -> bool:
    """Hub ids are `name` or `owner/name`; anything else (absolute, ./, ~, deeper) can only be a path."""
    return path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") > 1 or "\\" in path_or_id


def _not_available(path_or_id: str, cache: Path, reason: str) -> ModelNotAvailableError:
    repo_dir = cache / f"models--{path_or_id.replace('/', '--')}"
    return ModelNotAvailableError(
        f"diffusers model {path_or_id!r} is not available on this machine: {reason}. schedsearch never downloads. "
        f"Looked for a local pipeline directory {str(Path(path_or_id).expanduser())!r} and for the hub repository in "
        f"the Hugging Face cache {str(cache)!r}. To make it available: on a machine with internet run "
        f"`huggingface-cli download {path_or_id}` (or `hf download {path_or_id}`), copy its cache directory "
        f"({repo_dir.name}) into {str(cache)!r} here (or set HF_HOME / HF_HUB_CACHE to where you copied it); "
        "or pass a local pipeline directory holding model_index.json (e.g. written by `pipe.save_pretrained(dir)`)."
    )


def _resolve(path_or_id: str, cache_dir: str | os.PathLike | None, revision: str | None = None) -> tuple[str, Path]:
    """The local directory or cached hub id to load from, and its model_index.json; ModelNotAvailableError when
    neither holds a pipeline."""
    cache = _hub_cache(cache_dir)
    local = Path(path_or_id).expanduser()
    if local.is_dir():
        if not (local / "model_index.json").is_file():
            raise _not_available(path_or_id, cache, f"directory {str(local)!r} has no model_index.json")
        return str(local), local / "model_index.json"
    if _looks_like_path(path_or_id):
        raise _not_available(path_or_id, cache, f"no directory {str(local)!r}")
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(path_or_id, "model_index.json", cache_dir=str(cache), revision=revision)
    except ValueError as err:  # HFValidationError: not a valid repo id either
        raise _not_available(path_or_id, cache, f"neither a directory nor a valid hub id ({err})") from err
    if not isinstance(found, str):
        raise _not_available(path_or_id, cache, "no cached model_index.json for this hub id")
    return path_or_id, Path(found)


def _absent_components(model_index: Path) -> dict[str, None]:
    """Components saved as null or whose folder is not there (e.g. a directory holding only the denoiser, scheduler
    and VAE): loaded as None, so that pipelines whose text encoders are not optional still load without them."""
    index = json.loads(model_index.read_text())
    root = model_index.parent
    return {
        name: None
        for name, entry in index.items()
        if isinstance(entry, list) and len(entry) == 2 and (entry[0] is None or not (root / name).is_dir())
    }


def cached_pipelines(cache_dir: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """(hub id, snapshot dir) of every diffusers pipeline in the local HF cache; [] when there is no cache."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(_hub_cache(cache_dir))
    except CacheNotFound:
        return []
    rows = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        snapshots = [
            rev
            for rev in repo.revisions
            if any(f.file_path == rev.snapshot_path / "model_index.json" for f in rev.files)
        ]
        if snapshots:
            newest = max(snapshots, key=lambda rev: rev.last_modified)
            rows.append((repo.repo_id, str(newest.snapshot_path)))
    return rows


def pipeline_summary(directory: str | os.PathLike) -> dict[str, str] | None:
    """What a saved pipeline directory is, read from its `model_index.json` alone (no weights loaded): the pipeline
    class, its denoiser class and scheduler, and the family schedsearch runs it as ("unsupported" otherwise).
    None when the directory holds no pipeline."""
    index = Path(directory) / "model_index.json"
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None

    def component(name: str) -> str:
        entry = data.get(name)
        return str(entry[1]) if isinstance(entry, list) and len(entry) == 2 and entry[1] else ""

    denoiser = component("transformer") or component("unet")
    family = FAMILY_BY_CLASS.get(denoiser, "")
    if family == "sd" and "XL" in str(data.get("_class_name", "")):
        family = "sdxl"
    return {"pipeline": str(data.get("_class_name", "?")), "denoiser": denoiser or "?",
            "scheduler": component("scheduler") or "?", "family": family or "unsupported"}


def local_pipelines(root: str | os.PathLike, max_depth: int = 3) -> list[tuple[str, dict[str, str]]]:
    """(directory, `pipeline_summary`) of every saved pipeline under `root`, up to `max_depth` levels down."""
    root = Path(root)
    found = []
    for depth in range(max_depth + 1):
        for index in sorted(root.glob("/".join(["*"] * depth + ["model_index.json"]))):
            summary = pipeline_summary(index.parent)
            if summary is not None:
                found.append((str(index.parent), summary))
    return found


def load_diffusers_model(
    path_or_id: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    resolution: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    num_frames: int | None = None,
    guidance_2: float | None = None,
    **kwargs: Any,
) -> LoadedModel:
    """Load a pipeline from a local directory or the local HF cache (never the network) and adapt it.

    `resolution` (pixels, square) overrides the pipeline's default image size and `num_frames` a video pipeline's
    frame count; `guidance_2` is a two-transformer pipeline's low-noise guidance scale (its `guidance_scale_2`,
    part of the calibration set's identity). Other keyword arguments go to `DiffusionPipeline.from_pretrained`
    (e.g. `variant="fp16"`).
    """
    from diffusers import DiffusionPipeline

    source, model_index = _resolve(path_or_id, cache_dir, kwargs.get("revision"))
    kwargs = _absent_components(model_index) | kwargs
    try:
        pipe = DiffusionPipeline.from_pretrained(
            source, torch_dtype=dtype, local_files_only=True, cache_dir=cache_dir, **kwargs
        )
    except OSError as err:  # weights or a component missing from an otherwise present snapshot
        raise _not_available(path_or_id, _hub_cache(cache_dir), f"loading failed ({err})") from err
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return loaded_model_from_pipeline(pipe, name=f"diffusers:{path_or_id}", resolution=resolution,
                                      num_frames=num_frames, guidance_2=guidance_2)


# ---------------------------------------------------------------------------------------------------- info


def denoiser_of(pipe: Any) -> torch.nn.Module:
    """The pipeline's denoising network (diffusers names it `transformer` or `unet`)."""
    for attr in ("transformer", "unet"):
        network = getattr(pipe, attr, None)
        if network is not None:
            return network
    raise UserInputError("--model", f"diffusers pipeline {type(pipe).__name__} has no `transformer` or `unet` "
                         "component to search on", "point it at a DiT or UNet pipeline")


def family_of(network: torch.nn.Module) -> str:
    """The adapter family from the denoiser class; unsupported classes fail here, before any work is done."""
    cls = type(network).__name__
    if cls not in FAMILY_BY_CLASS:
        raise UserInputError("--model", f"diffusers denoiser class {cls!r} is not supported",
                             f"supported classes: {', '.join(FAMILY_BY_CLASS)}")
    family = FAMILY_BY_CLASS[cls]
    if family == "sd" and network.config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return family


def _vae_scale_factor(pipe: Any) -> int:
    """The pipeline's own `vae_scale_factor` (every diffusers pipeline sets it; 1 for a pixel-space pipeline)."""
    factor = getattr(pipe, "vae_scale_factor", None)
    if isinstance(factor, int) and factor > 0:
        return factor
    vae = getattr(pipe, "vae", None)
    return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8


def _video_layout(pipe: Any, network: torch.nn.Module, family: str, resolution: int | None,
                  frames: int | None) -> dict[str, Any]:
    """Video latents (C, F, H, W) as the Wan / HunyuanVideo / LTX / CogVideoX pipelines' prepare_latents make them
    (LTX then packs them into tokens, CogVideoX puts frames first, which we do only around the network call):
    F = (frames - 1) // t + 1 latent frames for a temporal factor t (CogVideoX 1.5: padded to its patch_size_t),
    H = W = pixels // s; tokens after the patch embedding (Wan: patch_size (1, 2, 2); HunyuanVideo, LTX: patch_size_t,
    patch_size; CogVideoX: patch_size, and patch_size_t where set)."""
    spatial = getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_spatial_compression_ratio", 8)
    temporal = getattr(pipe, "vae_scale_factor_temporal", None) or getattr(pipe, "vae_temporal_compression_ratio", 4)
    cfg = network.config
    default_pixels, default_frames = (
        (cfg.sample_height * spatial, cfg.sample_frames) if family == "cogvideox" else VIDEO_DEFAULTS[family])
    pixels = resolution or default_pixels
    frames = frames or default_frames
    if (frames - 1) % temporal:
        raise UserInputError("--frames", f"{frames} frames: frames - 1 must be divisible by {temporal}",
                             f"use e.g. {(frames - 1) // temporal * temporal + 1}")
    if family == "wan":
        pt, ph, pw = cfg.patch_size
    elif family == "cogvideox":  # CogVideoX 1.0 has no temporal patch (patch_size_t None)
        pt, ph, pw = cfg.patch_size_t or 1, cfg.patch_size, cfg.patch_size
    else:
        pt, ph, pw = cfg.patch_size_t, cfg.patch_size, cfg.patch_size
    if pixels % (spatial * ph):
        raise UserInputError("--resolution", f"{pixels} is not a multiple of {spatial * ph}",
                             f"use e.g. {pixels // (spatial * ph) * spatial * ph}")
    latent_frames, side = (frames - 1) // temporal + 1, pixels // spatial
    padding = _cogvideox_padding(cfg, latent_frames) if family == "cogvideox" else 0
    latent_frames += padding
    extra = {"padding_frames": padding} if family == "cogvideox" else {}
    return extra | {
        "sample_shape": (network.config.in_channels, latent_frames, side, side),
        "resolution": pixels,
        "num_frames": frames,
        "vae_scale_factor": spatial,
        "vae_temporal_factor": temporal,
        "patch_size": ph,
        "patch_size_t": pt,
        "tokens_per_sample": (latent_frames // pt) * (side // ph) * (side // pw),
    }


def _cogvideox_padding(cfg: Any, latent_frames: int) -> int:
    """CogVideoX 1.5 (`patch_size_t` set): CogVideoXPipeline.__call__ pads the latent frames up to a multiple of
    patch_size_t (extra frames of noise in front, dropped before decoding); 1.0 pads nothing."""
    pt = cfg.patch_size_t
    return 0 if pt is None or latent_frames % pt == 0 else pt - latent_frames % pt


def _latent_layout(pipe: Any, network: torch.nn.Module, family: str, resolution: int | None,
                   frames: int | None = None) -> dict[str, Any]:
    """Unpacked latent shape per sample at the pipeline's default (or the given) resolution, and token counts.

    Flux's and Qwen-Image's pipelines pack 2x2 latent patches into tokens; we keep the unpacked (C, H, W) layout as
    the sample shape (seeded noise then equals diffusers' `prepare_latents` before packing; Qwen-Image's (N, 1, C, H,
    W) noise holds the same numbers) and pack only around the network call.
    """
    if family in VIDEO_FAMILIES:
        return _video_layout(pipe, network, family, resolution, frames)
    scale = _vae_scale_factor(pipe)
    cfg = network.config
    if family in ("flux", "qwen_image"):
        pixels = resolution or getattr(pipe, "default_sample_size", 128) * scale
        side = 2 * (pixels // (scale * 2))
        channels, patch = cfg.in_channels // 4, 2
    else:
        pixels = resolution or cfg.sample_size * scale
        side = pixels // scale
        channels, patch = cfg.in_channels, cfg.get("patch_size") or 1
    return {
        "sample_shape": (channels, side, side),
        "resolution": pixels,
        "vae_scale_factor": scale,
        "patch_size": patch,
        "tokens_per_sample": (side // patch) ** 2,
    }


def transformer_block_groups(network: torch.nn.Module, family: str) -> tuple[BlockGroup, ...]:
    """Cacheable units of transformer families (names used by the cache hooks: keep them stable)."""
    if family == "dit":
        return (BlockGroup("transformer_blocks", len(network.transformer_blocks), ("attn1", "ff")),)
    if family in ("pixart", "sana"):  # Sana: linear self-attention, cross-attention, GLUMBConv feed-forward
        return (BlockGroup("transformer_blocks", len(network.transformer_blocks), ("attn1", "attn2", "ff")),)
    if family == "sd3":
        return (BlockGroup("transformer_blocks", len(network.transformer_blocks), ("attn", "ff", "ff_context")),)
    if family == "wan":  # self-attention, cross-attention to the text, feed-forward
        return (BlockGroup("blocks", len(network.blocks), ("attn1", "attn2", "ffn")),)
    if family == "ltx":
        return (BlockGroup("transformer_blocks", len(network.transformer_blocks), ("attn1", "attn2", "ff")),)
    if family == "cogvideox":  # joint attention over text and video tokens, one feed-forward over both
        return (BlockGroup("transformer_blocks", len(network.transformer_blocks), ("attn1", "ff")),)
    if family == "qwen_image":  # MM-DiT blocks only: joint attention, the image and the text stream's MLPs
        return (BlockGroup("transformer_blocks", len(network.transformer_blocks), ("attn", "img_mlp", "txt_mlp")),)
    if family in ("flux", "hunyuan_video"):  # double-stream blocks, then single-stream blocks
        return (
            BlockGroup("transformer_blocks", len(network.transformer_blocks), ("attn", "ff", "ff_context")),
            BlockGroup(
                "single_transformer_blocks", len(network.single_transformer_blocks), ("attn", "proj_mlp", "proj_out")
            ),
        )
    raise ValueError(f"family {family!r} is not a transformer family")


def unet_block_groups(network: torch.nn.Module) -> tuple[BlockGroup, ...]:
    """One group per UNet block holding attention (down, mid, up in execution order), each a single unit with
    components ("resnets", "attentions"); attention-free blocks (e.g. SDXL's first down block) are not units."""
    paths = [f"down_blocks.{i}" for i, b in enumerate(network.down_blocks) if hasattr(b, "attentions")]
    if network.mid_block is not None and hasattr(network.mid_block, "attentions"):
        paths.append("mid_block")
    paths += [f"up_blocks.{i}" for i, b in enumerate(network.up_blocks) if hasattr(b, "attentions")]
    return tuple(BlockGroup(p, 1, ("resnets", "attentions")) for p in paths)


def deepcache_unit(network: torch.nn.Module) -> dict[str, Any]:
    """DeepCache (Ma et al. 2024) at block granularity: the deep branch between the outermost skip connection is
    cached as a whole. Its output is the hidden state that `up_blocks[-2]` hands to `up_blocks[-1]`; on non-refresh
    steps only the shallow path (conv_in, down_blocks[0], up_blocks[-1], conv_out) runs, with down_blocks[0]'s
    skip features recomputed."""
    n_down, n_up = len(network.down_blocks), len(network.up_blocks)
    deep = [f"down_blocks.{i}" for i in range(1, n_down)] + ["mid_block"] + [f"up_blocks.{i}" for i in range(n_up - 1)]
    return {
        "cached_output_of": f"up_blocks.{n_up - 2}",
        "deep": deep,
        "shallow": ["conv_in", "down_blocks.0", f"up_blocks.{n_up - 1}", "conv_out"],
    }


def absent_components(network: torch.nn.Module, groups: Sequence[BlockGroup]) -> dict[str, tuple[str, ...]]:
    """Per block, the named components that are None there (SD3's last block has no `ff_context`). A component
    absent from every block of its group means diffusers renamed something: fail loudly rather than cache nothing."""
    absent: dict[str, tuple[str, ...]] = {}
    for group in groups:
        container = network.get_submodule(group.path)
        blocks = list(container) if group.count > 1 or isinstance(container, torch.nn.ModuleList) else [container]
        for comp in group.components:
            missing = [i for i, b in enumerate(blocks) if getattr(b, comp, None) is None]
            if blocks and len(missing) == len(blocks):
                raise ValueError(f"{type(network).__name__}: component {comp!r} not found in {group.path}")
            for i in missing:
                key = f"{group.path}.{i}" if len(blocks) > 1 else group.path
                absent[key] = (*absent.get(key, ()), comp)
    return absent


def _cost_extra(network: torch.nn.Module, family: str) -> dict[str, Any]:
    """Architecture numbers the cost model needs (transformers: ints; UNets: per resolution level)."""
    cfg = network.config
    if family in ("sd", "sdxl"):
        return {
            "hidden_size": tuple(cfg.block_out_channels),
            "num_heads": cfg.num_attention_heads or cfg.attention_head_dim,  # SD 1.x/2.x: attention_head_dim = heads
            "cross_attention_dim": cfg.cross_attention_dim,
        }
    heads = cfg.num_attention_heads
    return {"hidden_size": heads * cfg.attention_head_dim, "num_heads": heads, "num_layers": cfg.get("num_layers")}


# ---------------------------------------------------------------------------------------------------- schedule


def _flow_shift(cfg: Mapping[str, Any], tokens_per_sample: int) -> float:
    """The config's static shift, or with dynamic shifting the shift at this resolution: diffusers' Flux/SD3
    pipelines compute μ = calculate_shift(image_seq_len) (linear in the token count) and the scheduler maps σ with
    exp(μ)/(exp(μ) + 1/σ - 1), which is FlowSchedule's shift·σ/(1 + (shift - 1)σ) with shift = exp(μ)."""
    if not cfg.get("use_dynamic_shifting"):
        return float(cfg.get("shift", 1.0))
    base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    base_shift, max_shift = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
    mu = base_shift + (max_shift - base_shift) * (tokens_per_sample - base_len) / (max_len - base_len)
    return math.exp(mu) if cfg.get("time_shift_type", "exponential") == "exponential" else mu


def is_flow_scheduler(scheduler: Any) -> bool:
    cfg = scheduler.config
    return type(scheduler).__name__.startswith("FlowMatch") or bool(cfg.get("use_flow_sigmas"))


def noise_schedule_of(scheduler: Any, tokens_per_sample: int) -> NoiseSchedule:
    """FlowSchedule for flow-matching schedulers, else the VP schedule of the scheduler's own ᾱ: what its steps
    use, settings included (CogVideoX's `snr_shift_scale`, `rescale_betas_zero_snr`, which multistep schedulers
    end at 2^-24 rather than 0). A scheduler without `alphas_cumprod` gets DDPMScheduler's ᾱ of its config."""
    cfg = scheduler.config
    if is_flow_scheduler(scheduler):
        shift = cfg.get("flow_shift", 1.0) if cfg.get("use_flow_sigmas") else _flow_shift(cfg, tokens_per_sample)
        return FlowSchedule(int(cfg.num_train_timesteps), float(shift))
    own = getattr(scheduler, "alphas_cumprod", None)
    if isinstance(own, torch.Tensor) and len(own) == int(cfg.num_train_timesteps):
        return VPSchedule(own.detach().double().cpu().numpy().copy())
    if "beta_schedule" not in cfg and cfg.get("trained_betas") is None:
        raise ValueError(f"scheduler {type(scheduler).__name__}: no betas in its config, cannot build a VP schedule")
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler.from_config(cfg)
    return VPSchedule(ddpm.alphas_cumprod.double().numpy().copy())


def prediction_type_of(scheduler: Any) -> str:
    return (
        "flow_prediction" if is_flow_scheduler(scheduler) else str(scheduler.config.get("prediction_type", "epsilon"))
    )


def _model_time(family: str, schedule: NoiseSchedule) -> Callable[[float], float]:
    """Sampler time t -> the timestep value the network is called with (see the module docstring); flow-ness
    comes from the scheduler (Sana runs either way)."""
    if not isinstance(schedule, FlowSchedule):
        return float
    unit = 1.0 if family == "flux" else float(schedule.num_train_timesteps)  # Flux pipeline passes timestep / 1000
    return lambda t: schedule.alpha_sigma(t)[1] * unit


# ---------------------------------------------------------------------------------------------------- forward


def _split_learned_sigma(out: torch.Tensor, channels: int) -> torch.Tensor:
    """DiT/PixArt checkpoints with learned variance output 2C channels; the sampler needs the first C."""
    return out[:, :channels] if out.shape[1] == 2 * channels else out


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H/2·W/2, 4C): Flux's 2x2 patch packing (same order as FluxPipeline._pack_latents)."""
    n, c, h, w = x.shape
    return x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack_latents` for a latent of (height, width)."""
    n, _, d = tokens.shape
    x = tokens.view(n, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, d // 4, height, width)


def flux_image_ids(height: int, width: int) -> torch.Tensor:
    """Rotary position ids (0, row, col) of the packed latent tokens."""
    rows = torch.arange(height // 2).repeat_interleave(width // 2)
    cols = torch.arange(width // 2).repeat(height // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).float()


def _forward(network: torch.nn.Module, family: str, layout: dict[str, Any], guidance: float,
             expert: int | None = None, pipe: Any = None) -> Forward:
    """One network call on a batch x with batched conditions; returns the output in x's layout. `expert`: which
    transformer of an `ExpertPair` (Wan 2.2) makes the call; `pipe`: the pipeline, for inputs only its own
    functions compute (CogVideoX's rotary embedding)."""
    channels = layout["sample_shape"][0]
    dtype = network.dtype
    time_dtype = dtype if family == "flux" else torch.float32  # as the pipelines pass it (bf16 would round t)

    def timesteps(x: torch.Tensor, value: float) -> torch.Tensor:
        return torch.full((len(x),), value, dtype=time_dtype, device=x.device)

    if family == "dit":
        return lambda x, tv, c: _split_learned_sigma(
            network(x, timestep=timesteps(x, tv), class_labels=c["class_labels"]).sample, channels
        )
    if family == "pixart":
        res = layout["resolution"]

        def pixart(x: torch.Tensor, tv: float, c: Conds) -> torch.Tensor:
            added = {"resolution": None, "aspect_ratio": None}
            if network.use_additional_conditions:  # PixArt-α 1024px: image size micro-conditioning
                added = {
                    "resolution": torch.tensor([[res, res]], dtype=dtype).repeat(len(x), 1),
                    "aspect_ratio": torch.ones((len(x), 1), dtype=dtype),
                }
            out = network(
                x,
                encoder_hidden_states=c["prompt_embeds"],
                encoder_attention_mask=c["prompt_attention_mask"],
                timestep=timesteps(x, tv),
                added_cond_kwargs=added,
            ).sample
            return _split_learned_sigma(out, channels)

        return pixart
    if family == "sana":
        scale = float(network.config.get("timestep_scale", 1.0))  # SanaPipeline multiplies t by it

        def sana(x: torch.Tensor, tv: float, c: Conds) -> torch.Tensor:
            out = network(x, encoder_hidden_states=c["prompt_embeds"],
                          encoder_attention_mask=c["prompt_attention_mask"], timestep=timesteps(x, tv) * scale).sample
            return _split_learned_sigma(out, channels)

        return sana
    if family == "sd":
        return lambda x, tv, c: network(x, timesteps(x, tv), encoder_hidden_states=c["prompt_embeds"]).sample
    if family == "sdxl":
        return lambda x, tv, c: (
            network(
                x,
                timesteps(x, tv),
                encoder_hidden_states=c["prompt_embeds"],
                added_cond_kwargs={"text_embeds": c["pooled_prompt_embeds"], "time_ids": c["time_ids"]},
            ).sample
        )
    if family == "sd3":
        return lambda x, tv, c: (
            network(
                hidden_states=x,
                timestep=timesteps(x, tv),
                encoder_hidden_states=c["prompt_embeds"],
                pooled_projections=c["pooled_prompt_embeds"],
            ).sample
        )
    if family == "flux":
        _, h, w = layout["sample_shape"]
        img_ids = flux_image_ids(h, w).to(dtype)
        use_guidance = bool(network.config.guidance_embeds)  # FLUX.1-schnell has no guidance input

        def flux(x: torch.Tensor, tv: float, c: Conds) -> torch.Tensor:
            out = network(
                hidden_states=pack_latents(x),
                timestep=timesteps(x, tv),
                guidance=torch.full((len(x),), guidance, device=x.device) if use_guidance else None,
                pooled_projections=c["pooled_prompt_embeds"],
                encoder_hidden_states=c["prompt_embeds"],
                txt_ids=torch.zeros(c["prompt_embeds"].shape[1], 3, dtype=dtype, device=x.device),
                img_ids=img_ids.to(x.device),
            ).sample
            return unpack_latents(out, h, w)

        return flux
    if family == "wan":
        return _wan_forward(network, layout, expert)
    if family == "hunyuan_video":
        use_guidance = bool(network.config.guidance_embeds)

        def hunyuan(x: torch.Tensor, tv: float, c: Conds) -> torch.Tensor:
            scaled = guidance * DISTILLED_GUIDANCE_SCALE[family]  # the pipeline passes guidance_scale × 1000
            return network(
                hidden_states=x,
                timestep=timesteps(x, tv),  # float32, as the pipeline's float32 latents give it
                encoder_hidden_states=c["prompt_embeds"],
                encoder_attention_mask=c["prompt_attention_mask"],
                pooled_projections=c["pooled_prompt_embeds"],
                guidance=torch.full((len(x),), scaled, dtype=x.dtype, device=x.device) if use_guidance else None,
            ).sample

        return hunyuan
    if family == "ltx":
        from diffusers import LTXPipeline

        _, frames, h, w = layout["sample_shape"]
        p, pt = layout["patch_size"], layout["patch_size_t"]
        spatial, temporal = layout["vae_scale_factor"], layout["vae_temporal_factor"]
        rope_scale = (temporal / LTX_FRAME_RATE, spatial, spatial)

        def ltx(x: torch.Tensor, tv: float, c: Conds) -> torch.Tensor:  # LTXPipeline's packed tokens, unpacked back
            out = network(
                hidden_states=LTXPipeline._pack_latents(x, p, pt),
                encoder_hidden_states=c["prompt_embeds"],
                timestep=timesteps(x, tv),
                encoder_attention_mask=c["prompt_attention_mask"],
                num_frames=frames // pt, height=h // p, width=w // p,
                rope_interpolation_scale=rope_scale,
            ).sample
            return LTXPipeline._unpack_latents(out, frames // pt, h // p, w // p, p, pt)

        return ltx
    if family == "qwen_image":
        return _qwen_image_forward(network, layout)
    if family == "cogvideox":
        return _cogvideox_forward(pipe, network, layout)
    raise ValueError(f"family {family!r}: no forward")


def _wan_forward(network: torch.nn.Module, layout: dict[str, Any], expert: int | None) -> Forward:
    """WanPipeline.__call__'s transformer call: the float32 timestep per sample, or with the pipeline's
    `expand_timesteps` (Wan 2.2 TI2V-5B) one per latent token, F · ⌈H/2⌉ · ⌈W/2⌉ of them as its
    `mask[0][0][:, ::2, ::2]` makes them (every token at t: text to video has no conditioning frame)."""
    route = {} if expert is None else {"expert": expert}
    _, frames, h, w = layout["sample_shape"]
    tokens = frames * ((h + 1) // 2) * ((w + 1) // 2) if layout.get("expand_timesteps") else None

    def wan(x: torch.Tensor, tv: float, c: Conds) -> torch.Tensor:
        shape = (len(x),) if tokens is None else (len(x), tokens)
        timestep = torch.full(shape, tv, dtype=torch.float32, device=x.device)
        return network(hidden_states=x, timestep=timestep, encoder_hidden_states=c["prompt_embeds"], **route).sample

    return wan


def _cogvideox_forward(pipe: Any, network: torch.nn.Module, layout: dict[str, Any]) -> Forward:
    """CogVideoXPipeline.__call__'s transformer call: latents as (N, F, C, H, W) (frames before channels, permuted
    around the call; schedsearch keeps (C, F, H, W) per sample), the timestep per sample, and the rotary embedding
    the pipeline's own `_prepare_rotary_positional_embeddings` makes for this size when the transformer uses rotary
    positions (computed once: the size is fixed). The pipeline's `use_dynamic_cfg` (off by default) is not
    modelled: guidance is the static scale."""
    _, frames, _, _ = layout["sample_shape"]
    pixels = layout["resolution"]
    rotary = None
    if network.config.use_rotary_positional_embeddings:
        rotary = pipe._prepare_rotary_positional_embeddings(pixels, pixels, frames, network.device)

    def cogvideox(x: torch.Tensor, tv: float, c: Conds) -> torch.Tensor:
        out = network(
            hidden_states=x.permute(0, 2, 1, 3, 4),
            encoder_hidden_states=c["prompt_embeds"],
            timestep=torch.full((len(x),), tv, dtype=torch.float32, device=x.device),
            image_rotary_emb=rotary,
            return_dict=False,
        )[0]
        return out.permute(0, 2, 1, 3, 4)

    return cogvideox


def _qwen_image_forward(network: torch.nn.Module, layout: dict[str, Any]) -> Forward:
    """QwenImagePipeline.__call__'s transformer call (pipeline_qwenimage.py): latents packed into 2x2 tokens by its
    own `_pack_latents`, the timestep cast to the latents' dtype before the division by 1000, the rotary image shape
    (1, H/2, W/2) per sample, no guidance input; the output unpacked by its own `_unpack_latents`."""
    from diffusers import QwenImagePipeline

    c, h, w = layout["sample_shape"]
    scale = layout["vae_scale_factor"]

    def qwen_image(x: torch.Tensor, tv: float, cond: Conds) -> torch.Tensor:
        n = len(x)
        timestep = torch.full((n,), tv, dtype=torch.float32, device=x.device).to(x.dtype) / 1000
        out = network(
            hidden_states=QwenImagePipeline._pack_latents(x, n, c, h, w),
            timestep=timestep,
            encoder_hidden_states=cond["prompt_embeds"],
            encoder_hidden_states_mask=_qwen_image_mask(cond["prompt_embeds_mask"]),
            img_shapes=[[(1, h // 2, w // 2)]] * n,
            return_dict=False,
        )[0]
        return QwenImagePipeline._unpack_latents(out, h * scale, w * scale, scale)[:, :, 0]

    return qwen_image


def _qwen_image_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """None for a mask of only valid tokens, as QwenImagePipeline.encode_prompt hands it to the transformer."""
    return None if mask.all() else mask


# ---------------------------------------------------------------------------------------------------- conditions


def _batched(tensor: torch.Tensor, n: int, key: str) -> torch.Tensor:
    if len(tensor) == n:
        return tensor
    if len(tensor) == 1:
        return tensor.expand(n, *tensor.shape[1:])
    raise ValueError(f"conditions: {key!r} has batch {len(tensor)}, expected {n} (or 1)")


def _from_embeddings(family: str, embeds: Mapping[str, torch.Tensor], need_uncond: bool) -> tuple[Conds, Conds | None]:
    """Pre-encoded dict (keys in EMBEDDING_KEYS, negatives as `negative_<key>`) -> (cond, uncond) batched dicts."""
    keys = EMBEDDING_KEYS[family]
    if "prompt_embeds" not in embeds:
        raise ValueError(f"conditions for {family}: the dict needs 'prompt_embeds'; keys: {keys} and negative_<key>")
    n = len(embeds["prompt_embeds"])
    embeds = dict(embeds)
    mask = TEXT_MASK_KEYS.get(family)
    if mask is not None:  # attend to every token unless a mask says otherwise
        for prefix in ("", "negative_"):
            if prefix + "prompt_embeds" in embeds and prefix + mask not in embeds:
                embeds[prefix + mask] = torch.ones(embeds[prefix + "prompt_embeds"].shape[:2])
    missing = [k for k in keys if k not in embeds]
    if need_uncond:
        missing += [f"negative_{k}" for k in keys if f"negative_{k}" not in embeds]
    if missing:
        raise ValueError(f"conditions for {family}: missing {missing} (needed: {keys}, and their negative_ for CFG)")
    cond = {k: _batched(torch.as_tensor(embeds[k]), n, k) for k in keys}
    uncond = {k: _batched(torch.as_tensor(embeds[f"negative_{k}"]), n, k) for k in keys} if need_uncond else None
    if uncond is not None and mask is not None:
        length = max(cond["prompt_embeds"].shape[1], uncond["prompt_embeds"].shape[1])
        cond, uncond = _pad_text(cond, mask, length), _pad_text(uncond, mask, length)
    return cond, uncond


def _pad_text(conds: Conds, mask: str, length: int) -> Conds:
    """Text embeddings zero-padded (masked out) to `length` tokens, so that a conditional and an unconditional
    prompt of different lengths (QwenImagePipeline encodes each to its own batch's longest) run as one CFG batch;
    a padded token is never attended, so the image tokens see the same text either way."""
    embeds = conds["prompt_embeds"]
    extra = length - embeds.shape[1]
    if extra <= 0:
        return conds
    pad = embeds.new_zeros(len(embeds), extra, *embeds.shape[2:])
    no = conds[mask].new_zeros(len(embeds), extra)
    return conds | {"prompt_embeds": torch.cat([embeds, pad], 1), mask: torch.cat([conds[mask], no], 1)}


@torch.no_grad()
def encode_prompts(pipe: Any, family: str, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Prompts (and the empty negative prompt for CFG) through the pipeline's own `encode_prompt`, once."""
    if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
        raise ValueError(
            f"{type(pipe).__name__} has no text encoder/tokenizer: pass pre-encoded conditions, a dict with keys "
            f"{EMBEDDING_KEYS[family]} and negative_<key>"
        )
    prompts = list(prompts)
    device = pipe._execution_device
    if family in ("pixart", "sana"):
        extra = {}
        if family == "sana":  # the pipeline's call prefixes prompts with its default complex human instruction
            import inspect

            chi = inspect.signature(type(pipe).__call__).parameters.get("complex_human_instruction")
            extra = {"complex_human_instruction": chi.default} if chi is not None else {}
        pe, pm, ne, nm = pipe.encode_prompt(
            prompts, do_classifier_free_guidance=True, negative_prompt="", device=device, **extra
        )
        return {
            "prompt_embeds": pe,
            "prompt_attention_mask": pm,
            "negative_prompt_embeds": ne,
            "negative_prompt_attention_mask": nm,
        }
    if family == "sd":
        pe, ne = pipe.encode_prompt(prompts, device, 1, True)
        return {"prompt_embeds": pe, "negative_prompt_embeds": ne}
    if family in ("sdxl", "sd3"):
        extra = {"prompt_2": None, "prompt_3": None} if family == "sd3" else {}
        pe, ne, ppe, npe = pipe.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True, **extra
        )
        return {
            "prompt_embeds": pe,
            "negative_prompt_embeds": ne,
            "pooled_prompt_embeds": ppe,
            "negative_pooled_prompt_embeds": npe,
        }
    if family == "flux":
        pe, ppe, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device)
        return {"prompt_embeds": pe, "pooled_prompt_embeds": ppe}
    if family in ("wan", "cogvideox"):  # T5 / UMT5 at __call__'s max_sequence_length (Wan 512, not encode_prompt's
        # 226; CogVideoX 226), zero-padded to it: the text tokens the transformer attends to are what
        # `pipe(prompt=...)` gives it; the empty negative prompt
        pe, ne = pipe.encode_prompt(prompt=prompts, negative_prompt=[""] * len(prompts),
                                    do_classifier_free_guidance=True, device=device,
                                    max_sequence_length=_call_default(pipe, "max_sequence_length"))
        return {"prompt_embeds": pe, "negative_prompt_embeds": ne}
    if family == "ltx":
        pe, pm, ne, nm = pipe.encode_prompt(prompt=prompts, negative_prompt=[""] * len(prompts),
                                            do_classifier_free_guidance=True, device=device)
        return {"prompt_embeds": pe, "prompt_attention_mask": pm, "negative_prompt_embeds": ne,
                "negative_prompt_attention_mask": nm}
    if family == "qwen_image":
        return _qwen_image_prompts(pipe, prompts, device)
    if family == "hunyuan_video":
        return _hunyuan_video_prompts(pipe, prompts, device)
    raise ValueError(f"family {family!r} takes no prompts")


def _call_default(pipe: Any, argument: str) -> Any:
    """The default of an argument of the pipeline's `__call__`: what a `pipe(prompt=...)` call uses."""
    import inspect

    return inspect.signature(type(pipe).__call__).parameters[argument].default


def _qwen_image_prompts(pipe: Any, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """Prompts and the empty negative prompt each through QwenImagePipeline.encode_prompt, truncated to its
    `__call__`'s default max_sequence_length as a `pipe(prompt=...)` call does; each batch is padded to its own
    longest prompt, and a mask of only valid tokens comes back as None (made explicit here)."""
    length = _call_default(pipe, "max_sequence_length")
    out = {}
    for prefix, texts in (("", prompts), ("negative_", [""] * len(prompts))):
        embeds, mask = pipe.encode_prompt(prompt=texts, device=device, max_sequence_length=length)
        out[prefix + "prompt_embeds"] = embeds
        out[prefix + "prompt_embeds_mask"] = torch.ones(embeds.shape[:2], dtype=torch.long) if mask is None else mask
    return out


def _hunyuan_video_prompts(pipe: Any, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """HunyuanVideoPipeline.encode_prompt at its `__call__`'s default prompt_template and max_sequence_length, as
    `pipe(prompt=...)` calls it: the Llama encoder's hidden states with the template's tokens cropped off and their
    mask, and CLIP's (text_encoder_2) pooled embedding. Guidance-distilled: its default call has no negative prompt."""
    if getattr(pipe, "text_encoder_2", None) is None or getattr(pipe, "tokenizer_2", None) is None:
        raise ValueError(f"{type(pipe).__name__} has no text_encoder_2/tokenizer_2 (CLIP, for the pooled embedding): "
                         f"pass pre-encoded conditions, a dict with keys {EMBEDDING_KEYS['hunyuan_video']}")
    embeds, pooled, mask = pipe.encode_prompt(
        prompt=prompts, prompt_template=_call_default(pipe, "prompt_template"), device=device,
        max_sequence_length=_call_default(pipe, "max_sequence_length"))
    return {"prompt_embeds": embeds, "prompt_attention_mask": mask, "pooled_prompt_embeds": pooled}


def _refuse_true_cfg(embeds: Mapping[str, Any]) -> None:
    """HunyuanVideoPipeline runs true CFG (a second transformer call on the negative prompt, `true_cfg_scale` > 1)
    only when given a negative prompt; schedsearch samples its default guidance-distilled call, as it does Flux's, so
    negative embeddings would be silently ignored: refused instead, before any work."""
    negatives = sorted(k for k in embeds if k.startswith("negative_"))
    if negatives:
        raise UserInputError("conditions", f"{negatives} given, but schedsearch runs HunyuanVideo's default "
                             "guidance-distilled call (one transformer call per step, guidance embedded), not its "
                             "true CFG (true_cfg_scale > 1 with a negative prompt)",
                             "drop the negative_ keys; set the embedded guidance with guidance")


def _conditions(
    pipe: Any,
    family: str,
    network: torch.nn.Module,
    layout: dict[str, Any],
    conditions: Any,
    need_uncond: bool,
    class_conditioner: ClassConditioner | None = None,
) -> tuple[Conds, Conds | None]:
    """Class ids (DiT, or a class conditioner), prompt strings, or a pre-encoded dict -> batched (cond, uncond)."""
    if class_conditioner is not None and not isinstance(conditions, Mapping):
        with torch.no_grad():
            conditions = class_conditioner(torch.as_tensor(conditions, dtype=torch.long).reshape(-1))
    if family == "dit":
        labels = torch.as_tensor(conditions, dtype=torch.long).reshape(-1)
        null = torch.full_like(labels, int(network.config.num_embeds_ada_norm))  # LabelEmbedding's dropped label
        return {"class_labels": labels}, {"class_labels": null}
    if isinstance(conditions, str):
        conditions = [conditions]
    if family == "hunyuan_video" and isinstance(conditions, Mapping):
        _refuse_true_cfg(conditions)
    embeds = conditions if isinstance(conditions, Mapping) else encode_prompts(pipe, family, conditions)
    cond, uncond = _from_embeddings(family, embeds, need_uncond)
    if family == "sdxl":  # micro-conditioning (original size, crop top-left, target size) as the pipeline sets it
        res = layout["resolution"]
        time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32).expand(len(cond["prompt_embeds"]), 6)
        cond["time_ids"] = time_ids
        if uncond is not None:
            uncond["time_ids"] = time_ids
    return cond, uncond


def _to(conds: Conds, device: torch.device, dtype: torch.dtype) -> Conds:
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in conds.items()}


def _denoiser_factory(
    pipe: Any,
    family: str,
    network: torch.nn.Module,
    layout: dict[str, Any],
    schedule: NoiseSchedule,
    class_conditioner: ClassConditioner | None = None,
) -> Callable[[Any, float], Denoise]:
    model_time = _model_time(family, schedule)
    combine = guidance_rule(family, layout)
    boundary = layout.get("expert_boundary")

    def make(conditions: Any, guidance: float, guidance_2: float | None = None) -> Denoise:
        # Flux / HunyuanVideo are guidance-distilled: guidance is a network input, never a CFG pair
        cfg = family not in DISTILLED_GUIDANCE_SCALE and guidance != 1.0
        cond, uncond = _conditions(pipe, family, network, layout, conditions, cfg, class_conditioner)
        cond = _to(cond, network.device, network.dtype)
        both = None
        if cfg:
            uncond = _to(uncond, network.device, network.dtype)
            both = {k: torch.cat([uncond[k], v]) for k, v in cond.items()}  # one forward of batch 2N
        if boundary is None:
            forwards, scales = (_forward(network, family, layout, guidance, pipe=pipe),), (guidance,)
        else:  # Wan 2.2: per expert its transformer and scale (WanPipeline: guidance_scale_2 = guidance_scale if None)
            forwards = tuple(_forward(network, family, layout, guidance, expert=e) for e in (0, 1))
            scales = (guidance, guidance if guidance_2 is None else guidance_2)
        n = len(next(iter(cond.values())))

        @torch.no_grad()
        def denoise(x: torch.Tensor, t: float, step_index: int) -> torch.Tensor:
            if len(x) != n:
                raise ValueError(f"conditions: {n} conditions for a batch of {len(x)} samples")
            x = x.to(device=network.device, dtype=network.dtype)
            expert = 0 if boundary is None else expert_of_time(t, boundary)
            forward = forwards[expert]
            if not cfg:
                return forward(x, model_time(t), cond)
            uncond_out, cond_out = forward(torch.cat([x, x]), model_time(t), both).chunk(2)
            return combine(uncond_out, cond_out, scales[expert])

        return denoise

    return make


def linear_cfg(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance as most pipelines combine the pair: uncond + scale · (cond - uncond)."""
    return uncond + scale * (cond - uncond)


def guidance_rule(family: str, layout: dict[str, Any]) -> Guide:
    """How the family's pipeline combines the CFG pair (outputs in the unpacked latent layout)."""
    if family == "qwen_image":
        return _qwen_image_cfg(layout)
    return linear_cfg


def _qwen_image_cfg(layout: dict[str, Any]) -> Guide:
    """QwenImagePipeline.__call__'s norm-preserving true CFG: the linear combination rescaled, per packed latent
    token (2x2 patches of every channel, packed by the pipeline's own `_pack_latents`), to the norm of the
    conditional prediction, so guidance turns the prediction without growing it."""
    from diffusers import QwenImagePipeline

    c, h, w = layout["sample_shape"]
    scale = layout["vae_scale_factor"]

    def combine(uncond: torch.Tensor, cond: torch.Tensor, guidance: float) -> torch.Tensor:
        n = len(cond)
        cond_tokens = QwenImagePipeline._pack_latents(cond, n, c, h, w)
        combined = QwenImagePipeline._pack_latents(linear_cfg(uncond, cond, guidance), n, c, h, w)
        norms = torch.norm(cond_tokens, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True)
        rescaled = combined * norms
        return QwenImagePipeline._unpack_latents(rescaled, h * scale, w * scale, scale)[:, :, 0]

    return combine


# ---------------------------------------------------------------------------------------------------- decode


def _vae_decoder(pipe: Any, one_frame: bool = False, drop_frames: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """`one_frame`: image latents through a video VAE as a video of one frame (QwenImagePipeline decodes
    (N, C, 1, H, W) and keeps frame 0). `drop_frames`: leading latent frames the pipeline discards before decoding
    (CogVideoX 1.5's padding)."""
    vae = getattr(pipe, "vae", None)
    if vae is None and _vae_scale_factor(pipe) == 1:  # a pixel-space pipeline: samples are images
        return lambda samples: samples.float().clamp(-1.0, 1.0)

    @torch.no_grad()
    def decode(samples: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1]: undo the pipeline's latent normalisation, then the VAE decoder."""
        if vae is None:
            raise UserInputError("--model", f"{type(pipe).__name__} has no VAE: latents cannot be decoded to images",
                                 "load the pipeline with its VAE")
        latents = samples.to(device=vae.device, dtype=vae.dtype)
        latents = latents.unsqueeze(2) if one_frame else latents[:, :, drop_frames:] if drop_frames else latents
        buffers = dict(vae.named_buffers(recurse=False))  # not getattr: diffusers warns on config attributes
        if "latents_mean" in buffers:  # LTX: statistics as buffers, as LTXPipeline undoes them
            shape = (1, -1) + (1,) * (latents.dim() - 2)
            mean, std = (buffers[n].view(shape).to(latents) for n in ("latents_mean", "latents_std"))
            latents = latents * std / vae.config.scaling_factor + mean
        elif vae.config.get("latents_mean") is not None:  # Wan: per-channel statistics, as WanPipeline undoes them
            shape = (1, -1) + (1,) * (latents.dim() - 2)
            mean = torch.tensor(vae.config.latents_mean, dtype=latents.dtype, device=latents.device).view(shape)
            std = torch.tensor(vae.config.latents_std, dtype=latents.dtype, device=latents.device).view(shape)
            latents = latents * std + mean
        else:
            scale, shift = vae.config.scaling_factor, vae.config.get("shift_factor") or 0.0
            latents = latents / scale + shift
        images = torch.cat([vae.decode(chunk).sample for chunk in latents.split(DECODE_BATCH)])
        images = images[:, :, 0] if one_frame else images
        return images.float().clamp(-1.0, 1.0)

    return decode


# ---------------------------------------------------------------------------------------------------- assembly


def _check_qwen_image(pipe: Any, network: torch.nn.Module) -> None:
    """Refuse what QwenImagePipeline's text-to-image call cannot drive: the pipelines that feed the transformer input
    images (edit, img2img, inpaint, ControlNet, layered), and transformers that need an input it never passes."""
    from diffusers import QwenImagePipeline

    if not isinstance(pipe, QwenImagePipeline):
        raise UserInputError("--model", f"{type(pipe).__name__} feeds its QwenImageTransformer2DModel image inputs "
                             "that schedsearch does not supply", "load the checkpoint as a QwenImagePipeline "
                             "(text to image)")
    for setting, why in (("guidance_embeds", "diffusers' forward has no guidance embedding to feed it"),
                         ("use_additional_t_cond", "QwenImagePipeline never passes its additional_t_cond")):
        if network.config.get(setting):
            raise UserInputError("--model", f"QwenImageTransformer2DModel with {setting}=True cannot run in "
                                 f"QwenImagePipeline: {why}", "use a text-to-image Qwen-Image checkpoint")


def _check_cogvideox(pipe: Any, network: torch.nn.Module) -> None:
    """Refuse what CogVideoXPipeline's text-to-video call cannot drive: the pipelines that feed the transformer an
    image or a video (image-to-video, video-to-video, Fun-Control), and transformers that need an input it never
    passes (the image-to-video `ofs` embedding of CogVideoX 1.5 I2V, learned positions of CogVideoX-5b-I2V)."""
    from diffusers import CogVideoXPipeline

    if not isinstance(pipe, CogVideoXPipeline):
        raise UserInputError("--model", f"{type(pipe).__name__} feeds its CogVideoXTransformer3DModel inputs "
                             "schedsearch does not supply",
                             "load the checkpoint as a CogVideoXPipeline (text to video)")
    for setting in ("ofs_embed_dim", "use_learned_positional_embeddings"):
        if network.config.get(setting):
            raise UserInputError("--model", f"CogVideoXTransformer3DModel with {setting}={network.config[setting]!r} "
                                 "is an image-to-video transformer: CogVideoXPipeline never passes its image inputs",
                                 "use a text-to-video CogVideoX checkpoint")


def _check_zero_terminal_snr(scheduler: Any, schedule: NoiseSchedule) -> None:
    """ᾱ = 0 at the first step (zero terminal SNR) leaves ε-prediction without an x0 there (x0 = (x − σε)/α):
    refused before any work; v-prediction (CogVideoX) is exact there (x0 = −v)."""
    if isinstance(schedule, VPSchedule) and schedule.zero_terminal_snr and prediction_type_of(scheduler) == "epsilon":
        raise UserInputError("scheduler", f"{type(scheduler).__name__} has zero terminal SNR (ᾱ = 0 at t = "
                             f"{schedule.num_train_timesteps - 1}) with prediction_type='epsilon': the model's output "
                             "gives no x0 at pure noise", "use a v_prediction scheduler config, or "
                             "rescale_betas_zero_snr=False")


def _two_transformers(pipe: Any) -> bool:
    """Does the pipeline's loop run two transformers (Wan 2.2 A14B)? WanPipeline.__call__ switches to `transformer_2`
    below `boundary_ratio · T` only when the config sets `boundary_ratio`; without it `transformer_2` never runs.
    What it cannot run is refused here, before anything is built."""
    second = getattr(pipe, "transformer_2", None)
    ratio = pipe.config.get("boundary_ratio") if hasattr(pipe, "config") else None
    if second is None and ratio is None:
        return False
    from diffusers import WanPipeline

    name = type(pipe).__name__
    if not isinstance(pipe, WanPipeline):
        raise UserInputError("--model", f"{name} has two transformers and feeds them inputs schedsearch does not "
                             "supply", "load the checkpoint as a WanPipeline (text to video)")
    if ratio is None:
        return False
    if second is None or getattr(pipe, "transformer", None) is None:
        missing = "transformer_2" if second is None else "transformer"
        raise UserInputError("--model", f"{name} has boundary_ratio={ratio} but no `{missing}`: each noise range "
                             "needs its transformer", "load the pipeline with both transformers")
    return True


def _expert_boundary(pipe: Any, schedule: NoiseSchedule) -> dict[str, Any]:
    """What `spaces.baselines.expert_of_time` needs to place a step on either side of WanPipeline's boundary
    (`boundary_ratio * scheduler.config.num_train_timesteps`, compared with the network timestep)."""
    total = int(pipe.scheduler.config.num_train_timesteps)
    shift = schedule.shift if isinstance(schedule, FlowSchedule) else None
    return {"timestep": float(pipe.config.boundary_ratio) * total, "ratio": float(pipe.config.boundary_ratio),
            "num_train_timesteps": total, "flow_shift": shift}


def _check_same_blocks(network: ExpertPair, family: str, groups: tuple[BlockGroup, ...]) -> None:
    """One cache-plan layout serves both transformers, so they must have the same blocks (widths may differ)."""
    other = transformer_block_groups(network.experts[1], family)
    if other != groups:
        raise UserInputError("--model", f"transformer_2 has blocks {other} but transformer {groups}: one cache plan "
                             "cannot address both", "use two transformers with the same number of blocks")


def loaded_model_from_pipeline(
    pipe: Any,
    name: str = "diffusers:<in-memory>",
    resolution: int | None = None,
    *,
    num_frames: int | None = None,
    class_conditioner: ClassConditioner | None = None,
    num_classes: int | None = None,
    guidance_default: float | None = None,
    guidance_2: float | None = None,
) -> LoadedModel:
    """Adapt an already constructed pipeline (its denoiser, scheduler, text encoders, VAE) to a LoadedModel.

    With `class_conditioner` (and `num_classes`) the model is class-conditional: conditions are class ids that the
    conditioner turns into the family's pre-encoded embeddings, as `builtin:mnist-flow` does in place of text
    encoders."""
    two = _two_transformers(pipe)
    if guidance_2 is not None and not two:
        raise UserInputError("--guidance-2", f"{type(pipe).__name__} runs one transformer (no transformer_2 and "
                             "boundary_ratio)", "drop it; --guidance sets the scale")
    network = denoiser_of(pipe)
    family = family_of(network)
    if getattr(pipe, "scheduler", None) is None:
        raise UserInputError("--model", f"{type(pipe).__name__} has no scheduler: its config defines the noise "
                             "schedule", "load the pipeline with its scheduler")
    refuse_stochastic(pipe.scheduler)
    if family == "qwen_image":
        _check_qwen_image(pipe, network)
    if family == "cogvideox":
        _check_cogvideox(pipe, network)
    if two:
        network = ExpertPair(network, pipe.transformer_2)
    layout = _latent_layout(pipe, network, family, resolution, num_frames)
    if family == "wan" and pipe.config.get("expand_timesteps"):  # Wan 2.2 TI2V-5B: a timestep per latent token
        layout["expand_timesteps"] = True
    schedule = noise_schedule_of(pipe.scheduler, layout["tokens_per_sample"])
    _check_zero_terminal_snr(pipe.scheduler, schedule)
    if two:
        layout["expert_boundary"] = _expert_boundary(pipe, schedule)
    first = experts_of(network)[0]  # blocks every expert shares (checked below); class and widths: the first's
    if family in ("sd", "sdxl"):
        groups = unet_block_groups(network)
        extra = {"deepcache_unit": deepcache_unit(network)}
        side = layout["sample_shape"][1]
        layout["tokens_per_sample"] = tuple((side // 2**i) ** 2 for i in range(len(network.down_blocks)))
    else:
        groups, extra = transformer_block_groups(first, family), {}
    if two:
        _check_same_blocks(network, family, groups)
    extra |= _cost_extra(first, family) | {k: v for k, v in layout.items() if k != "sample_shape"}
    extra |= {"absent_components": absent_components(first, groups), "denoiser_class": type(first).__name__}
    if isinstance(schedule, FlowSchedule):
        extra["flow_shift"] = schedule.shift
    if guidance_2 is not None:  # the calibration set's identity: teachers at another second scale are not reused
        extra["guidance_2"] = float(guidance_2)
    if family in TEXT_ENCODING_CHANGES:  # the calibration set's identity: teachers of an older encoding are not reused
        extra["text_encoding"] = TEXT_ENCODING_CHANGES[family]
    info = ModelInfo(
        name=name,
        family=family,
        num_train_timesteps=int(pipe.scheduler.config.num_train_timesteps),
        prediction_type=prediction_type_of(pipe.scheduler),
        conditioning="class" if family == "dit" or class_conditioner is not None else "prompt",
        guidance_default=GUIDANCE_DEFAULTS[family] if guidance_default is None else guidance_default,
        sample_shape=tuple(int(s) for s in layout["sample_shape"]),
        block_groups=groups,
        num_classes=int(network.config.num_embeds_ada_norm) if family == "dit" else num_classes,
        extra=extra,
    )
    make = _denoiser_factory(pipe, family, network, layout, schedule, class_conditioner)
    decode = _vae_decoder(pipe, one_frame=family == "qwen_image", drop_frames=layout.get("padding_frames", 0))
    return LoadedModel(info, network, schedule, make, decode, scheduler=pipe.scheduler,
                       guidance_2=None if guidance_2 is None else float(guidance_2))


__all__ = [
    "EMBEDDING_KEYS",
    "FAMILY_BY_CLASS",
    "GUIDANCE_DEFAULTS",
    "cached_pipelines",
    "load_diffusers_model",
    "loaded_model_from_pipeline",
]
