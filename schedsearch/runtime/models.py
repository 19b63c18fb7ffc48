"""Model registry: `load_model("builtin:mnist-dit")` or `load_model("diffusers:<local dir or hub id>")`.

A loaded model reports, as plain integers and names (`ModelInfo`), everything the search spaces need, so spaces are
built from the info and never from the network itself. It also makes the denoiser the unified sampler calls
(classifier-free guidance included) and decodes samples to images.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from schedsearch.errors import UnavailableError, UserInputError
from schedsearch.runtime.noise import NoiseSchedule, VPSchedule
from schedsearch.spaces.base import ModelStructure
from schedsearch.spaces.baselines import dpm_solver_plan, linspace_timesteps
from schedsearch.spaces.cache_plan import layout_of
from schedsearch.spaces.schedule import SolverPlan

Conditioning = Literal["class", "prompt", "none"]
BUILTIN_MNIST_DIT = "builtin:mnist-dit"
BUILTIN_MNIST_FLOW = "builtin:mnist-flow"
BUILTIN_MODELS = (BUILTIN_MNIST_DIT, BUILTIN_MNIST_FLOW)


@dataclass(frozen=True)
class BlockGroup:
    """A run of identical blocks that caches can address: attribute path on the network, count, components."""

    path: str
    count: int
    components: tuple[str, ...]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    num_train_timesteps: int
    prediction_type: str
    conditioning: Conditioning
    guidance_default: float
    sample_shape: tuple[int, ...]  # one sample in the network's space (latent for latent models), no batch axis
    block_groups: tuple[BlockGroup, ...]
    num_classes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def max_timestep(self) -> float:
        """The noisiest model time a plan may start at: T for rectified flow (σ = 1, where FlowMatch Euler starts),
        T - 1 for DDPM (its last training step)."""
        flow = self.prediction_type == "flow_prediction"
        return float(self.num_train_timesteps if flow else self.num_train_timesteps - 1)

    @property
    def num_blocks(self) -> int:
        return sum(g.count for g in self.block_groups)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "num_train_timesteps": self.num_train_timesteps,
            "prediction_type": self.prediction_type,
            "conditioning": self.conditioning,
            "num_classes": self.num_classes,
            "guidance_default": self.guidance_default,
            "sample_shape": list(self.sample_shape),
            "block_groups": [
                {"path": g.path, "count": g.count, "components": list(g.components)} for g in self.block_groups
            ],
        }


def model_layout(info: ModelInfo) -> str:
    """The slot layout a component cache plan must have for this model."""
    return layout_of([(g.path, g.count, g.components) for g in info.block_groups])


# their blocks are in diffusers' TransformerBlockRegistry
BLOCK_SKIP_FAMILIES = ("dit", "pixart", "sd3", "flux", "wan", "ltx", "qwen_image", "cogvideox")


def model_structure(info: ModelInfo) -> ModelStructure:
    """The integers a space is built from (spaces never see the model): layout, blocks, the cacheable unit, and for a
    two-transformer model the boundary between its experts (`spaces.baselines.expert_of_time`)."""
    unit = info.extra.get("deepcache_unit") if info.extra else None
    boundary = info.extra.get("expert_boundary") if info.extra else None
    if unit:
        unit_group, unit_blocks = "deepcache", 1
    else:
        unit_group, unit_blocks = info.block_groups[0].path, info.block_groups[0].count
    return ModelStructure(
        name=info.name,
        num_train_timesteps=info.num_train_timesteps,
        layout=model_layout(info),
        num_blocks=info.num_blocks,
        unit_group=unit_group,
        unit_blocks=unit_blocks,
        has_cross_attention=any("attn2" in g.components for g in info.block_groups),
        block_skip=info.family in BLOCK_SKIP_FAMILIES,
        extra={} if boundary is None else {"expert_boundary": dict(boundary)},
    )


def block_module_name(network: torch.nn.Module, path: str, count: int, index: int) -> str:
    """Module name of block `index` of a group: `path.index` in a ModuleList; `path` itself for a single-unit
    group (a UNet block such as `down_blocks.0`, whose slot names still carry the index 0). The same in every
    transformer of an `ExpertPair`, so its first answers."""
    from schedsearch.runtime.experts import experts_of

    single = count == 1 and not isinstance(experts_of(network)[0].get_submodule(path), torch.nn.ModuleList)
    return path if single else f"{path}.{index}"


class ModelNotAvailableError(UnavailableError):
    """The weights are not on this machine; the message says how to make them available."""


@dataclass(eq=False)
class LoadedModel:
    """A network ready to sample: its info, noise schedule, and the callables the sampler needs."""

    info: ModelInfo
    network: torch.nn.Module
    noise_schedule: NoiseSchedule
    _make_denoiser: Callable[[Any, float], Callable[[torch.Tensor, float, int], torch.Tensor]]
    _decode: Callable[[torch.Tensor], torch.Tensor]
    scheduler: Any = None  # the pipeline's own diffusers scheduler (None for the builtin DiT)
    guidance_2: float | None = None  # a two-transformer model's low-noise scale as loaded (None: `guidance`)

    def denoiser(
        self, conditions: Any, guidance: float | None = None, guidance_2: float | None = None
    ) -> Callable[[torch.Tensor, float, int], torch.Tensor]:
        """The CFG-combined model output at (x, t); `conditions` are class ids or prompts, one per sample.

        `guidance_2`: the scale of the low-noise transformer of a two-transformer model (Wan 2.2's
        `guidance_scale_2`; None: the scale it was loaded with, else `guidance`, as WanPipeline defaults it);
        refused on a one-network model, as WanPipeline refuses it without a `boundary_ratio`."""
        guidance = self.info.guidance_default if guidance is None else guidance
        guidance_2 = self.guidance_2 if guidance_2 is None else guidance_2
        if guidance_2 is None:
            return self._make_denoiser(conditions, guidance)
        if "expert_boundary" not in self.info.extra:
            raise UserInputError("guidance_2", f"{self.info.name} runs one network", "drop guidance_2")
        return self._make_denoiser(conditions, guidance, guidance_2)

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Network-space samples -> images in [-1, 1] (identity for pixel models, the VAE for latent ones)."""
        return self._decode(samples)

    def pipeline_plan(self, num_steps: int) -> SolverPlan:
        """What the pipeline's own scheduler, with its settings, runs in `num_steps` steps (see
        `runtime.scheduler_plan`); UserInputError when there is none or a setting cannot be expressed."""
        from schedsearch.runtime.scheduler_plan import pipeline_sigmas, plan_from_scheduler

        if self.scheduler is None:
            raise UserInputError("--solver", f"{self.info.name} has no pipeline scheduler",
                                 "use ddim, dpmsolver++ or unipc")
        sigmas = pipeline_sigmas(self.info.family, self.scheduler, num_steps)
        return plan_from_scheduler(self.scheduler, num_steps, self.noise_schedule, sigmas)

    def default_plan(self, num_steps: int = 20) -> SolverPlan:
        """The pipeline's own scheduler where it can be expressed (what users run); otherwise DPM-Solver++(2M) on
        diffusers' linspace timesteps (the builtin DiT; PNDM and other schedulers a plan cannot express), with a
        warning naming why, since the result is then not the pipeline's own output."""
        if self.scheduler is not None:
            try:
                return self.pipeline_plan(num_steps)
            except UserInputError as err:
                warnings.warn(f"{self.info.name}: the pipeline's scheduler cannot run as a plan at {num_steps} steps "
                              f"({err}); the default plan is DPM-Solver++(2M) instead", stacklevel=2)
        return dpm_solver_plan(linspace_timesteps(self.info.num_train_timesteps, num_steps), order=2)


