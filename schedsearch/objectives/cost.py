"""What a schedule costs: NFE, MACs (analytic per step × block × component), and latency (measured, or predicted
from a per-component latency table measured once per model and device).

MACs follow ECAD's accounting (§4.1, calflops): multiply-accumulates of every matmul and convolution, attention
scores and values included, per sample; a CFG pair costs twice. The analytic table is cross-checked against
`torch.utils.flop_counter.FlopCounterMode` on the real forward (tests/test_cost.py).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from schedsearch.runtime.experts import ExpertPair
from schedsearch.runtime.models import ModelInfo, block_module_name, model_layout
from schedsearch.spaces.baselines import step_experts
from schedsearch.spaces.cache_plan import CachePlan, ComponentCachePlan, UnitCachePlan, block_names, slot_names
from schedsearch.spaces.schedule import SolverPlan


@dataclass(frozen=True)
class CostTable:
    """Cost of one model evaluation of one sample, split into what a cache plan can skip and what it cannot."""

    unit: str  # "MACs" or "s"
    base: float  # embeddings, patchify, adaLN conditioning, final layer: always computed
    slots: dict[str, float]  # 'group.block.component' -> cost
    block_overhead: dict[str, float]  # 'group.block' -> cost outside the cacheable components (norms, modulation)

    @property
    def full(self) -> float:
        return self.base + sum(self.slots.values()) + sum(self.block_overhead.values())


@dataclass(frozen=True)
class ExpertCostTable(CostTable):
    """The cost of a model of two transformers (Wan 2.2): one table per transformer (`experts`, in the order of
    `runtime.experts.ExpertPair`; they may differ in width), so a step is charged what the transformer running it
    costs. Its own fields are the first transformer's, for readers of a single table."""

    experts: tuple[CostTable, ...] = ()


