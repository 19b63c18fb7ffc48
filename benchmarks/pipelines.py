"""Every supported pipeline family on its tiny random config (the test suite's, saved with `save_pretrained` and
loaded back): how close the all-recompute default plan is to the stock `pipe(...)` call, what the cache hooks cost
when they change nothing, analytic against counted MACs, and the seconds of a quick ECAD study.

    python benchmarks/pipelines.py [--rounds 5] [--families cogvideox,ltx] [--note "..."]

Prints one JSON object (a row per family) and writes benchmarks/results/pipelines.json; with --families only those
rows are measured and replaced in it, the others kept as they were (--note: how they were measured, e.g. on a
shared machine, kept on those rows). The tiny pipelines come
from the tests (tests/test_diffusers_models.py, tests/test_wan.py, ...), so the benchmark and the suite measure the same
objects. Equivalence is in float32 at 4 steps with the pipeline's own default scheduler; `dit` has no entry there
(DiTPipeline draws its own noise and takes no latents).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

import test_cogvideox
import test_diffusers_models as tdm
import test_hunyuan_video
import test_ltx
import test_qwen_image
import test_sana
import test_wan
import test_wan22

from schedsearch.objectives.cost import analytic_macs_table, measured_macs_table
from schedsearch.runtime.cache_hooks import CacheRuntime
from schedsearch.runtime.models import initial_noise, load_model, model_layout
from schedsearch.runtime.sampler import sample
from schedsearch.search.base import Budget
from schedsearch.spaces.cache_plan import ComponentCachePlan
from schedsearch.study import run_search

FAMILIES = ["dit", "pixart", "sana", "sd", "sdxl", "sd3", "flux", "wan", "wan22", "hunyuan_video", "ltx",
            "qwen_image", "cogvideox"]  # rows; "wan22" is family "wan" with two transformers (Wan 2.2 A14B)
RESULTS = Path(__file__).parent / "results" / "pipelines.json"
STEPS = 4
SIZE = {"flux": {"resolution": 16}, "sana": {"resolution": test_sana.PIXELS},
        "wan": {"resolution": test_wan.PIXELS, "num_frames": test_wan.FRAMES},
        "wan22": {"resolution": test_wan22.PIXELS, "num_frames": test_wan22.FRAMES},
        "hunyuan_video": {"resolution": test_hunyuan_video.PIXELS, "num_frames": test_hunyuan_video.FRAMES},
        "ltx": {"resolution": test_ltx.PIXELS, "num_frames": test_ltx.FRAMES},
        "qwen_image": {"resolution": test_qwen_image.PIXELS},
        "cogvideox": {"resolution": test_cogvideox.PIXELS, "num_frames": test_cogvideox.FRAMES}}
OWN_TEST = {"sana": test_sana, "wan": test_wan, "wan22": test_wan22, "hunyuan_video": test_hunyuan_video,
            "ltx": test_ltx, "qwen_image": test_qwen_image, "cogvideox": test_cogvideox}  # builders, embeddings
# the tiny pipelines that have a text encoder
PROMPTED = {"sd": ["a cat", "a dog"], "wan": ["a cat", "a dog"], "wan22": ["a cat", "a dog"], "ltx": ["a cat", "a dog"],
            "qwen_image": ["a cat", "a dog"], "cogvideox": ["a cat", "a dog"]}
# the CFG scale of the equivalence call where the test's differs from the model's default
GUIDANCE = {"ltx": test_ltx.GUIDANCE, "qwen_image": test_qwen_image.GUIDANCE}
GUIDANCE_2 = {"wan22": 2.0}  # Wan 2.2's low-noise scale (guidance_scale_2), unlike the high-noise 5.0


def conditions(family: str):
    return OWN_TEST[family].embeddings(2) if family in OWN_TEST else tdm.conditions(family, 2)


def equivalence(family: str, model, path: Path) -> dict:
    if family == "dit":
        return {"equivalence": None, "equivalence_note": "DiTPipeline takes no latents"}
    cond = conditions(family)
    x = initial_noise([0, 1], model.info.sample_shape)
    plan = model.default_plan(STEPS)
    with torch.no_grad():
        guidance, guidance_2 = GUIDANCE.get(family), GUIDANCE_2.get(family)
        ours = sample(model.denoiser(cond, guidance, guidance_2), x, plan, model.noise_schedule,
                      model.info.prediction_type)
        pipe = tdm._pipeline(path)
        if family == "sana":
            theirs = test_sana._stock(path, x, cond, STEPS)[0].images
        elif family == "hunyuan_video":
            theirs = test_hunyuan_video._call(pipe, x, cond, STEPS)
        elif family == "ltx":
            theirs = test_ltx._call(test_ltx._pipe(path), x, cond, STEPS)
        elif family == "cogvideox":  # latents (F, C, H, W) at the pipeline, permuted by the test's call
            theirs = test_cogvideox._call(test_cogvideox._pipe(path), x, STEPS, **cond)
        elif family == "qwen_image":  # true CFG: two calls per step, norm-preserving combination
            theirs = test_qwen_image._call(test_qwen_image._pipe(path), x, STEPS, **cond)
        elif family in ("wan", "wan22"):  # Wan 2.2: the low-noise transformer at guidance_scale_2
            full = {k: v.expand(len(x), *v.shape[1:]) for k, v in cond.items()}
            second = {"guidance_scale_2": guidance_2} if guidance_2 is not None else {}
            size = OWN_TEST[family]
            theirs = pipe(latents=x, guidance_scale=5.0, height=size.PIXELS, width=size.PIXELS,
                          num_frames=size.FRAMES, num_inference_steps=STEPS, output_type="latent", **full,
                          **second).frames
        else:
            theirs = tdm.stock_call(family, pipe, x, cond, STEPS)
    return {"equivalence": float((ours - theirs).abs().max()), "scheduler": type(pipe.scheduler).__name__,
            "network_timesteps_rounded": plan.network_timesteps is not None}


def hook_overhead(model, rounds: int) -> dict:
    """All-recompute plan through the hooks against the unhooked model, interleaved A/B."""
    cond = conditions(model.info.family)
    x = initial_noise([0, 1], model.info.sample_shape)
    plan = model.default_plan(STEPS)
    denoise = model.denoiser(cond)

    def run() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            sample(denoise, x, plan, model.noise_schedule, model.info.prediction_type)
        return time.perf_counter() - start

    full = ComponentCachePlan.full(model_layout(model.info), STEPS)
    plain, hooked = [], []
    run()
    for _ in range(rounds):
        plain.append(run())
        runtime = CacheRuntime(model.network, model.info, full)
        try:
            hooked.append(run())
        finally:
            runtime.remove()
    return {"hook_overhead_ratio": statistics.median(hooked) / statistics.median(plain)}


def macs(model) -> dict:
    cond = conditions(model.info.family)
    x = initial_noise([0], model.info.sample_shape)
    one = {k: v[:1] for k, v in cond.items()} if isinstance(cond, dict) else cond[:1]
    denoise = model.denoiser(one, guidance=1.0)
    table = measured_macs_table(model.network, model.info, lambda: denoise(x, 500.0, 0), batch=1)
    counted = table.full
    per_transformer = [t.full for t in getattr(table, "experts", ())]  # Wan 2.2: each transformer's own count
    # the analytic table assumes the family's production text length (e.g. Flux 512); give it the tiny one's
    text = cond["prompt_embeds"].shape[1] if isinstance(cond, dict) else tdm.TEXT_LEN
    try:
        analytic = analytic_macs_table(model.network, model.info, encoder_tokens=text).full
    except NotImplementedError:
        out = {"macs_counted": counted, "macs_analytic": None}
        return out | ({"macs_counted_per_transformer": per_transformer} if per_transformer else {})
    return {"macs_counted": counted, "macs_analytic": analytic, "macs_analytic_over_counted": analytic / counted}


def quick_study(family: str, model, work: Path) -> dict:
    if model.info.conditioning == "prompt" and family not in PROMPTED:
        return {"ecad_seconds": None, "ecad_note": "the tiny pipeline has no text encoder"}
    start = time.perf_counter()
    result = run_search(model=model, space="cache", strategy="ecad", objectives=["psnr", "macs"], study=family,
                        store=work / f"{family}.db", budget=Budget(evaluations=8), samples=2,
                        prompts=PROMPTED.get(family), cache_dir=work / "cache", batch_size=2,
                        space_options={"num_steps": STEPS}, strategy_options={"population": 4}, progress=False,
                        validate=False)
    return {"ecad_seconds": round(time.perf_counter() - start, 2), "ecad_evaluations": result.evaluations,
            "ecad_failed": result.failed}


def _build(family: str, work: Path):
    """The family's tiny pipeline, as its tests build it."""
    builders = {"wan": lambda: test_wan.build_wan(work), "wan22": lambda: test_wan22.build_wan22(work),
                "sana": test_sana.build_sana, "hunyuan_video": test_hunyuan_video.build_hunyuan,
                "ltx": lambda: test_ltx.build_ltx(work), "qwen_image": test_qwen_image.build_qwen_image,
                "cogvideox": test_cogvideox.build_cogvideox}
    return builders[family]() if family in builders else tdm.build_pipeline(family, work)