def _class_denoiser(network: torch.nn.Module, null_class: int) -> Callable[[Any, float], Callable]:
    def make(conditions: Any, guidance: float) -> Callable[[torch.Tensor, float, int], torch.Tensor]:
        labels = torch.as_tensor(conditions, dtype=torch.long)
        null = torch.full_like(labels, null_class)

        @torch.no_grad()
        def denoise(x: torch.Tensor, t: float, step_index: int) -> torch.Tensor:
            if len(labels) != len(x):
                raise ValueError(f"conditions: {len(labels)} class labels for a batch of {len(x)} samples")
            if guidance == 1.0:
                return network(x, timestep=torch.full((len(x),), float(t)), class_labels=labels).sample
            out = network(
                torch.cat([x, x]), timestep=torch.full((2 * len(x),), float(t)), class_labels=torch.cat([labels, null])
            ).sample
            cond, uncond = out.chunk(2)
            return uncond + guidance * (cond - uncond)

        return denoise

    return make


def dit_block_groups(network: torch.nn.Module) -> tuple[BlockGroup, ...]:
    return (BlockGroup("transformer_blocks", len(network.transformer_blocks), ("attn1", "ff")),)


def load_builtin_mnist_dit() -> LoadedModel:
    from schedsearch.runtime import builtin

    network = builtin.load_builtin_dit()
    info = ModelInfo(
        name=BUILTIN_MNIST_DIT,
        family="dit",
        num_train_timesteps=builtin.NUM_TRAIN_TIMESTEPS,
        prediction_type="epsilon",
        conditioning="class",
        num_classes=builtin.NUM_CLASSES,
        guidance_default=builtin.DEFAULT_GUIDANCE,
        sample_shape=(1, 28, 28),
        block_groups=dit_block_groups(network),
    )
    schedule = VPSchedule.linear(builtin.NUM_TRAIN_TIMESTEPS, builtin.BETA_START, builtin.BETA_END)
    return LoadedModel(info, network, schedule, _class_denoiser(network, builtin.NULL_CLASS), lambda x: x.clamp(-1, 1))


