"""The scores of HEAR's downstream evaluation, in plain numpy: what a probe's predictions
are worth, and how models compare.

HEAR (Turian et al., 2022) trains a small probe on frozen embeddings of each task and reports
the task's primary score on the test split; hear-eval-kit (github.com/hearbenchmark/hear-eval-kit,
heareval/score.py) defines the scores. They are reimplemented here so that each can be read
in a few lines and tested against the library it comes from (tests/test_metrics.py).

Scene scores (one prediction per clip; `probs` and multi-hot `targets` are (clips, labels)):
- top1_acc, pitch_acc: accuracy of the most probable label (hear-eval-kit's Top1Accuracy);
- chroma_acc: the same with labels as semitones, octave errors forgiven (ChromaAccuracy);
- mAP: macro mean average precision, as sklearn.metrics.average_precision_score;
- aucroc: macro area under the ROC curve, as sklearn.metrics.roc_auc_score;
- d_prime: mean over labels of sqrt(2) * Phi^-1(AUC), as hear-eval-kit computes it with
  scipy.stats.norm.ppf.

Event scores (sound event detection, e.g. DCASE 2016 task 2 and MAESTRO): the probe scores
40-ms frames; frames_to_events turns one file's frame probabilities into events as
hear-eval-kit's postprocessing does (median filter, threshold 0.5, runs of active frames,
short runs dropped; the grid POSTPROCESSING_GRID is searched on validation). Events are
scored with sed_eval's overall (micro-averaged over files) metrics (github.com/TUT-ARG/sed_eval
0.2.1, called as hear-eval-kit calls it): F-measure with optimal one-to-one matching of
same-label events within an onset collar (and an offset collar when asked), and the error
rate (S + D + I) / N on 1-s segments. Times are ms in events, seconds inside the scores.

Statistics: mean_ci gives a mean over probe seeds with its 95% Student-t confidence interval
(the t quantile by Abramowitz & Stegun 26.7.3-4, no scipy needed); overall_scores gives the
normalised overall score s(m) of the MW-MAE paper (Yadav, Theodoridis, Hansen, Tan; ICLR 2024):
    s(m) = mean over tasks t of (x_t(m) - min_t) / (max_t - min_t) * 100,
x_t the mean primary score, min and max over the compared models (tasks where every model
scores the same carry no information and are left out).

This module imports nothing of the project: scores are functions of arrays and event lists.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np

# ----------------------------------------------------------------------------- scene scores

def top1_accuracy(probs: np.ndarray, targets: np.ndarray) -> float:
    return float(np.mean(probs.argmax(1) == targets.argmax(1)))


def chroma_accuracy(probs: np.ndarray, targets: np.ndarray) -> float:
    """Pitch accuracy ignoring the octave (classes are semitones)."""
    return float(np.mean(probs.argmax(1) % 12 == targets.argmax(1) % 12))


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """AP = sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds, highest first
    (sklearn's average_precision_score); 0 for a class without positives."""
    order = np.argsort(-scores, kind="mergesort")
    scores, positive = scores[order], positive[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # last index of each threshold
    true_pos = np.cumsum(positive)[last]
    if true_pos[-1] == 0:
        return 0.0
    precision, recall = true_pos / (last + 1), true_pos / true_pos[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def mean_average_precision(probs: np.ndarray, targets: np.ndarray) -> float:
    """Macro mAP: every class counts the same."""
    return float(np.mean([average_precision(probs[:, c], targets[:, c]) for c in range(targets.shape[1])]))


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a positive > score of a negative), ties
    counting half (the Mann-Whitney statistic with average ranks)."""
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores))
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2  # average 1-based rank of a tie group
    n_pos = positive.sum()
    n_neg = len(scores) - n_pos
    return float((ranks[positive > 0].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _class_aucs(probs: np.ndarray, targets: np.ndarray) -> np.ndarray | None:
    """Per-class AUCs, or None when a class lacks positives or negatives (hear-eval-kit
    scores such a split as NaN)."""
    counts = targets.sum(0)
    if np.any(counts == 0) or np.any(counts == len(targets)):
        return None
    return np.array([roc_auc(probs[:, c], targets[:, c]) for c in range(targets.shape[1])])


def aucroc(probs: np.ndarray, targets: np.ndarray) -> float:
    aucs = _class_aucs(probs, targets)
    return math.nan if aucs is None else float(aucs.mean())


def d_prime(probs: np.ndarray, targets: np.ndarray) -> float:
    """Mean over classes of sqrt(2) * Phi^-1(AUC)."""
    aucs = _class_aucs(probs, targets)
    if aucs is None:
        return math.nan
    normal = statistics.NormalDist()
    z = [math.copysign(math.inf, a - 0.5) if a in (0.0, 1.0) else normal.inv_cdf(a) for a in aucs]
    return float(np.mean(z) * math.sqrt(2.0))


SCORES = {  # hear-eval-kit's scene scores; all are maximised
    "top1_acc": top1_accuracy,
    "pitch_acc": top1_accuracy,
    "chroma_acc": chroma_accuracy,
    "mAP": mean_average_precision,
    "d_prime": d_prime,
    "aucroc": aucroc,
}


# ----------------------------------------------------------------------------- event scores
# Event tasks are scored on events, not frames: the probe's frame outputs become events
# (hear-eval-kit's postprocessing), compared with the reference events by sed_eval's overall
# (micro-averaged) metrics. Times are in seconds there, as hear-eval-kit passes them.

@dataclass(frozen=True)
class EventScore:
    kind: str  # "event": F-measure of matched events; "segment": error rate on a time grid
    t_collar: float = 0.2  # s: |onset difference| allowed (and offset, with max(collar, share of length))
    evaluate_offset: bool = False
    percentage_of_length: float = 0.5
    time_resolution: float = 1.0  # s: segment length
    maximize: bool = True


EVENT_SCORES = {  # hear-eval-kit's event scores
    "event_onset_200ms_fms": EventScore("event", t_collar=0.2),
    "event_onset_50ms_fms": EventScore("event", t_collar=0.05),
    "event_onset_offset_50ms_20perc_fms": EventScore("event", t_collar=0.05, evaluate_offset=True,
                                                     percentage_of_length=0.2),
    "segment_1s_er": EventScore("segment", time_resolution=1.0, maximize=False),
}

# hear-eval-kit's postprocessing grid, chosen on validation at every check.
POSTPROCESSING_GRID = ({"median_filter_ms": 250, "min_duration": 125}, {"median_filter_ms": 250, "min_duration": 250})


def median_filter(x: np.ndarray, width: int) -> np.ndarray:
    """scipy.ndimage.median_filter(x, size=(width, 1)): along time, element width // 2 of each
    sorted window [t - width // 2, t - width // 2 + width), the ends mirrored (d c b a | a b c d)."""
    if width <= 1:
        return x
    left = width // 2
    padded = np.pad(x, ((left, width - 1 - left), (0, 0)), mode="symmetric")
    windows = np.lib.stride_tricks.sliding_window_view(padded, width, axis=0)  # (T, labels, width)
    return np.sort(windows, axis=-1)[..., width // 2]


def frames_to_events(probs: np.ndarray, timestamps: np.ndarray, labels: list[str], median_filter_ms: float,
                     min_duration: float, threshold: float = 0.5) -> list[dict]:
    """One file's frame probabilities (T, labels) -> events {"label", "start", "end"} in ms:
    median filter over time, threshold, runs of active frames from the first to the last
    frame's timestamp, runs shorter than min_duration dropped."""
    if len(timestamps) > 1:
        probs = median_filter(probs, int(round(median_filter_ms / np.mean(np.diff(timestamps)))))
    events = []
    for c, label in enumerate(labels):
        active = np.flatnonzero(probs[:, c] > threshold)
        for run in np.split(active, np.flatnonzero(np.diff(active) > 1) + 1) if len(active) else []:
            start, end = float(timestamps[run[0]]), float(timestamps[run[-1]])
            if end - start >= min_duration:
                events.append({"label": label, "start": start, "end": end})
    return sorted(events, key=lambda e: e["start"])


def matching_size(hits: np.ndarray) -> int:
    """Size of a maximum matching of a bipartite graph (reference x estimated boolean matrix),
    by augmenting paths (Kuhn): what sed_eval's 'optimal' event matching counts."""
    owner = [-1] * hits.shape[1]  # reference matched to each estimated event

    def augment(ref: int, seen: list[bool]) -> bool:
        for est in np.flatnonzero(hits[ref]):
            if not seen[est]:
                seen[est] = True
                if owner[est] < 0 or augment(owner[est], seen):
                    owner[est] = ref
                    return True
        return False

    return sum(augment(ref, [False] * hits.shape[1]) for ref in range(hits.shape[0]))


def event_counts(ref: list[dict], est: list[dict], score: EventScore) -> tuple[int, int, int]:
    """(true positives, reference events, estimated events) of one file: a hit needs the same
    label and the onset within the collar (and the offset within max(collar, share of the
    reference length) when asked); each event counts at most once."""
    true_pos = 0
    for label in {e["label"] for e in ref} & {e["label"] for e in est}:
        r = [(e["start"] / 1000.0, e["end"] / 1000.0) for e in ref if e["label"] == label]
        s = [(e["start"] / 1000.0, e["end"] / 1000.0) for e in est if e["label"] == label]
        hits = np.array([[abs(r_on - s_on) <= score.t_collar and (
            not score.evaluate_offset or abs(r_off - s_off) <= max(score.t_collar, score.percentage_of_length * (r_off - r_on)))
            for s_on, s_off in s] for r_on, r_off in r], dtype=bool)
        true_pos += matching_size(hits)
    return true_pos, len(ref), len(est)


def segment_counts(ref: list[dict], est: list[dict], labels: list[str], resolution: float) -> np.ndarray:
    """(substitutions, deletions, insertions, reference activity) of one file on a grid of
    `resolution` s: a label is active in every segment its events touch."""
    length = math.ceil(max([e["end"] / 1000.0 for e in ref + est], default=0.0) / resolution)

    def roll(events: list[dict]) -> np.ndarray:
        active = np.zeros((length, len(labels)), bool)
        for e in events:
            on, off = math.floor(e["start"] / 1000.0 / resolution), math.ceil(e["end"] / 1000.0 / resolution)
            active[on:off, labels.index(str(e["label"]))] = True
        return active

    r, s = roll(ref), roll(est)
    n_ref, n_sys, true_pos = r.sum(1), s.sum(1), (r & s).sum(1)
    return np.array([(np.minimum(n_ref, n_sys) - true_pos).sum(), np.maximum(0, n_ref - n_sys).sum(),
                     np.maximum(0, n_sys - n_ref).sum(), n_ref.sum()])


def event_score(name: str, refs: list[list[dict]], ests: list[list[dict]], labels: list[str]) -> float:
    """sed_eval's overall score `name` over files (reference and estimated events per file):
    F-measure from summed counts (NaN without estimated or reference events, as sed_eval),
    or the segment error rate (S + D + I) / N."""
    score = EVENT_SCORES[name]
    if score.kind == "segment":
        subs, dels, ins, n_ref = sum(segment_counts(r, e, labels, score.time_resolution) for r, e in zip(refs, ests))
        eps = np.spacing(1)
        return float(subs / (n_ref + eps) + dels / (n_ref + eps) + ins / (n_ref + eps))
    true_pos, n_ref, n_sys = np.sum([event_counts(r, e, score) for r, e in zip(refs, ests)], axis=0)
    precision = true_pos / n_sys if n_sys else math.nan
    recall = true_pos / n_ref if n_ref else math.nan
    if precision == 0 and recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


# ----------------------------------------------------------------------------- statistics

def student_t_two_sided(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer df (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 c^2 + 2*4/(3*5) c^4 + ...)), df - 3 powers
        term, series = 1.0, 1.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            series += term
        tail = math.sin(theta) * math.cos(theta) * series if df > 1 else 0.0
        return 2 / math.pi * (theta + tail)
    term, series = 1.0, 1.0  # even: sin (1 + 1/2 c^2 + 1*3/(2*4) c^4 + ...), df - 2 powers
    for k in range(1, df // 2):
        term *= c2 * (2 * k - 1) / (2 * k)
        series += term
    return math.sin(theta) * series


def t_quantile(level: float, df: int) -> float:
    """t such that P(|T| < t) = level (e.g. 12.706 for level 0.95, df 1), by bisection."""
    low, high = 0.0, 1e6
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if student_t_two_sided(mid, df) < level else (low, mid)
    return (low + high) / 2


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of its Student-t confidence interval (NaN for a single value)."""
    n = len(values)
    mean = float(np.mean(values))
    if n < 2:
        return mean, math.nan
    return mean, t_quantile(level, n - 1) * float(np.std(values, ddof=1)) / math.sqrt(n)


def overall_scores(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """s(m) = mean over tasks of (x_t(m) - min_t) / (max_t - min_t) * 100.

    scores: model -> task -> score; only tasks every model has count, and tasks where all
    models tie are left out (no information). NaN when no task is left."""
    tasks = set.intersection(*(set(s) for s in scores.values())) if scores else set()
    spread = {}
    for task in tasks:
        values = [s[task] for s in scores.values()]
        if max(values) > min(values):
            spread[task] = (min(values), max(values))
    return {model: float(np.mean([(s[t] - lo) / (hi - lo) * 100 for t, (lo, hi) in spread.items()]))
            if spread else math.nan for model, s in scores.items()}

