"""Request traces: the internal Mooncake-style JSONL format, converters, transformations and a synthetic generator.

Internal format, one JSON object per line (Mooncake FAST'25 layout):
    {"timestamp": <ms since the first request>, "input_length": <tokens>, "output_length": <tokens>,
     "hash_ids": [<int>, ...]}            # hash_ids optional: shared-prefix KV blocks
Converters read the Azure LLM inference CSV (TIMESTAMP, ContextTokens, GeneratedTokens; Patel et al.,
Splitwise, ISCA 2024, CC-BY 4.0) and the BurstGPT CSV (Timestamp, ..., Request tokens, Response tokens, ...).
Every function is deterministic for a given seed. No Ray, no HTTP.
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterable, Sequence


class TraceError(ValueError):
    """A trace file or row is invalid; the message names the file, line and field."""


@dataclass(frozen=True)
class TraceRequest:
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...] = field(default=())

    def to_json(self) -> str:
        row = {"timestamp": round(self.timestamp_ms, 3), "input_length": self.input_length,
               "output_length": self.output_length}
        if self.hash_ids:
            row["hash_ids"] = list(self.hash_ids)
        return json.dumps(row)


@dataclass
class ConvertReport:
    rows: int = 0
    skipped: int = 0
    first_errors: list[str] = field(default_factory=list)


def _bad(path: str, line: int, message: str) -> TraceError:
    return TraceError(f"{path}:{line}: {message}")


def _positive_int(value: str, name: str, path: str, line: int, allow_zero: bool = False) -> int:
    try:
        number = int(float(value))
    except (TypeError, ValueError):
        raise _bad(path, line, f"{name} {value!r} is not a number") from None
    if number < 0 or (number == 0 and not allow_zero):
        raise _bad(path, line, f"{name} ({number}) must be {'>= 0' if allow_zero else '>= 1'}")
    return number


MAX_TOKENS = 10_000_000  # per request: a length past this is a broken row, not a request


def _row(row, path: str, line: int) -> TraceRequest:
    """One JSONL row, checked field by field (each error names the line, the field and the value)."""
    if not isinstance(row, dict):
        raise _bad(path, line, f"a trace row must be a JSON object, got {type(row).__name__}")
    for key in ("timestamp", "input_length", "output_length"):
        if key not in row:
            raise _bad(path, line, f"missing field {key!r}")
    stamp = row["timestamp"]
    if isinstance(stamp, bool) or not isinstance(stamp, (int, float)) or not math.isfinite(stamp) or stamp < 0:
        raise _bad(path, line, f"timestamp ({stamp!r}) must be a finite number of milliseconds >= 0")
    lengths = []
    for key, least in (("input_length", 1), ("output_length", 1)):
        value = row[key]
        if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= MAX_TOKENS:
            raise _bad(path, line, f"{key} ({value!r}) must be a whole number of tokens in [{least}, {MAX_TOKENS}]")
        lengths.append(value)
    hashes = row.get("hash_ids")
    hashes = [] if hashes is None else hashes
    if not isinstance(hashes, list) or not all(isinstance(h, int) and not isinstance(h, bool) for h in hashes):
        raise _bad(path, line, f"hash_ids ({str(hashes)[:60]!r}) must be a list of integers")
    return TraceRequest(float(stamp), lengths[0], lengths[1], tuple(hashes))


def read_jsonl(path: str | Path) -> list[TraceRequest]:
    out = []
    with open(path, encoding="utf-8", errors="strict") as handle:
        try:
            for line_no, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise _bad(str(path), line_no, f"not JSON ({exc})") from None
                out.append(_row(row, str(path), line_no))
        except UnicodeDecodeError as exc:
            raise TraceError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return out


def write_jsonl(requests: Iterable[TraceRequest], path: str | Path) -> int:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "w") as handle:
        for req in requests:
            handle.write(req.to_json() + "\n")
            count += 1
    return count


def _convert(path: str | Path, columns: Sequence[str], parse_row, skip_bad: bool) -> tuple[list[TraceRequest],
                                                                                          ConvertReport]:
    report, rows = ConvertReport(), []
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise TraceError(f"{path}: missing columns {missing} (has {reader.fieldnames})")
        for line_no, row in enumerate(reader, 2):
            try:
                rows.append(parse_row(row, str(path), line_no))
                report.rows += 1
            except TraceError as err:
                if not skip_bad:
                    raise
                report.skipped += 1
                if len(report.first_errors) < 5:
                    report.first_errors.append(str(err))
    if not rows:
        raise TraceError(f"{path}: no usable rows")
    rows.sort(key=lambda r: r[0])
    t0 = rows[0][0]
    return [TraceRequest((t - t0) * 1000.0, i, o) for t, i, o in rows], report


def from_azure_csv(path: str | Path, skip_bad: bool = False) -> tuple[list[TraceRequest], ConvertReport]:
    """Azure LLM inference trace (2023 or 2024): TIMESTAMP (datetime), ContextTokens, GeneratedTokens."""

    def parse(row, src, line):
        raw = (row.get("TIMESTAMP") or "").strip()
        try:
            stamp = raw[:26]  # the CSV has 7 fractional digits; datetime takes 6
            t = datetime.fromisoformat(stamp).timestamp()
        except ValueError:
            raise _bad(src, line, f"TIMESTAMP {raw!r} is not a date-time") from None
        return (t, _positive_int(row["ContextTokens"], "ContextTokens", src, line),
                _positive_int(row["GeneratedTokens"], "GeneratedTokens", src, line))

    return _convert(path, ("TIMESTAMP", "ContextTokens", "GeneratedTokens"), parse, skip_bad)


def from_burstgpt_csv(path: str | Path, skip_bad: bool = False) -> tuple[list[TraceRequest], ConvertReport]:
    """BurstGPT: Timestamp (s since the trace start), Request tokens, Response tokens (+ model/session/log type).
    Rows with 0 response tokens (failed requests in BurstGPT) are bad rows."""

    def parse(row, src, line):
        try:
            t = float(row["Timestamp"])
        except (TypeError, ValueError):
            raise _bad(src, line, f"Timestamp {row.get('Timestamp')!r} is not a number") from None
        if not math.isfinite(t) or t < 0:
            raise _bad(src, line, f"Timestamp ({t}) must be a finite number >= 0")
        return (t, _positive_int(row["Request tokens"], "Request tokens", src, line),
                _positive_int(row["Response tokens"], "Response tokens", src, line))

    return _convert(path, ("Timestamp", "Request tokens", "Response tokens"), parse, skip_bad)


def read_trace(path: str | Path, skip_bad: bool = False) -> tuple[list[TraceRequest], ConvertReport]:
    """Any supported trace file: `.jsonl` (internal format), or an Azure / BurstGPT CSV told apart by header."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"trace file {str(path)!r} does not exist")
    if path.suffix == ".jsonl":
        rows = read_jsonl(path)
        return rows, ConvertReport(rows=len(rows))
    with open(path) as handle:
        header = handle.readline()
    convert = from_azure_csv if "ContextTokens" in header else from_burstgpt_csv
    return convert(path, skip_bad=skip_bad)


