"""Tests for metrics.py: HEAR's scene scores against sklearn and scipy, event scores against
sed_eval 0.2.1 itself, the median filter against scipy, Student-t confidence intervals and
the overall score s(m). Pure numpy in, numbers out: no model, no audio."""
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sed_eval
from dcase_util.containers import MetaDataContainer
from scipy import ndimage, stats
from sklearn import metrics as sklearn_metrics

import metrics

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(module: str) -> set[str]:
    """The modules a fresh Python process holds after `import module`."""
    code = f"import sys, {module}; print(' '.join(sys.modules))"
    return set(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.split())


def test_metrics_imports_nothing_of_the_project():
    """Scores are functions of arrays: no model, no torch, no other module of this project."""
    project = {path.stem for path in ROOT.glob("*.py")} - {"metrics"}
    loaded = imported_modules("metrics")
    assert not loaded & project and "torch" not in loaded


# ----------------------------------------------------------------------------- scene scores

def test_scores_match_sklearn():
    rng = np.random.default_rng(0)
    targets = (rng.random((60, 5)) < 0.3).astype(np.float32)
    targets[:, 4] = 0  # a class without positives: AP 0, as sklearn gives
    probs = np.round(rng.random((60, 5)), 1)  # many ties
    with pytest.warns(UserWarning):
        expected = sklearn_metrics.average_precision_score(targets, probs, average="macro")
    assert metrics.mean_average_precision(probs, targets) == pytest.approx(expected, abs=1e-9)
    for c in range(4):
        assert metrics.roc_auc(probs[:, c], targets[:, c]) == pytest.approx(
            sklearn_metrics.roc_auc_score(targets[:, c], probs[:, c]), abs=1e-12)
    assert math.isnan(metrics.aucroc(probs, targets))  # a class without positives
    assert metrics.aucroc(probs[:, :4], targets[:, :4]) == pytest.approx(
        sklearn_metrics.roc_auc_score(targets[:, :4], probs[:, :4], average="macro"), abs=1e-12)


def test_d_prime_matches_scipy():
    rng = np.random.default_rng(1)
    targets = (rng.random((80, 3)) < 0.5).astype(np.float32)
    probs = rng.random((80, 3)) + 0.3 * targets
    aucs = [metrics.roc_auc(probs[:, c], targets[:, c]) for c in range(3)]
    expected = np.mean(stats.norm().ppf(aucs) * np.sqrt(2))
    assert metrics.d_prime(probs, targets) == pytest.approx(expected, abs=1e-9)


def test_top1_and_chroma_accuracy():
    targets = np.eye(24, dtype=np.float32)[[0, 1, 2, 13]]
    probs = np.eye(24)[[0, 1, 14, 0]]  # right, right, octave error, wrong
    assert metrics.top1_accuracy(probs, targets) == 0.5
    assert metrics.chroma_accuracy(probs, targets) == 0.75


# ----------------------------------------------------------------------------- statistics

def test_t_quantiles():
    assert metrics.t_quantile(0.95, 1) == pytest.approx(12.7062, abs=1e-4)
    assert metrics.t_quantile(0.95, 9) == pytest.approx(2.2622, abs=1e-4)
    for df in range(1, 41):
        assert metrics.t_quantile(0.95, df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-9)
        assert metrics.t_quantile(0.99, df) == pytest.approx(stats.t.ppf(0.995, df), abs=1e-8)


def test_mean_ci():
    mean, half = metrics.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302653 / math.sqrt(3), abs=1e-6)
    mean, half = metrics.mean_ci([0.5])
    assert mean == 0.5 and math.isnan(half)


def test_overall_score():
    scores = {"a": {"t1": 0.9, "t2": 0.5, "t3": 0.7}, "b": {"t1": 0.7, "t2": 0.6, "t3": 0.7},
              "c": {"t1": 0.8, "t2": 0.4, "t3": 0.7, "t4": 1.0}}
    s = metrics.overall_scores(scores)  # t3 ties everywhere, t4 is not shared: both left out
    assert s["a"] == pytest.approx((100 + 50) / 2)
    assert s["b"] == pytest.approx((0 + 100) / 2)
    assert s["c"] == pytest.approx((50 + 0) / 2)
    assert math.isnan(metrics.overall_scores({"a": {"t1": 0.9}})["a"])


# ----------------------------------------------------------------------------- event scores

