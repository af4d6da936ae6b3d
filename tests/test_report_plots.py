"""Plots and the correlation table from plain arrays (pipeline/report.py), and
``write_plots`` drawing a run's results through them."""

import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from scipy import stats  # noqa: E402

import tasksurrogate_jax as ts  # noqa: E402
from tasksurrogate_jax.pipeline import report  # noqa: E402

RNG = np.random.default_rng(0)
K, M = 6, 9
NAMES = [f"task-{i}" for i in range(K)]
TRUE = RNG.normal(size=K)
PREDICTED = {"kernel": TRUE + 0.3 * RNG.normal(size=K), "influence": RNG.normal(size=K),
             "trak": -TRUE}
HELD_TRUE = RNG.normal(size=M) + 2.0
HELD = {"linear": HELD_TRUE + 0.5 * RNG.normal(size=M),
        "kernel": HELD_TRUE + 0.1 * RNG.normal(size=M)}
INTER = RNG.normal(size=(K, K))
INTER = INTER + INTER.T


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def _rho(x, y):
    return stats.spearmanr(x, y).statistic


def test_loo_effects_panels_hold_each_methods_points_and_names():
    fig = ts.plot_loo_effects(TRUE, PREDICTED, task_names=NAMES, title="LOO")
    assert fig._suptitle.get_text() == "LOO"
    panels = [ax for ax in fig.axes if ax.axison]
    assert len(panels) == len(PREDICTED)
    for ax, (method, values) in zip(panels, PREDICTED.items(), strict=True):
        (points,) = ax.collections
        np.testing.assert_allclose(points.get_offsets(),
                                   np.column_stack([TRUE, values]))
        assert ax.get_title() == f"{method}\nSpearman {_rho(TRUE, values):.2f}"
        labels = [t for t in ax.texts if isinstance(t, matplotlib.text.Annotation)]
        assert [t.get_text() for t in labels] == [str(i) for i in range(K)]
        np.testing.assert_allclose([t.xy for t in labels],
                                   np.column_stack([TRUE, values]))
    # The key of the indices, under the panels.
    (key,) = [t for t in fig.texts if t is not fig._suptitle]
    assert key.get_text().replace("\n", " ").split("   ") == [
        f"{i}: {name}" for i, name in enumerate(NAMES)]
    # Labels of coincident points are stacked apart, others left in place.
    fig = ts.plot_loo_effects([0.0, 0.0, 1.0], {"m": [0.0, 0.0, 1.0]},
                              task_names=["a", "b", "c"])
    offsets = [t.xyann for t in fig.axes[0].texts]
    assert offsets[0] != offsets[1] and offsets[0] == offsets[2]
    # No names: no labels; no title: none.
    fig = ts.plot_loo_effects(list(TRUE), {"kernel": list(PREDICTED["kernel"])})
    (ax,) = fig.axes
    assert not ax.texts and fig._suptitle is None


def test_interactions_heatmap_is_the_matrix_on_a_symmetric_scale():
    fig = ts.plot_interactions(INTER, task_names=NAMES, title="interactions")
    ax = fig.axes[0]
    (image,) = ax.images
    np.testing.assert_array_equal(image.get_array(), INTER)
    bound = np.abs(INTER).max()
    assert image.get_clim() == (-bound, bound)
    assert [t.get_text() for t in ax.get_xticklabels()] == NAMES
    assert [t.get_text() for t in ax.get_yticklabels()] == NAMES
    np.testing.assert_array_equal(ax.get_xticks(), np.arange(K))
    assert fig._suptitle.get_text() == "interactions"
    # Beside a truth: two panels on one colour scale, the larger bound.
    truth = 3 * INTER
    fig = ts.plot_interactions(INTER, truth=truth, task_names=NAMES)
    images = [ax.images[0] for ax in fig.axes if ax.images]
    np.testing.assert_array_equal(images[1].get_array(), truth)
    assert images[0].get_clim() == images[1].get_clim() == (
        -np.abs(truth).max(), np.abs(truth).max())
    assert [ax.get_title() for ax in fig.axes if ax.images] == [
        "surrogate", "ground truth"]
    with pytest.raises(ValueError, match="truth must have matrix's shape"):
        ts.plot_interactions(INTER, truth=np.zeros((2, 2)))
    # Default labels are the task indices; an all-zero matrix keeps a scale.
    fig = ts.plot_interactions(np.zeros((3, 3)))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2"]
    assert ax.images[0].get_clim() == (-1.0, 1.0)


def test_heldout_overlays_methods_with_their_correlation_and_the_diagonal():
    fig = ts.plot_heldout(HELD_TRUE, HELD, title="held out")
    (ax,) = fig.axes
    assert ax.get_title() == "held out"
    assert len(ax.collections) == len(HELD)
    for points, values in zip(ax.collections, HELD.values(), strict=True):
        np.testing.assert_allclose(points.get_offsets(),
                                   np.column_stack([HELD_TRUE, values]))
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [f"{m} (Spearman {_rho(HELD_TRUE, v):.2f})"
                      for m, v in HELD.items()] + ["y = x"]
    (diagonal,) = ax.lines
    everything = np.concatenate([HELD_TRUE, *HELD.values()])
    np.testing.assert_allclose(diagonal.get_xdata(),
                               [everything.min(), everything.max()])
    np.testing.assert_allclose(diagonal.get_ydata(), diagonal.get_xdata())