# ---- transformations -------------------------------------------------------------------------------------------


def time_scale(requests: Sequence[TraceRequest], factor: float) -> list[TraceRequest]:
    """Stretch (factor > 1) or compress (factor < 1) time; keeps every request."""
    if not factor > 0:
        raise ValueError(f"time scale factor ({factor}) must be > 0")
    return [TraceRequest(r.timestamp_ms * factor, r.input_length, r.output_length, r.hash_ids) for r in requests]


def rate_scale(requests: Sequence[TraceRequest], factor: float, seed: int = 0) -> list[TraceRequest]:
    """Change the request rate, keeping the time span: thin (factor < 1) or add jittered copies (factor > 1)."""
    if not factor > 0:
        raise ValueError(f"rate scale factor ({factor}) must be > 0")
    rng = random.Random(seed)
    out = []
    for i, r in enumerate(requests):
        copies = math.floor(factor) + (1 if rng.random() < factor - math.floor(factor) else 0)
        gap = (requests[i + 1].timestamp_ms - r.timestamp_ms) if i + 1 < len(requests) else 0.0
        for c in range(copies):
            jitter = rng.uniform(0, gap) if c else 0.0
            out.append(TraceRequest(r.timestamp_ms + jitter, r.input_length, r.output_length, r.hash_ids))
    out.sort(key=lambda r: r.timestamp_ms)
    return out


