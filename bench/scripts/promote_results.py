"""Copy the figures tests measured (`runs/test-results/*.json`, untracked) into the tracked `bench/results/` files.

    python bench/scripts/promote_results.py [--from DIR] [--to DIR]

Tests never rewrite a tracked file (a clean checkout stays clean after `make test`): the fault and fuzz tests
write their figures with `bench.results_io.merge_result` under `runs/test-results/`. This script merges each
file's keys into the file of the same name under `bench/results/` (keys the tests did not write are kept) and
prints what it promoted; commit the result with the change it measures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def promote(source: Path, target: Path) -> list[str]:
    """Merge every `source/*.json` into `target/`; returns 'file: key' for each key copied."""
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no figures from tests (run `make test` first)")
    done = []
    for path in sorted(source.glob("*.json")):
        figures = json.loads(path.read_text())
        if not isinstance(figures, dict):
            raise ValueError(f"{path}: expected a JSON object of figures, got {type(figures).__name__}")
        out = target / path.name
        merged = json.loads(out.read_text()) if out.exists() else {}
        merged.update(figures)
        out.write_text(json.dumps(merged, indent=2) + "\n")
        done += [f"{out.relative_to(target.parent) if target.parent in out.parents else out}: {k}" for k in figures]
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="source", default=str(ROOT / "runs" / "test-results"))
    p.add_argument("--to", dest="target", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    for line in promote(Path(args.source), Path(args.target)):
        print(f"promoted {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