def test_median_filter_matches_scipy():
    rng = np.random.default_rng(0)
    for frames in (1, 2, 3, 5, 8, 40):
        x = rng.random((frames, 3))
        for width in (1, 2, 3, 6, 7, 12):
            np.testing.assert_array_equal(metrics.median_filter(x, width),
                                          ndimage.median_filter(x, size=(width, 1)), err_msg=f"{frames} {width}")


def test_frames_to_events():
    stamps = np.arange(10) * 40.0 + 15  # 15, 55, ... ms
    probs = np.zeros((10, 2))
    probs[2:6, 0] = 0.9  # a 4-frame run: 95..215 ms, 120 ms long
    probs[8, 0] = 0.9  # a lone frame: 0 ms long
    probs[1:9, 1] = [0.9, 0.9, 0.2, 0.9, 0.9, 0.9, 0.9, 0.9]  # one dip
    events = metrics.frames_to_events(probs, stamps, ["a", "b"], median_filter_ms=0, min_duration=100)
    # b's first run (55-95 ms, 40 ms) and a's lone frame are shorter than 100 ms
    assert events == [{"label": "a", "start": 95.0, "end": 215.0}, {"label": "b", "start": 175.0, "end": 335.0}]
    smoothed = metrics.frames_to_events(probs, stamps, ["a", "b"], median_filter_ms=120, min_duration=0)
    assert {"label": "b", "start": 55.0, "end": 335.0} in smoothed  # the median of 3 fills the dip
    assert not any(e["label"] == "a" and e["start"] == e["end"] for e in smoothed)  # and drops the lone frame


def random_events(rng, n, labels, length_s=10.0):
    events = []
    for _ in range(n):
        start = rng.uniform(0, length_s - 0.2)
        events.append({"label": str(rng.choice(labels)), "start": round(start * 1000, 1),
                       "end": round((start + rng.uniform(0.05, 2.0)) * 1000, 1)})
    return events


def test_event_scores_match_sed_eval():
    """Our event F-measures and segment error rate against sed_eval 0.2.1 itself, called the
    way hear-eval-kit calls it (one evaluate() per file, overall metrics)."""
    rng = np.random.default_rng(0)
    labels = ["a", "b", "c"]
    for trial in range(20):
        refs = [random_events(rng, int(rng.integers(1, 8)), labels) for _ in range(4)]
        # estimates: jittered copies of some references, plus false alarms (a file may get none)
        ests = []
        for ref in refs:
            est = [{**e, "start": e["start"] + rng.normal(0, 150), "end": e["end"] + rng.normal(0, 300)}
                   for e in ref if rng.random() < 0.7]
            est = [e for e in est if e["end"] > e["start"] > 0] + random_events(rng, int(rng.integers(0, 3)), labels)
            ests.append([] if trial % 7 == 3 else est)

        def container(files):
            return MetaDataContainer([{"event_label": e["label"], "event_onset": e["start"] / 1000.0,
                                       "event_offset": e["end"] / 1000.0, "file": f"f{i}"}
                                      for i, events in enumerate(files) for e in events])

        for name, score in metrics.EVENT_SCORES.items():
            if score.kind == "event":
                metric = sed_eval.sound_event.EventBasedMetrics(
                    event_label_list=labels, evaluate_onset=True, evaluate_offset=score.evaluate_offset,
                    t_collar=score.t_collar, percentage_of_length=score.percentage_of_length)
            else:
                metric = sed_eval.sound_event.SegmentBasedMetrics(event_label_list=labels,
                                                                 time_resolution=score.time_resolution)
            reference, estimated = container(refs), container(ests)
            for i in range(len(refs)):
                metric.evaluate(reference_event_list=reference.filter(filename=f"f{i}"),
                                estimated_event_list=estimated.filter(filename=f"f{i}"))
            overall = metric.results_overall_metrics()
            expected = overall["f_measure"]["f_measure"] if score.kind == "event" else overall["error_rate"]["error_rate"]
            ours = metrics.event_score(name, refs, ests, labels)
            if math.isnan(expected):
                assert math.isnan(ours), (trial, name)
            else:
                assert ours == pytest.approx(expected, abs=1e-12), (trial, name)


def test_matching_is_maximum():
    """A greedy first-come matching would give 1 here; the maximum is 2."""
    hits = np.array([[True, True], [True, False]])
    assert metrics.matching_size(hits) == 2
    assert metrics.matching_size(np.zeros((3, 0), bool)) == 0