def truncate(requests: Sequence[TraceRequest], max_input: int, max_output: int, min_input: int = 1,
             min_output: int = 1) -> list[TraceRequest]:
    """Clamp token lengths to what the model and machine can serve."""
    if not 1 <= min_input <= max_input or not 1 <= min_output <= max_output:
        raise ValueError(f"need 1 <= min <= max (input {min_input}..{max_input}, output {min_output}..{max_output})")
    return [TraceRequest(r.timestamp_ms, min(max(r.input_length, min_input), max_input),
                         min(max(r.output_length, min_output), max_output), r.hash_ids) for r in requests]


def window(requests: Sequence[TraceRequest], start_s: float = 0.0, duration_s: float | None = None
           ) -> list[TraceRequest]:
    """Requests in [start, start + duration), re-based to start at 0."""
    end = math.inf if duration_s is None else (start_s + duration_s) * 1000
    picked = [r for r in requests if start_s * 1000 <= r.timestamp_ms < end]
    return [TraceRequest(r.timestamp_ms - start_s * 1000, r.input_length, r.output_length, r.hash_ids)
            for r in picked]


# ---- synthetic traces ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RateShape:
    """Arrival rate over time: a diurnal sine (peak at `peak_hour`), plus optional steps and spikes."""

    mean_rps: float
    peak_to_trough: float = 3.0  # peak rate / trough rate over the day
    day_s: float = 86_400.0  # length of one "day" (compress it to replay a diurnal curve in minutes)
    peak_hour: float = 14.0
    steps: tuple[tuple[float, float], ...] = ()  # (start_s, multiplier) from that time on
    spikes: tuple[tuple[float, float, float], ...] = ()  # (start_s, duration_s, multiplier)

    def __post_init__(self) -> None:
        if not self.mean_rps > 0:
            raise ValueError(f"mean_rps ({self.mean_rps}) must be > 0")
        if not self.peak_to_trough >= 1:
            raise ValueError(f"peak_to_trough ({self.peak_to_trough}) must be >= 1")
        if not self.day_s > 0:
            raise ValueError(f"day_s ({self.day_s}) must be > 0")

    def rate(self, t_s: float) -> float:
        amplitude = (self.peak_to_trough - 1) / (self.peak_to_trough + 1)
        phase = 2 * math.pi * (t_s / self.day_s - self.peak_hour / 24.0)
        value = self.mean_rps * (1 + amplitude * math.cos(phase))
        for start, mult in self.steps:
            if t_s >= start:
                value *= mult
        for start, duration, mult in self.spikes:
            if start <= t_s < start + duration:
                value *= mult
        return max(value, 0.0)

    def max_rate(self) -> float:
        peak = self.mean_rps * 2 * self.peak_to_trough / (self.peak_to_trough + 1)
        for _, mult in self.steps:
            peak *= max(mult, 1.0)
        for _, _, mult in self.spikes:
            peak *= max(mult, 1.0)
        return peak


def synthesize(shape: RateShape, duration_s: float, sizes: Sequence[TraceRequest], seed: int = 0
               ) -> list[TraceRequest]:
    """Non-homogeneous Poisson arrivals following `shape` (thinning), sizes drawn from a real trace's rows."""
    if not duration_s > 0:
        raise ValueError(f"duration_s ({duration_s}) must be > 0")
    if not sizes:
        raise ValueError("sizes must not be empty (give a real trace to draw request sizes from)")
    rng = random.Random(seed)
    peak = shape.max_rate()
    out, t = [], 0.0
    while True:
        t += rng.expovariate(peak)
        if t >= duration_s:
            return out
        if rng.random() * peak <= shape.rate(t):
            size = sizes[rng.randrange(len(sizes))]
            out.append(TraceRequest(t * 1000.0, size.input_length, size.output_length))


def summarize_trace(requests: Sequence[TraceRequest]) -> dict:
    if not requests:
        return {"requests": 0}
    span_s = (requests[-1].timestamp_ms - requests[0].timestamp_ms) / 1000
    ins = sorted(r.input_length for r in requests)
    outs = sorted(r.output_length for r in requests)
    return {"requests": len(requests), "span_s": round(span_s, 3),
            "mean_rps": round(len(requests) / span_s, 3) if span_s > 0 else None,
            "median_input": ins[len(ins) // 2], "median_output": outs[len(outs) // 2],
            "max_input": ins[-1], "max_output": outs[-1]}


def as_dicts(requests: Iterable[TraceRequest]) -> list[dict]:
    return [asdict(r) for r in requests]
