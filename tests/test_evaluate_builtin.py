import json

import numpy as np

from schedsearch.calibration.evaluate_builtin import evaluate, merge_into_manifest, stratified_halves


def test_evaluate_tiny_has_the_figures():
    # Quality is not asserted: the shipped weights may be from a model still in training.
    figures = evaluate(n=20, steps=3, guidance=2.0, seed=0, batch_size=8, progress=False)
    for key in ("generated_accuracy", "generated_class_probability", "real_heldout_accuracy"):
        assert isinstance(figures[key], float) and 0.0 <= figures[key] <= 1.0, key
    for key in ("fd_generated_vs_real", "fd_generated_half_vs_real_half", "fd_real_half_vs_real_half"):
        assert isinstance(figures[key], float) and np.isfinite(figures[key]) and figures[key] >= 0.0, key
    assert figures["n_generated"] == 20 and figures["n_real"] == 1000
    assert figures["n_half"] == [10, 500, 500]
    assert figures["steps"] == 3 and figures["guidance"] == 2.0
    json.dumps(figures)  # JSON-able as printed / written to the manifest


def test_stratified_halves_are_disjoint_and_balanced():
    labels = np.repeat(np.arange(10), 100)
    a, b = stratified_halves(labels)
    assert len(a) == len(b) == 500 and not set(a) & set(b)
    assert np.bincount(labels[a]).tolist() == [50] * 10
    np.testing.assert_array_equal(stratified_halves(labels)[0], a)  # fixed split


def test_merge_into_manifest_keeps_other_keys(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"dit": {"sha256": "abc"}, "evaluation": {"old": 1}}))
    merge_into_manifest(path, "evaluation", {"generated_accuracy": 0.9})
    assert json.loads(path.read_text()) == {"dit": {"sha256": "abc"}, "evaluation": {"generated_accuracy": 0.9}}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    merge_into_manifest(tmp_path / "new.json", "evaluation", {"x": 1})
    assert json.loads((tmp_path / "new.json").read_text()) == {"evaluation": {"x": 1}}