def _dit_like_macs(network: torch.nn.Module, info: ModelInfo, encoder_tokens: int) -> CostTable:
    """DiT / PixArt transformer blocks: per sample with T image tokens, width d, feed-forward width f.

    attn1 = 4·T·d² (q, k, v, out) + 2·T²·d (scores, values); attn2 = 2·T·d² + 2·L·d·d_c + 2·T·L·d;
    ff = 2·T·d·f. Per block the adaLN-zero modulation adds its own timestep MLP (256·d + d²) and 6·d² (DiT only;
    PixArt shares one). Outside the blocks: the patch-embedding convolution, the final modulation and projection.
    """
    cfg = network.config
    d = cfg.num_attention_heads * cfg.attention_head_dim
    p = cfg.patch_size
    side = cfg.sample_size
    tokens = (side // p) ** 2
    block = network.transformer_blocks[0]
    ff_width = block.ff.net[0].proj.out_features
    if "geglu" in str(getattr(cfg, "activation_fn", "")):
        ff_width //= 2
    per_component = {
        "attn1": 4 * tokens * d * d + 2 * tokens * tokens * d,
        "attn2": 2 * tokens * d * d + 2 * encoder_tokens * d * d + 2 * tokens * encoder_tokens * d,
        "ff": 2 * tokens * d * ff_width,
    }
    timestep_mlp = 256 * d + d * d
    slots, overhead = {}, {}
    (group,) = info.block_groups
    per_block_modulation = info.family == "dit"
    for b in range(group.count):
        for c in group.components:
            slots[f"{group.path}.{b}.{c}"] = float(per_component[c])
        overhead[f"{group.path}.{b}"] = float(timestep_mlp + 6 * d * d) if per_block_modulation else 0.0
    patchify = tokens * (p * p * cfg.in_channels) * d
    out_channels = cfg.out_channels or cfg.in_channels
    if info.family == "dit":
        final = timestep_mlp + 2 * d * d + tokens * d * p * p * out_channels
    else:  # PixArt: shared adaLN-single (timestep MLP + 6d² once), caption projection, final linear
        final = timestep_mlp + 6 * d * d + encoder_tokens * (cfg.caption_channels * d + d * d)
        final += tokens * d * p * p * out_channels
    return CostTable("MACs", float(patchify + final), slots, overhead)


def _image_tokens(info: ModelInfo, patch: int) -> int:
    """Image tokens per sample from the (unpacked) latent shape: Flux packs 2x2 latent patches into one token."""
    _, height, width = info.sample_shape
    return (height // patch) * (width // patch)


def _joint_attention(tokens: int, text: int, d: int, *, text_out: bool = True, image_out: bool = True) -> int:
    """MM-DiT joint attention (SD3 / Flux `attn`): q, k, v of image and text tokens, scores and values over all
    T + L tokens, output projections (`to_out`, `to_add_out`) where the block has them."""
    joint = tokens + text
    return (
        3 * joint * d * d
        + 2 * joint * joint * d
        + (tokens * d * d if image_out else 0)
        + (text * d * d if text_out else 0)
    )


def _flux_macs(network: torch.nn.Module, info: ModelInfo, text: int) -> CostTable:
    """Flux (diffusers transformer_flux.py) per sample with T image tokens, L text tokens, width d, MLP width f=4d.

    Double block: attn = joint attention with both output projections; ff = 2·T·d·f; ff_context = 2·L·d·f;
    overhead = the two adaLN-zero linears (2 · 6d²). Single block on S = L + T tokens: attn = 3·S·d² + 2·S²·d
    (no output projection), proj_mlp = S·d·f, proj_out = S·(d + f)·d; overhead = adaLN linear 3d².
    Base: x_embedder, context_embedder, timestep / guidance / pooled-text MLPs, adaLN-continuous out and proj_out.
    """
    cfg = network.config
    d = cfg.num_attention_heads * cfg.attention_head_dim
    tokens = _image_tokens(info, 2 * cfg.patch_size)
    f = network.single_transformer_blocks[0].proj_mlp.out_features if len(network.single_transformer_blocks) else 4 * d
    f_double = network.transformer_blocks[0].ff.net[0].proj.out_features if len(network.transformer_blocks) else 4 * d
    joint = tokens + text
    double = {
        "attn": _joint_attention(tokens, text, d),
        "ff": 2 * tokens * d * f_double,
        "ff_context": 2 * text * d * f_double,
    }
    single = {
        "attn": 3 * joint * d * d + 2 * joint * joint * d,
        "proj_mlp": joint * d * f,
        "proj_out": joint * (d + f) * d,
    }
    per_group = {"transformer_blocks": (double, 12 * d * d), "single_transformer_blocks": (single, 3 * d * d)}
    slots, overhead = _fill(info, per_group)
    embed = 256 * d + d * d
    base = tokens * cfg.in_channels * d + text * cfg.joint_attention_dim * d
    base += embed * (2 if cfg.guidance_embeds else 1) + cfg.pooled_projection_dim * d + d * d
    out_channels = cfg.out_channels or cfg.in_channels
    base += 2 * d * d + tokens * d * cfg.patch_size**2 * out_channels
    return CostTable("MACs", float(base), slots, overhead)


def _sd3_macs(network: torch.nn.Module, info: ModelInfo, text: int) -> CostTable:
    """SD3 / SD3.5 (diffusers transformer_sd3.py, JointTransformerBlock) per sample with T image tokens, L text
    tokens, width d, ff width f = 4d.

    attn = joint attention (the last block is `context_pre_only`: no `to_add_out`, no ff_context, its context
    norm an adaLN-continuous 2d² instead of adaLN-zero 6d²); ff = 2·T·d·f; ff_context = 2·L·d·f; overhead = the
    adaLN linears (6d² + 6d² or 2d²) plus SD3.5's dual image self-attention `attn2` (4·T·d² + 2·T²·d) where present.
    Base: patch-embedding convolution, timestep and pooled-text MLPs, context_embedder, adaLN-continuous out,
    proj_out.
    """
    cfg = network.config
    d = cfg.num_attention_heads * cfg.attention_head_dim
    p = cfg.patch_size
    tokens = _image_tokens(info, p)
    slots, overhead = {}, {}
    (group,) = info.block_groups
    for b, block in enumerate(network.transformer_blocks):
        pre_only = block.context_pre_only
        f = block.ff.net[0].proj.out_features
        costs = {
            "attn": _joint_attention(tokens, text, d, text_out=not pre_only),
            "ff": 2 * tokens * d * f,
            "ff_context": 0 if pre_only else 2 * text * d * block.ff_context.net[0].proj.out_features,
        }
        for c in group.components:
            slots[f"{group.path}.{b}.{c}"] = float(costs[c])
        extra = 4 * tokens * d * d + 2 * tokens * tokens * d if getattr(block, "attn2", None) is not None else 0
        norms = block.norm1.linear.out_features * d + block.norm1_context.linear.out_features * d
        overhead[f"{group.path}.{b}"] = float(norms + extra)
    base = tokens * p * p * cfg.in_channels * d + 256 * d + d * d + cfg.pooled_projection_dim * d + d * d
    base += text * cfg.joint_attention_dim * cfg.caption_projection_dim
    base += 2 * d * d + tokens * d * p * p * (cfg.out_channels or cfg.in_channels)
    return CostTable("MACs", float(base), slots, overhead)


def _fill(
    info: ModelInfo, per_group: dict[str, tuple[dict[str, int], int]]
) -> tuple[dict[str, float], dict[str, float]]:
    slots, overhead = {}, {}
    for g in info.block_groups:
        costs, block_cost = per_group[g.path]
        for b in range(g.count):
            for c in g.components:
                slots[f"{g.path}.{b}.{c}"] = float(costs[c])
            overhead[f"{g.path}.{b}"] = float(block_cost)
    return slots, overhead


def _linear(m: torch.nn.Module, rows: int) -> int:
    return rows * m.in_features * m.out_features if isinstance(m, torch.nn.Linear) else _conv(m, rows)


def _conv(m: torch.nn.Module, pixels_out: int) -> int:
    """A convolution's MACs: output pixels × in × out × kernel area / groups."""
    return pixels_out * m.in_channels * m.out_channels * math.prod(m.kernel_size) // m.groups


def _attention(attn: torch.nn.Module, queries: int, keys: int) -> int:
    """diffusers `Attention`: q from `queries` tokens, k and v from `keys` tokens, scores and values, out."""
    inner = attn.to_q.out_features
    qkv = _linear(attn.to_q, queries) + _linear(attn.to_k, keys) + _linear(attn.to_v, keys)
    return qkv + 2 * queries * keys * inner + _linear(attn.to_out[0], queries)


def _resnet(r: torch.nn.Module, pixels: int) -> int:
    """ResnetBlock2D: two convolutions, the time-embedding projection (per sample), a 1x1 shortcut if present."""
    macs = _conv(r.conv1, pixels) + _conv(r.conv2, pixels)
    macs += r.time_emb_proj.in_features * r.time_emb_proj.out_features if r.time_emb_proj is not None else 0
    return macs + (_conv(r.conv_shortcut, pixels) if r.conv_shortcut is not None else 0)


def _spatial_transformer(t: torch.nn.Module, pixels: int, text: int) -> int:
    """Transformer2DModel on a UNet feature map: proj_in, per block self-attention over the pixels,
    cross-attention to the text, GEGLU feed-forward; proj_out."""
    macs = _linear(t.proj_in, pixels) + _linear(t.proj_out, pixels)
    for block in t.transformer_blocks:
        macs += _attention(block.attn1, pixels, pixels)
        if block.attn2 is not None:
            macs += _attention(block.attn2, pixels, text)
        macs += _linear(block.ff.net[0].proj, pixels) + _linear(block.ff.net[2], pixels)
    return macs


def _unet_block(block: torch.nn.Module, pixels: int, text: int) -> dict[str, int]:
    """One UNet block at its input resolution: resnets, attentions, samplers (the block overhead)."""
    parts = {
        "resnets": sum(_resnet(r, pixels) for r in block.resnets),
        "attentions": sum(_spatial_transformer(t, pixels, text) for t in getattr(block, "attentions", []) or []),
        "": 0,
    }
    for down in getattr(block, "downsamplers", None) or []:
        parts[""] += _conv(down.conv, pixels // 4)
    for up in getattr(block, "upsamplers", None) or []:
        parts[""] += _conv(up.conv, pixels * 4)
    return parts


def _unet_macs(network: torch.nn.Module, info: ModelInfo, text: int) -> CostTable:
    """UNet2DConditionModel (SD 1.x/2.x, SDXL; diffusers unet_2d_condition.py) per sample: every block costed at
    its resolution (down block i at H/2^i; up block j at the resolution of the down block it mirrors).
    Units are the blocks with attention (`unet_block_groups`): slots `resnets` and `attentions`, overhead the
    samplers. Base: conv_in, time (and SDXL add-) embedding MLPs, attention-free blocks, conv_out."""
    _, height, width = info.sample_shape
    n = len(network.down_blocks)
    pixels = [(height // 2**i) * (width // 2**i) for i in range(n)]
    costs = {f"down_blocks.{i}": _unet_block(b, pixels[i], text) for i, b in enumerate(network.down_blocks)}
    if network.mid_block is not None:
        costs["mid_block"] = _unet_block(network.mid_block, pixels[-1], text)
    costs |= {f"up_blocks.{j}": _unet_block(b, pixels[n - 1 - j], text) for j, b in enumerate(network.up_blocks)}
    mlps = [network.time_embedding.linear_1, network.time_embedding.linear_2]
    if getattr(network, "add_embedding", None) is not None:
        mlps += [network.add_embedding.linear_1, network.add_embedding.linear_2]
    base = _conv(network.conv_in, pixels[0]) + _conv(network.conv_out, pixels[0]) + sum(_linear(m, 1) for m in mlps)
    slots, overhead = {}, {}
    units = {g.path: g for g in info.block_groups}
    for path, parts in costs.items():
        if path not in units:
            base += sum(parts.values())
            continue
        for c in units[path].components:
            slots[f"{path}.0.{c}"] = float(parts[c])
        overhead[f"{path}.0"] = float(parts[""])
    return CostTable("MACs", float(base), slots, overhead)


# text tokens L per family as the pipelines encode prompts: PixArt's T5 (120 for α, 300 for Σ: pass it), CLIP 77,
# SD3 CLIP 77 + T5 256, Flux T5 512 (dev, guidance-embedded) or 256 (schnell)
DEFAULT_TEXT_TOKENS = {"pixart": 120, "sd": 77, "sdxl": 77, "sd3": 333, "flux": 512}


def analytic_macs_table(network: torch.nn.Module, info: ModelInfo, encoder_tokens: int | None = None) -> CostTable:
    """Per-sample MACs of one evaluation from the model config (DiT, PixArt, SD3, Flux, SD/SDXL UNets);
    `encoder_tokens` is the text length L (default DEFAULT_TEXT_TOKENS). Shapes (channels, heads, widths) are read
    from the config and the layers it built."""
    if encoder_tokens is None:
        encoder_tokens = DEFAULT_TEXT_TOKENS.get(info.family, 0)
        if info.family == "flux" and not network.config.guidance_embeds:
            encoder_tokens = 256
    if info.family in ("dit", "pixart"):
        return _dit_like_macs(network, info, encoder_tokens)
    if info.family == "flux":
        return _flux_macs(network, info, encoder_tokens)
    if info.family == "sd3":
        return _sd3_macs(network, info, encoder_tokens)
    if info.family in ("sd", "sdxl"):
        return _unet_macs(network, info, encoder_tokens)
    raise NotImplementedError(
        f"analytic MACs: no formula for family {info.family!r} yet; use measured_macs_table(...) instead"
    )


def measured_macs_table(network: torch.nn.Module, info: ModelInfo, forward: Callable[[], Any], batch: int) -> CostTable:
    """Per-sample MACs counted by FlopCounterMode on a real forward (math attention, so attention is counted);
    works for every family, and is the independent check of the analytic table. On an `ExpertPair` the forward is
    counted once routed to each transformer (the same inputs through either): an `ExpertCostTable`."""
    if isinstance(network, ExpertPair):
        return _per_expert(network, lambda e, expert: _counted_table(
            _flop_counts(forward), f"{type(network).__name__}.experts.{e}", expert, info, batch))
    return _counted_table(_flop_counts(forward), type(network).__name__, network, info, batch)


def _per_expert(pair: ExpertPair, table_of: Callable[[int, torch.nn.Module], CostTable]) -> ExpertCostTable:
    """`table_of(e, transformer)` for each transformer of the pair with every call routed to it (the same probe
    through either), as one `ExpertCostTable`."""
    tables = []
    for e, expert in enumerate(pair.experts):
        with pair.routed_to(e):
            tables.append(table_of(e, expert))
    first = tables[0]
    return ExpertCostTable(first.unit, first.base, first.slots, first.block_overhead, tuple(tables))


def _flop_counts(forward: Callable[[], Any]) -> dict[str, dict[Any, int]]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        forward()
    return counter.get_flop_counts()


def _counted_table(counts: dict[str, dict[Any, int]], root: str, network: torch.nn.Module, info: ModelInfo,
                   batch: int) -> CostTable:
    """A cost table from FlopCounterMode's counts of `network`, named `root` in them."""

    def macs(name: str) -> float:
        key = f"{root}.{name}" if name else root
        if key in counts:
            return sum(counts[key].values()) / 2 / batch
        # a ModuleList (a UNet block's `resnets`) is never called itself: sum its numbered children
        children = [k for k in counts if k.startswith(key + ".") and k[len(key) + 1 :].isdigit()]
        return sum(sum(counts[k].values()) for k in children) / 2 / batch

    slots, overhead = {}, {}
    for g in info.block_groups:
        for b in range(g.count):
            key, module = f"{g.path}.{b}", block_module_name(network, g.path, g.count, b)
            for c in g.components:
                slots[f"{key}.{c}"] = macs(f"{module}.{c}")
            overhead[key] = macs(module) - sum(slots[f"{key}.{c}"] for c in g.components)
    base = macs("") - sum(slots.values()) - sum(overhead.values())
    return CostTable("MACs", base, slots, overhead)


def slot_names_of(info: ModelInfo) -> list[str]:
    return slot_names(model_layout(info))


def evaluated_steps(plan: SolverPlan) -> list[int]:
    return list(range(1 if plan.first_step == "zero_x0" else 0, plan.num_steps))


def recompute_matrix(plan: SolverPlan, cache: CachePlan | None, info: ModelInfo) -> np.ndarray:
    """bool (steps, slots): which cacheable components run at each step."""
    names = slot_names_of(info)
    if cache is None:
        return np.ones((plan.num_steps, len(names)), dtype=bool)
    if isinstance(cache, ComponentCachePlan):
        return np.array([[c == "1" for c in row] for row in cache.recompute], dtype=bool)
    if isinstance(cache, UnitCachePlan):
        in_unit = np.array([_in_unit(cache, n.rsplit(".", 1)[0]) for n in names])
        return ~in_unit[None, :] | np.array(cache.refresh_mask())[:, None]
    raise TypeError(f"cache plan: unsupported {type(cache).__name__}")


def _in_unit(cache: UnitCachePlan, block: str) -> bool:
    path, index = block.rsplit(".", 1)
    return path == cache.group and cache.start <= int(index) < cache.end


def block_run_matrix(plan: SolverPlan, cache: CachePlan | None, blocks: list[str]) -> np.ndarray:
    """bool (steps, blocks): False where a cached unit, or a component plan with `skip_reused_blocks`, skips the
    whole block (its norms and modulation too); plain component reuse still runs the rest of the block."""
    runs = np.ones((plan.num_steps, len(blocks)), dtype=bool)
    if isinstance(cache, UnitCachePlan):
        in_unit = np.array([_in_unit(cache, b) for b in blocks])
        runs &= ~in_unit[None, :] | np.array(cache.refresh_mask())[:, None]
    elif isinstance(cache, ComponentCachePlan) and cache.skip_reused_blocks:
        skipped = dict(zip(block_names(cache.layout), np.array(cache.skipped_blocks(), dtype=bool).T, strict=True))
        for j, block in enumerate(blocks):
            if block in skipped:
                runs[:, j] &= ~skipped[block]
    return runs


def schedule_cost(
    table: CostTable, plan: SolverPlan, info: ModelInfo, cache: CachePlan | None = None, multiplier: float = 1.0
) -> float:
    """Σ over evaluated steps of base + recomputed components + blocks that run, times `multiplier` (2 for the
    MACs of a CFG pair; 1 for a latency table measured on the real batch). An `ExpertCostTable` charges each step
    the table of the transformer that runs it."""
    steps = evaluated_steps(plan)
    if isinstance(table, ExpertCostTable):
        experts = step_experts(plan, info.extra["expert_boundary"])
        return sum(_steps_cost(t, plan, info, cache, [i for i in steps if experts[i] == e])
                   for e, t in enumerate(table.experts)) * multiplier
    return _steps_cost(table, plan, info, cache, steps) * multiplier


def _steps_cost(table: CostTable, plan: SolverPlan, info: ModelInfo, cache: CachePlan | None,
                steps: list[int]) -> float:
    slot_cost = np.array([table.slots[n] for n in slot_names_of(info)])
    blocks = list(table.block_overhead)
    block_cost = np.array([table.block_overhead[b] for b in blocks])
    total = len(steps) * table.base
    total += float((recompute_matrix(plan, cache, info)[steps] @ slot_cost).sum())
    total += float((block_run_matrix(plan, cache, blocks)[steps] @ block_cost).sum())
    return total


def measured_latency_table(
    network: torch.nn.Module, info: ModelInfo, forward: Callable[[], Any], repeats: int = 5, device: str = "cpu"
) -> CostTable:
    """Seconds per evaluation (at the batch `forward` uses) of every component and block, timed with module hooks
    over `repeats` full forwards (median); measured once per model and device so that a schedule's latency can be
    predicted without running it. On an `ExpertPair` each transformer is timed with the forward routed to it (the
    same probe through either): an `ExpertCostTable`, as `measured_macs_table` counts one."""
    if isinstance(network, ExpertPair):
        return _per_expert(network, lambda _, expert: _timed_table(expert, info, forward, repeats, device))
    return _timed_table(network, info, forward, repeats, device)


def _timed_table(network: torch.nn.Module, info: ModelInfo, forward: Callable[[], Any], repeats: int,
                 device: str) -> CostTable:
    """`measured_latency_table` of one network that `forward` runs."""
    names = slot_names_of(info)
    blocks = [f"{g.path}.{b}" for g in info.block_groups for b in range(g.count)]
    samples: dict[str, list[float]] = {n: [] for n in [*names, *blocks, ""]}
    starts: dict[str, float] = {}

    def pre(name: str) -> Callable:
        def hook(*_: Any) -> None:
            _sync(device)
            starts[name] = time.perf_counter()

        return hook

    def post(name: str) -> Callable:
        def hook(*_: Any) -> None:
            _sync(device)
            samples[name].append(time.perf_counter() - starts[name])

        return hook

    handles = []
    for name in samples:
        module = network.get_submodule(name) if name else network
        handles += [module.register_forward_pre_hook(pre(name)), module.register_forward_hook(post(name))]
    try:
        with torch.no_grad():
            forward()  # warm-up
            for values in samples.values():
                values.clear()
            for _ in range(repeats):
                forward()
    finally:
        for handle in handles:
            handle.remove()
    med = {name: statistics.median(values) for name, values in samples.items()}
    slots = {n: med[n] for n in names}
    overhead = {b: med[b] - sum(med[n] for n in names if n.startswith(b + ".")) for b in blocks}
    base = med[""] - sum(med[b] for b in blocks)
    return CostTable("s", base, slots, overhead)


def _sync(device: str) -> None:
    """Wait for queued GPU work so that wall time measures it (no-op on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Timing:
    median_s: float
    iqr_s: float
    repeats: int

    def as_dict(self) -> dict[str, float]:
        return {"median_s": self.median_s, "iqr_s": self.iqr_s, "repeats": self.repeats}


def measure_latency(run: Callable[[], Any], warmup: int = 1, repeats: int = 5, device: str = "cpu") -> Timing:
    """Wall time of `run()`: warm-up calls first, then the median and inter-quartile range of `repeats` calls
    (synchronising the GPU around each, where one is used)."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return Timing(statistics.median(times), q[2] - q[0], repeats)


def observe_recompute(network: torch.nn.Module, info: ModelInfo, run: Callable[[], Any]) -> ComponentCachePlan:
    """What a run really computed, as a component plan: one row per network call, a 1 where the component ran.

    A component counts as run when its first parameterised submodule runs (a reused output never reaches it), so
    this also measures rule-based caches (diffusers' FirstBlockCache, PAB) with the same cost accounting."""
    names = slot_names_of(info)
    rows: list[list[str]] = []
    handles = [network.register_forward_pre_hook(lambda *_: rows.append(["0"] * len(names)))]
    for index, name in enumerate(names):
        block, component = name.rsplit(".", 1)
        module = getattr(network.get_submodule(block), component)
        if module is None:
            continue
        leaf = next(m for m in module.modules() if any(True for _ in m.parameters(recurse=False)))

        def mark(*_: Any, index: int = index) -> None:
            rows[-1][index] = "1"

        handles.append(leaf.register_forward_hook(mark))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return ComponentCachePlan(model_layout(info), tuple("".join(r) for r in rows))


@dataclass(frozen=True)
class Observation:
    """What a run really computed: per network call, the batch rows each cost unit ("" = base, 'group.block' =
    block overhead, 'group.block.component' = slot) processed (0 when it was skipped)."""

    calls: tuple[dict[str, int], ...]

    def cost(self, table: CostTable, full_batch: int, multiplier: float = 1.0) -> float:
        """Σ over calls and units of the unit's cost × rows / `full_batch` × `multiplier`: with a per-sample MACs
        table, full_batch = the CFG batch (2N) and multiplier = 2 give the same units as `schedule_cost`."""
        total = 0.0
        for rows in self.calls:
            total += table.base * rows.get("", 0)
            total += sum(table.block_overhead[b] * rows.get(b, 0) for b in table.block_overhead)
            total += sum(table.slots[n] * rows.get(n, 0) for n in table.slots)
        return total / full_batch * multiplier

    def per_sample(self, table: CostTable, samples: int) -> float:
        """Cost per sample of this observation of `samples` samples' run, every batch row counted (a CFG pair
        twice, as `MACs` counts it); for a per-call table measured at batch B (latency), divide by B after."""
        return self.cost(table, full_batch=samples)

    def recompute_fraction(self) -> float:
        slots = [n for n in self.calls[0] if n.count(".") >= 2] if self.calls else []
        ran = sum(rows[n] > 0 for rows in self.calls for n in slots)
        return ran / max(1, len(slots) * len(self.calls))


def _leaves(module: torch.nn.Module, exclude: tuple[torch.nn.Module | None, ...] = ()) -> list[torch.nn.Module]:
    """Submodules owning parameters (registration order), outside `exclude`'s subtrees."""
    skipped = {id(m) for e in exclude if e is not None for m in e.modules()}
    return [m for m in module.modules() if id(m) not in skipped and any(True for _ in m.parameters(False))]


class UnitObserver:
    """Records, per network call, how many batch rows each cost unit processed, while attached (a context manager).

    A unit counts as run when its first parameterised submodule runs (a reused or skipped output never reaches it):
    the base by the first one outside all blocks (the patch embedding), a block's overhead by the last one
    outside its components (its adaLN linear: DiT also calls block 0's timestep MLP for its final layer), a
    component by its first. Rows, not calls, are counted, so a cache that drops the unconditional half of a CFG
    batch (FasterCache) is accounted too; whole-block skips (FirstBlockCache, MagCache) drop the block overhead as
    well as the components. `take()` returns what ran since the last take: one run's (or one sample's) calls."""

    def __init__(self, network: torch.nn.Module, info: ModelInfo) -> None:
        self.network = network
        units: dict[str, torch.nn.Module] = {}
        blocks = [(f"{g.path}.{b}", g.components) for g in info.block_groups for b in range(g.count)]
        block_modules = tuple(network.get_submodule(b) for b, _ in blocks)
        units[""] = _leaves(network, block_modules)[0]
        for (block, components), module in zip(blocks, block_modules, strict=True):
            parts = tuple(getattr(module, c, None) for c in components)
            units[block] = _leaves(module, parts)[-1]
            for c, part in zip(components, parts, strict=True):
                if part is not None:
                    units[f"{block}.{c}"] = _leaves(part)[0]
        self.units = units
        self.calls: list[dict[str, int]] = []
        self._handles: list[Any] = []

    def __enter__(self) -> UnitObserver:
        units, calls = self.units, self.calls
        self._handles = [self.network.register_forward_pre_hook(lambda *_: calls.append(dict.fromkeys(units, 0)))]
        for name, leaf in units.items():

            def mark(_: torch.nn.Module, args: tuple, name: str = name) -> None:
                rows = int(args[0].shape[0]) if args and torch.is_tensor(args[0]) and args[0].ndim else 1
                calls[-1][name] = max(calls[-1][name], rows)

            self._handles.append(leaf.register_forward_pre_hook(mark))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def take(self) -> Observation:
        observed = Observation(tuple(self.calls))
        self.calls.clear()
        return observed


def observe_units(network: torch.nn.Module, info: ModelInfo, run: Callable[[], Any]) -> Observation:
    """Run `run()` and record, per network call, how many batch rows each cost unit processed (`UnitObserver`)."""
    with UnitObserver(network, info) as observer:
        run()
    return observer.take()


def calibrate_base(table: CostTable, measured_full_s: float, evaluations: int | Sequence[int]) -> CostTable:
    """Fold what module timing cannot see (the sampler's own arithmetic, CFG combination, Python between modules)
    into `base`, from one measured uncached run, so that predicted = measured for the uncached schedule and a cached
    schedule is predicted as that minus the latency of what it skips. For an `ExpertCostTable`, `evaluations` are
    per transformer (the run's steps each ran), and the unexplained time is spread evenly over every evaluation."""
    if isinstance(table, ExpertCostTable):
        counts = list(evaluations) if isinstance(evaluations, Sequence) else [evaluations]
        if len(counts) != len(table.experts):
            raise ValueError(f"calibrate_base: {len(counts)} evaluation counts for {len(table.experts)} transformers")
        timed = sum(n * (t.full - t.base) for n, t in zip(counts, table.experts, strict=True))
        base = (measured_full_s - timed) / sum(counts)
        experts = tuple(CostTable(t.unit, base, t.slots, t.block_overhead) for t in table.experts)
        return ExpertCostTable(table.unit, base, table.slots, table.block_overhead, experts)
    per_eval = measured_full_s / evaluations
    return CostTable(table.unit, per_eval - (table.full - table.base), table.slots, table.block_overhead)


def table_to_dict(table: CostTable) -> dict[str, Any]:
    """A cost table as JSON-ready data (a per-transformer table keeps its tables under "experts")."""
    return dataclasses.asdict(table)


def table_from_dict(data: Mapping[str, Any]) -> CostTable:
    """The inverse of `table_to_dict`."""
    fields = {k: v for k, v in data.items() if k != "experts"}
    if "experts" in data:
        return ExpertCostTable(**fields, experts=tuple(CostTable(**t) for t in data["experts"]))
    return CostTable(**fields)