def _families(arg: str | None) -> list[str]:
    if arg is None:
        return FAMILIES
    chosen = [f.strip() for f in arg.split(",") if f.strip()]
    unknown = sorted(set(chosen) - set(FAMILIES))
    if unknown or not chosen:
        raise SystemExit(f"--families: unknown {unknown or arg!r}; choose from {', '.join(FAMILIES)}")
    return chosen


def _merged(rows: list[dict], partial: bool) -> list[dict]:
    """The measured rows, and with --families the JSON's other rows kept, in FAMILIES order."""
    if not partial or not RESULTS.is_file():
        return rows
    by_family = {row["family"]: row for row in json.loads(RESULTS.read_text())["rows"]}
    by_family |= {row["family"]: row for row in rows}
    return [by_family[f] for f in FAMILIES if f in by_family]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5, help="interleaved A/B rounds of the hook overhead")
    parser.add_argument("--families", help="comma-separated rows to measure; the JSON's other rows are kept")
    parser.add_argument("--note", help="how these rows were measured (kept on them), e.g. a shared machine")
    args = parser.parse_args()
    families = _families(args.families)
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="sspipes"))
    rows = []
    for family in families:
        path = work / family
        _build(family, work).save_pretrained(path)
        model = load_model(f"diffusers:{path}", **SIZE.get(family, {}))
        row = {"family": family, "denoiser": model.info.extra["denoiser_class"]}
        if args.note:
            row["note"] = args.note
        parts = ((equivalence, (family, model, path)), (hook_overhead, (model, args.rounds)), (macs, (model,)),
                 (quick_study, (family, model, work)))
        for part, part_args in parts:
            try:
                row |= part(*part_args)
            except Exception as exc:  # a family that fails a part is reported, not hidden
                row.setdefault("errors", []).append(f"{type(exc).__name__}: {exc}")
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    out = {"steps": STEPS, "dtype": "float32", "rows": _merged(rows, args.families is not None)}
    text = json.dumps(out, indent=1)
    print(text)
    RESULTS.write_text(text + "\n")


if __name__ == "__main__":
    main()