def test_correlation_table_matches_scipy():
    table = ts.format_correlation_table(TRUE, PREDICTED)
    lines = table.splitlines()
    assert lines[0] == "| method | Spearman | Pearson |"
    assert lines[1] == "| --- | --- | --- |"
    for line, (method, values) in zip(lines[2:], PREDICTED.items(), strict=True):
        pearson = stats.pearsonr(TRUE, values).statistic
        assert line == f"| {method} | {_rho(TRUE, values):.3f} | {pearson:.3f} |"
    constant = ts.format_correlation_table([1.0, 2.0, 3.0], {"flat": [1.0, 1.0, 1.0]})
    assert constant.splitlines()[-1] == "| flat | nan | nan |"


@pytest.mark.parametrize("call, error, match", [
    (lambda: ts.plot_loo_effects(TRUE, {"a": TRUE, "b": TRUE[:-1]}), ValueError,
     r"predicted\['b'\] has 5 entries, expected 6 \(the length of true_effects\)"),
    (lambda: ts.plot_loo_effects(np.r_[TRUE[:-1], np.nan], PREDICTED), ValueError,
     r"true_effects must be finite, got 1 non-finite entries \(first: nan at "
     r"index 5\)"),
    (lambda: ts.plot_loo_effects(TRUE, {"a": np.r_[np.inf, TRUE[1:]]}), ValueError,
     r"predicted\['a'\] must be finite"),
    (lambda: ts.plot_loo_effects(TRUE, {}), ValueError,
     "predicted must name at least one method, got an empty mapping"),
    (lambda: ts.plot_loo_effects(TRUE, TRUE), TypeError,
     r"predicted must be a mapping \{method name: values\}, got ndarray"),
    (lambda: ts.plot_loo_effects(TRUE, PREDICTED, task_names=NAMES[:-1]), ValueError,
     r"task_names has 5 names, expected 6 \(one per task of true_effects\)"),
    (lambda: ts.plot_loo_effects(TRUE, PREDICTED, task_names="abcdef"), TypeError,
     "task_names must be a sequence of names, got a single string"),
    (lambda: ts.plot_loo_effects(TRUE[:1], {"a": TRUE[:1]}), ValueError,
     "true_effects must have at least 2 entries, got 1"),
    (lambda: ts.plot_loo_effects(INTER, PREDICTED), ValueError,
     r"true_effects must be 1-D, got shape \(6, 6\)"),
    (lambda: ts.plot_interactions(INTER[:, :-1]), ValueError,
     r"matrix must be square \[K, K\] with K >= 1, got shape \(6, 5\)"),
    (lambda: ts.plot_interactions(np.where(np.eye(K) > 0, np.nan, INTER)), ValueError,
     "matrix must be finite, got 6 non-finite entries"),
    (lambda: ts.plot_interactions(INTER, task_names=NAMES + ["extra"]), ValueError,
     r"task_names has 7 names, expected 6 \(one per task of matrix\)"),
    (lambda: ts.plot_heldout(HELD_TRUE, {"kernel": HELD_TRUE[:3]}), ValueError,
     r"predicted\['kernel'\] has 3 entries, expected 9 \(the length of true\)"),
    (lambda: ts.plot_heldout(HELD_TRUE, {}), ValueError,
     "predicted must name at least one method"),
    (lambda: ts.plot_heldout([1.0, None, 3.0], {"a": [1.0, 2.0, 3.0]}), ValueError,
     "true must be finite"),
    (lambda: ts.format_correlation_table(TRUE, {"a": TRUE[:2]}), ValueError,
     r"predicted\['a'\] has 2 entries, expected 6"),
    (lambda: ts.format_correlation_table("abc", PREDICTED), TypeError,
     "true must be a 1-D numeric array, got str"),
])
def test_bad_input_raises_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()
    assert not plt.get_fignums()  # checked before any figure is made


def test_write_plots_draws_a_runs_mean_target_arrays_through_the_plot_functions(
        tmp_path, monkeypatch):
    results = {
        "task_names": NAMES,
        "true_effects": TRUE,
        "methods": {name: {"effects": values, "loo_spearman": 0.5}
                    for name, values in PREDICTED.items()},
        "interaction_matrix": INTER,
        # A pair-removal truth of two of the pairs (the others drawn as 0).
        "interactions": {"pairs": [[0, 1], [2, 5]], "true": [0.5, -0.25]},
        "heldout": {"true": HELD_TRUE, "predicted": HELD},
    }
    # As read back from results.json: lists, not arrays.
    results = json.loads(json.dumps(report._jsonable(results)))
    calls = {}

    def recording(name):
        original = getattr(report, name)

        def wrapper(*args, **kwargs):
            calls[name] = (args, kwargs)
            return original(*args, **kwargs)
        return wrapper

    for name in ("plot_loo_effects", "plot_interactions", "plot_heldout"):
        monkeypatch.setattr(report, name, recording(name))
    paths = report.write_plots(results, tmp_path / "plots")

    assert [p.name for p in paths] == ["loo_effects.png", "interactions.png",
                                       "heldout.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.get_fignums()  # every figure closed after saving
    args, kwargs = calls["plot_loo_effects"]
    np.testing.assert_allclose(args[0], TRUE)
    assert list(args[1]) == list(PREDICTED)
    for name, values in PREDICTED.items():
        np.testing.assert_allclose(args[1][name], values)
    assert kwargs["task_names"] == NAMES
    args, kwargs = calls["plot_interactions"]
    np.testing.assert_allclose(args[0], INTER)
    assert kwargs["task_names"] == NAMES
    expected = np.zeros((K, K))
    expected[0, 1] = expected[1, 0] = 0.5
    expected[2, 5] = expected[5, 2] = -0.25
    np.testing.assert_array_equal(kwargs["truth"], expected)
    args, _ = calls["plot_heldout"]
    np.testing.assert_allclose(args[0], HELD_TRUE)
    assert {k: list(v) for k, v in args[1].items()} == {
        k: list(v) for k, v in HELD.items()}
