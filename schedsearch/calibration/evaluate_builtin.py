"""Quality figures of the builtin models, with the floors that make them readable.

    python -m schedsearch.calibration.evaluate_builtin [--model builtin:mnist-flow] [--n 1000] [--steps 50]
                                                       [--guidance 2.0] [--seed 0] [--write-manifest]

N class-balanced samples (label i % 10, seed seed + i) are drawn with the model's default plan (the DiT:
DPM-Solver++(2M); the flow model: its pipeline's FlowMatch Euler) and scored in the builtin
classifier's feature space against the 1,000 held-out real digits. A Fréchet distance means little alone, so the
floor is reported too: the distance between two disjoint, class-stratified halves of the real held-out set, next to
the generated-vs-real distance at the same sizes (generated half vs the same real half). Samples are scored batch by
batch, so memory does not grow with N.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np
import torch

from schedsearch.calibration.manifest import merge_into_manifest, sha256_file
from schedsearch.calibration.mnist_data import SPLIT_SEED, load_split
from schedsearch.objectives.clip_score import class_alignment
from schedsearch.objectives.fid import FeatureStats, FeatureStatsAccumulator, builtin_features, stats_distance
from schedsearch.runtime import builtin
from schedsearch.runtime.models import BUILTIN_MNIST_DIT, BUILTIN_MNIST_FLOW, initial_noise, load_model
from schedsearch.runtime.sampler import sample

MAX_BATCH = 125
HALVES_SEED = SPLIT_SEED + 1  # fixed: the real halves must not change with the sampling seed
MANIFEST_KEY = "evaluation"


def stratified_halves(labels: np.ndarray, seed: int = HALVES_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint index sets (a, b) splitting every class in two (a gets the smaller half of an odd class)."""
    rng = np.random.default_rng(seed)
    half_a, half_b = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        half_a.append(idx[: len(idx) // 2])
        half_b.append(idx[len(idx) // 2 :])
    return np.sort(np.concatenate(half_a)), np.sort(np.concatenate(half_b))


def evaluate(
    n: int = 1000,
    steps: int = 50,
    guidance: float | None = None,
    seed: int = 0,
    batch_size: int = MAX_BATCH,
    progress: bool = True,
    model_name: str = BUILTIN_MNIST_DIT,
) -> dict[str, Any]:
    """Generate n samples and return the figures (accuracies in [0, 1], Fréchet distances ≥ 0) as a JSON-able dict.
    `guidance` None is the model's default."""
    if n < 4:
        raise ValueError(f"n: need at least 4 samples (two per half for a covariance), got {n}")
    batch_size = max(1, min(batch_size, MAX_BATCH))
    started = time.perf_counter()
    model = load_model(model_name)
    guidance = model.info.guidance_default if guidance is None else guidance
    classifier = builtin.load_builtin_classifier()
    split = load_split()
    plan = model.default_plan(steps)
    solver = "dpm-solver++(2M)" if model.scheduler is None else type(model.scheduler).__name__
    weights = _weights_path(model_name)

    real_features = builtin_features(split.heldout_images, classifier)
    real_a, real_b = stratified_halves(split.heldout_labels)
    real_all = FeatureStats.from_features(real_features)
    real_half_a = FeatureStats.from_features(real_features[real_a])
    real_half_b = FeatureStats.from_features(real_features[real_b])
    real_alignment = class_alignment(split.heldout_images, split.heldout_labels, classifier)

    n_half = n // 2  # the first n // 2 samples: class-balanced like the whole set when n // 2 is a multiple of 10
    gen_all, gen_half = FeatureStatsAccumulator(), FeatureStatsAccumulator()
    prob_sum = correct = 0.0
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="evaluate builtin", unit="batch")
    for start in starts:
        index = np.arange(start, min(start + batch_size, n))
        labels = index % builtin.NUM_CLASSES
        x_start = initial_noise((seed + index).tolist(), model.info.sample_shape)
        out = sample(model.denoiser(labels, guidance), x_start, plan, model.noise_schedule, model.info.prediction_type)
        images = model.decode(out)
        features = builtin_features(images, classifier)
        gen_all.update(features)
        gen_half.update(features[index < n_half])
        scores = class_alignment(images, labels, classifier)
        prob_sum += scores["class_probability"] * len(index)
        correct += scores["accuracy"] * len(index)

    generated_all, generated_half = gen_all.result(), gen_half.result()
    return {
        "model": model_name,
        "solver": solver,
        "steps": steps,
        "guidance": guidance,
        "seed": seed,
        "n_generated": n,
        "n_real": real_all.count,
        "n_half": [generated_half.count, real_half_a.count, real_half_b.count],
        "feature_space": f"builtin MnistClassifier penultimate ({classifier.feature_dim}-d)",
        "generated_accuracy": correct / n,
        "generated_class_probability": prob_sum / n,
        "real_heldout_accuracy": real_alignment["accuracy"],
        "fd_generated_vs_real": stats_distance(generated_all, real_all),
        "fd_generated_half_vs_real_half": stats_distance(generated_half, real_half_b),
        "fd_real_half_vs_real_half": stats_distance(real_half_a, real_half_b),
        ("dit_sha256" if model_name == BUILTIN_MNIST_DIT else "weights_sha256"): sha256_file(weights),
        "classifier_sha256": sha256_file(builtin.ASSETS_DIR / builtin.CLASSIFIER_WEIGHTS),
        "data_sha256": split.data_sha256,
        "torch": torch.__version__,
        "wall_time_s": round(time.perf_counter() - started, 2),
    }


def _weights_path(model_name: str) -> Any:
    from schedsearch.runtime.builtin_flow import FLOW_WEIGHTS

    return builtin.ASSETS_DIR / (FLOW_WEIGHTS if model_name == BUILTIN_MNIST_FLOW else builtin.DIT_WEIGHTS)


def manifest_path(model_name: str) -> Any:
    from schedsearch.calibration.train_flow import MANIFEST as FLOW_MANIFEST

    return builtin.ASSETS_DIR / (FLOW_MANIFEST if model_name == BUILTIN_MNIST_FLOW else builtin.MANIFEST)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=BUILTIN_MNIST_DIT, choices=[BUILTIN_MNIST_DIT, BUILTIN_MNIST_FLOW],
                        help="which builtin model")
    parser.add_argument("--n", type=int, default=1000, help="generated samples (class-balanced)")
    parser.add_argument("--steps", type=int, default=50, help="steps of the model's default plan")
    parser.add_argument("--guidance", type=float, default=None, help="default: the model's")
    parser.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    parser.add_argument("--batch-size", type=int, default=MAX_BATCH, help=f"at most {MAX_BATCH}")
    parser.add_argument("--write-manifest", action="store_true", help="merge into the model's manifest in assets/")
    args = parser.parse_args(argv)
    figures = evaluate(args.n, args.steps, args.guidance, args.seed, batch_size=args.batch_size,
                       model_name=args.model)
    print(json.dumps(figures, indent=2))
    if args.write_manifest:
        path = manifest_path(args.model)
        merge_into_manifest(path, MANIFEST_KEY, figures)
        print(f"wrote {MANIFEST_KEY!r} into {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
