import numpy as np
import pytest

from schedsearch.objectives.fid import (
    FeatureStats,
    FeatureStatsAccumulator,
    builtin_features,
    frechet_distance,
    stats_distance,
)


def _random_cov(rng: np.random.Generator, dim: int) -> np.ndarray:
    a = rng.normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def _eig_frechet(mu1, cov1, mu2, cov2) -> float:
    """Independent route: Tr((C1 C2)^½) = Tr((√C1 C2 √C1)^½), a symmetric PSD matrix, via eigh only."""
    w, v = np.linalg.eigh(cov1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ cov2 @ root1)
    return float(
        np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None)))
    )


def test_distance_to_itself_is_zero():
    rng = np.random.default_rng(0)
    mu, cov = rng.normal(size=16), _random_cov(rng, 16)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-8)


def test_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    var1, var2 = rng.uniform(0.1, 3.0, size=8), rng.uniform(0.1, 3.0, size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-10)


def test_one_dimensional_scalars():
    # 1-d Gaussians: (m1 - m2)² + (s1 - s2)²
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-1.0]), np.array([[9.0]])) == pytest.approx(
        4.0 + 1.0
    )


def test_symmetric_and_matches_independent_computation():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    cov1, cov2 = _random_cov(rng, 12), _random_cov(rng, 12)
    d12, d21 = frechet_distance(mu1, cov1, mu2, cov2), frechet_distance(mu2, cov2, mu1, cov1)
    assert d12 == pytest.approx(d21, rel=1e-9)
    assert d12 == pytest.approx(_eig_frechet(mu1, cov1, mu2, cov2), rel=1e-9)


def test_rank_deficient_covariances_stay_finite():
    # fewer samples than dimensions: singular covariances, as in a tiny evaluation
    rng = np.random.default_rng(3)
    a, b = FeatureStats.from_features(rng.normal(size=(6, 32))), FeatureStats.from_features(rng.normal(size=(6, 32)))
    d = stats_distance(a, b)
    assert np.isfinite(d) and d >= 0
    assert d == pytest.approx(_eig_frechet(a.mean, a.cov, b.mean, b.cov), rel=1e-4)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


@pytest.mark.parametrize("splits", [[200], [1, 199], [7, 50, 3, 140], [100, 0, 100]])
def test_accumulator_matches_numpy_whatever_the_batches(splits):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(200, 5)) * [1, 2, 3, 4, 5] + 1000.0  # a large offset exposes naive cancellation
    acc = FeatureStatsAccumulator()
    for chunk in np.split(x, np.cumsum(splits)[:-1]):
        acc.update(chunk)
    stats = acc.result()
    assert stats.count == 200
    np.testing.assert_allclose(stats.mean, np.mean(x, axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False, ddof=1), rtol=1e-9, atol=1e-9)


def test_accumulator_accepts_torch_and_rejects_too_few():
    torch = pytest.importorskip("torch")
    acc = FeatureStatsAccumulator()
    acc.update(torch.ones(1, 3))
    with pytest.raises(ValueError, match="at least 2"):
        acc.result()
    acc.update(torch.zeros(1, 3))
    np.testing.assert_allclose(acc.result().mean, [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="dim"):
        acc.update(np.zeros((2, 4)))


def test_stats_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    stats = FeatureStats.from_features(rng.normal(size=(50, 7)))
    path = stats.save(tmp_path / "ref" / "stats.npz")
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    loaded = FeatureStats.load(path)
    assert loaded.count == stats.count
    np.testing.assert_array_equal(loaded.mean, stats.mean)
    np.testing.assert_array_equal(loaded.cov, stats.cov)
    assert loaded.mean.dtype == np.float64 and loaded.cov.dtype == np.float64
    assert stats_distance(stats, loaded) == pytest.approx(0.0, abs=1e-8)


def test_load_rejects_other_npz(tmp_path):
    np.savez(tmp_path / "other.npz", mean=np.zeros(2))
    with pytest.raises(ValueError, match="feature-stats"):
        FeatureStats.load(tmp_path / "other.npz")


def test_stats_are_immutable():
    stats = FeatureStats.from_features(np.eye(3))
    with pytest.raises(ValueError):
        stats.mean[0] = 1.0


def test_builtin_features_shape_and_batch_independence():
    from schedsearch.calibration.mnist_data import load_split
    from schedsearch.runtime.builtin import load_builtin_classifier

    classifier = load_builtin_classifier()
    images = load_split().heldout_images[:40]
    whole = builtin_features(images, classifier)
    batched = builtin_features(images, classifier, batch_size=7)
    assert whole.shape == (40, classifier.feature_dim) and whole.dtype == np.float64
    np.testing.assert_allclose(whole, batched, rtol=1e-4, atol=1e-4)  # float32 kernels vary by batch


def test_leave_one_out_distances_equal_brute_force():
    from schedsearch.objectives.fid import leave_one_out_distances

    rng = np.random.default_rng(3)
    ref = FeatureStats(rng.normal(size=6), _random_cov(rng, 6), 500)
    x = rng.normal(loc=0.3, size=(40, 6))
    expected = [stats_distance(FeatureStats.from_features(np.delete(x, i, axis=0)), ref) for i in range(len(x))]
    np.testing.assert_allclose(leave_one_out_distances(x, ref), expected, rtol=1e-8, atol=1e-10)


def test_frechet_interval_matches_the_spread_over_seeds():
    """The jackknife interval's half-width / 1.96 against the standard deviation of the distance over 40 independent
    draws of the same distribution (what "another set of seeds" would give); the bootstrap would sit above the
    estimate (see `frechet_interval`)."""
    from schedsearch.objectives.fid import Z95, frechet_interval

    rng = np.random.default_rng(0)
    ref = FeatureStats.from_features(rng.normal(size=(5000, 16)))
    draws = [np.random.default_rng(s).normal(loc=0.2, size=(300, 16)) for s in range(1, 41)]
    values = [stats_distance(FeatureStats.from_features(d), ref) for d in draws]
    spread = float(np.std(values, ddof=1))
    low, high = frechet_interval(draws[0], ref)
    assert low <= values[0] <= high
    assert 0.7 < (high - low) / (2 * Z95) / spread < 1.4
    identical = np.tile(rng.normal(size=(1, 16)), (50, 1)) + rng.normal(size=(50, 16)) * 1e-3
    assert frechet_interval(identical, ref)[0] >= 0.0  # clamped like the distance itself