def load_builtin_mnist_flow(assets_dir: Path | None = None) -> LoadedModel:
    """The SD3-style flow model, run through the diffusers adapter of its family (`loaded_model_from_pipeline` on a
    real `StableDiffusion3Pipeline`): the same forward, time units, shift and hooks as a user's SD3 pipeline."""
    from schedsearch.runtime import builtin_flow
    from schedsearch.runtime.diffusers_models import loaded_model_from_pipeline

    try:
        flow = builtin_flow.load_builtin_flow(*(() if assets_dir is None else (assets_dir,)))
    except FileNotFoundError as err:
        raise ModelNotAvailableError(
            f"{BUILTIN_MNIST_FLOW}: its weights are not installed ({err}); train them with "
            "`schedsearch train-builtin flow` then `schedsearch train-builtin export-flow`"
        ) from err
    pipe = builtin_flow.flow_pipeline(flow)
    return loaded_model_from_pipeline(
        pipe,
        name=BUILTIN_MNIST_FLOW,
        class_conditioner=flow.conditioner.embeddings,
        num_classes=builtin_flow.NUM_CLASSES,
        guidance_default=builtin_flow.DEFAULT_GUIDANCE,
    )


def load_model(name: str, **kwargs: Any) -> LoadedModel:
    """Load by registry name. The `builtin:` models ship with the package; `diffusers:<path or id>` reads a local
    pipeline directory or the local Hugging Face cache and never downloads."""
    if name in BUILTIN_MODELS and any(v is not None for v in kwargs.values()):
        given = next(k for k, v in kwargs.items() if v is not None)
        flag = {"num_frames": "--frames"}.get(given, "--" + given.replace("_", "-"))
        what = "runs one network" if given == "guidance_2" else "has one size (1×28×28 images)"
        raise UserInputError(flag, f"{name} {what}", "drop it")
    if name == BUILTIN_MNIST_DIT:
        return load_builtin_mnist_dit()
    if name == BUILTIN_MNIST_FLOW:
        return load_builtin_mnist_flow()
    if name.startswith("diffusers:"):
        from schedsearch.runtime.diffusers_models import load_diffusers_model

        return load_diffusers_model(name.removeprefix("diffusers:"), **kwargs)
    raise UserInputError("--model", f"unknown {name!r}", f"use {BUILTIN_MNIST_DIT!r}, {BUILTIN_MNIST_FLOW!r} or "
                         "'diffusers:<local pipeline dir or hub id>' (see `schedsearch models`)")


def available_models(directory: str | None = None) -> list[dict[str, str]]:
    """What can be loaded here: the builtin model, diffusers pipelines found in the local HF cache, and saved
    pipelines under `directory`; each with the family schedsearch runs it as ("unsupported" names its denoiser)."""
    from schedsearch.runtime.builtin import ASSETS_DIR
    from schedsearch.runtime.builtin_flow import FLOW_WEIGHTS

    flow_ready = (ASSETS_DIR / FLOW_WEIGHTS).is_file()
    rows = [
        {"name": BUILTIN_MNIST_DIT, "where": "shipped with schedsearch", "family": "dit", "status": "ready"},
        {"name": BUILTIN_MNIST_FLOW, "where": "shipped with schedsearch", "family": "sd3 (flow matching)",
         "status": "ready" if flow_ready else "weights missing: schedsearch train-builtin flow"},
    ]
    try:
        from schedsearch.runtime.diffusers_models import cached_pipelines, local_pipelines, pipeline_summary
    except ImportError:
        return rows
    found = [(f"diffusers:{repo}", path) for repo, path in cached_pipelines()]
    if directory is not None:
        found += [(f"diffusers:{path}", path) for path, _ in local_pipelines(directory)]
    for name, path in found:
        summary = pipeline_summary(path) or {"family": "unsupported", "denoiser": "?"}
        supported = summary["family"] != "unsupported"
        rows.append({"name": name, "where": path, "family": summary["family"] if supported else
                     f"unsupported ({summary['denoiser']})", "status": "local" if supported else "not supported"})
    return rows


def initial_noise(seeds: Sequence[int], shape: Sequence[int], sigma: float = 1.0) -> torch.Tensor:
    """Per-sample seeded noise (EDM style): sample i depends on seeds[i] only, so a seed gives the same image
    whatever the batch it is drawn in."""
    return (
        torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]) * sigma
    )
