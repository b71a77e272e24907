"""PNG plots of a load test: load and throughput over time (with optional extra series such as replicas per
role from a JSONL log), latency percentiles over time, and CDFs. matplotlib with the Agg backend."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.load.stats import RequestResult  # noqa: E402
from common.histogram import percentile  # noqa: E402


def _bins(results: Sequence[RequestResult], bin_s: float):
    sent = [r for r in results if r.sent_s is not None]
    end = max((r.sent_s + (r.e2e_s or 0)) for r in sent) if sent else 0.0
    return sent, max(1, math.ceil(end / bin_s))


def read_series(path: str | Path) -> dict[str, list[tuple[float, float]]]:
    """Extra timeline series from JSONL rows `{"t_s": <seconds since start>, "<name>": <value>, ...}`."""
    series: dict[str, list[tuple[float, float]]] = {}
    with open(path) as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "t_s" not in row:
                raise ValueError(f"{path}:{line_no}: series rows need a 't_s' field")
            for key, value in row.items():
                if key != "t_s" and isinstance(value, (int, float)):
                    series.setdefault(key, []).append((float(row["t_s"]), float(value)))
    return series


def plot_timeline(results: Sequence[RequestResult], path: str | Path, bin_s: float = 1.0,
                  extra: dict[str, list[tuple[float, float]]] | None = None) -> None:
    sent, n = _bins(results, bin_s)
    arrivals, tokens = [0] * n, [0.0] * n
    for r in sent:
        arrivals[min(n - 1, int(r.sent_s // bin_s))] += 1
        if r.ok and r.ttft_s is not None:  # each streamed chunk counts when it arrived
            t = r.sent_s + r.ttft_s
            chunk_times = [t] + [t := t + gap for gap in r.itls_s]
            per_chunk = r.output_tokens / len(chunk_times)
            for at in chunk_times:
                tokens[min(n - 1, int(at // bin_s))] += per_chunk
    xs = [i * bin_s for i in range(n)]
    rows = 3 if extra else 2
    fig, axes = plt.subplots(rows, 1, figsize=(10, 2.6 * rows), sharex=True)
    axes[0].step(xs, [a / bin_s for a in arrivals], where="post")
    axes[0].set_ylabel("arrivals / s")
    axes[1].step(xs, [t / bin_s for t in tokens], where="post", color="tab:green")
    axes[1].set_ylabel("output tokens / s")
    if extra:
        for name, points in sorted(extra.items()):
            axes[2].step([p[0] for p in points], [p[1] for p in points], where="post", label=name)
        axes[2].set_ylabel("extra series")
        axes[2].legend(loc="upper left", fontsize="small")
    axes[-1].set_xlabel("time since start (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_latency_over_time(results: Sequence[RequestResult], path: str | Path, bin_s: float = 5.0) -> None:
    sent, n = _bins(results, bin_s)
    fig, axes = plt.subplots(2, 1, figsize=(10, 5.2), sharex=True)
    for ax, name, values_of in ((axes[0], "TTFT", lambda r: [r.ttft_s] if r.ttft_s is not None else []),
                                (axes[1], "TBT", lambda r: r.itls_s)):
        buckets: list[list[float]] = [[] for _ in range(n)]
        for r in sent:
            if r.ok:
                buckets[min(n - 1, int(r.sent_s // bin_s))].extend(values_of(r))
        xs = [i * bin_s for i in range(n) if buckets[i]]
        for q in (0.5, 0.9, 0.99):
            ax.plot(xs, [percentile(b, q) * 1000 for b in buckets if b], marker=".", label=f"p{int(q * 100)}")
        ax.set_ylabel(f"{name} (ms)")
        ax.legend(loc="upper left", fontsize="small")
    axes[-1].set_xlabel("send time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_cdfs(results: Sequence[RequestResult], path: str | Path) -> None:
    ok = [r for r in results if r.ok]
    data = {"TTFT": [r.ttft_s for r in ok if r.ttft_s is not None], "TBT": [g for r in ok for g in r.itls_s],
            "E2E": [r.e2e_s for r in ok if r.e2e_s is not None]}
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, (name, values) in zip(axes, data.items()):
        values = sorted(v * 1000 for v in values)
        if values:
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))])
        ax.set_title(f"{name} CDF")
        ax.set_xlabel("ms")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_plots(results: Sequence[RequestResult], out_dir: str | Path,
                extra: dict[str, list[tuple[float, float]]] | None = None) -> list[str]:
    out = Path(out_dir)
    files = [out / "timeline.png", out / "latency_over_time.png", out / "cdf.png"]
    plot_timeline(results, files[0], extra=extra)
    plot_latency_over_time(results, files[1])
    plot_cdfs(results, files[2])
    return [str(f) for f in files]
