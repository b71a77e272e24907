"""Where benchmarks put their JSON: bench/results/<name>.json (also printed to stdout)."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _out(name: str, path: str | Path | None) -> Path:
    out = Path(path) if path else RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def write_result(name: str, result: dict, path: str | Path | None = None) -> Path:
    out = _out(name, path)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return out


def merge_result(name: str, key: str, value: dict, path: str | Path | None = None) -> Path:
    """Set one key of bench/results/<name>.json, keeping what other runs wrote there (the reliability figures
    come from several tests and a benchmark)."""
    out = _out(name, path)
    result = json.loads(out.read_text()) if out.exists() else {}
    result[key] = value
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out
