"""The fair fight's verdict from its recorded runs: each method's test top-1 over seeds, and the STKD - KD
difference of means with its 95% interval (Welch's t, the two methods' seeds taken as independent
samples: a seed fixes a run's initialisation and data order, which two methods do not share).

    python bench/fair_fight_report.py [bench/results/fair_fight.json]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from scipy import stats

METRICS = ("test_top1_selected", "test_top1_last")


def by_method(runs: list[dict]) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        if run["method"].startswith("teacher"):
            continue
        for metric in METRICS:
            out.setdefault(run["method"], {}).setdefault(metric, []).append(float(run[metric]))
    return out


def welch_interval(a: list[float], b: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """``mean(a) - mean(b)`` and its ``level`` interval by Welch's t."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    difference = statistics.fmean(a) - statistics.fmean(b)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = stats.t.ppf(0.5 + level / 2, df) * (va + vb) ** 0.5
    return difference, difference - half, difference + half


def report(runs: list[dict], a: str = "stkd", b: str = "kd") -> str:
    methods = by_method(runs)
    lines = ["| method | seeds | test top-1 at the selected epoch | at the last epoch |", "|---|---:|---:|---:|"]
    for name, values in sorted(methods.items(), key=lambda kv: -statistics.fmean(kv[1][METRICS[0]])):
        cells = [f"{statistics.fmean(v):.2f} ± {statistics.stdev(v):.2f}" for v in (values[m] for m in METRICS)]
        lines.append(f"| {name} | {len(values[METRICS[0]])} | {cells[0]} | {cells[1]} |")
    for metric in METRICS:
        d, low, high = welch_interval(methods[a][metric], methods[b][metric])
        lines.append(f"\n{a} - {b}, {metric}: {d:+.2f} points, 95% interval [{low:+.2f}, {high:+.2f}] (Welch)")
    return "\n".join(lines)


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "fair_fight.json")
    print(report(json.loads(path.read_text())["runs"]))
