"""GPU telemetry check for a machine with an NVIDIA GPU (the `device` tool's machine): the NVML sampler
(`serving/gpu_telemetry.py`) idle, then under a torch bf16 matmul load on GPU 0, one sample per second.
Writes bench/results/nvml_check.json (or $OUT/nvml_check.json). Needs torch with CUDA; not run on CPU machines.

Usage: python bench/scripts/nvml_check.py [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from serving.gpu_telemetry import open_sampler  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    sampler, why = open_sampler(visible="0")
    if sampler is None:
        print(why, file=sys.stderr)
        return 2
    import torch

    def series(label: str) -> list[dict]:
        rows = []
        for _ in range(int(args.seconds)):
            time.sleep(1.0)
            s = sampler.sample()
            rows.append({"phase": label, "gpu_utilization": s.gpu_utilization, "sm_activity": s.sm_activity,
                         "sm_source": s.sm_source})
            print(rows[-1], file=sys.stderr, flush=True)
        return rows

    rows = series("idle")
    stop = threading.Event()

    def load() -> None:
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        while not stop.is_set():
            for _ in range(20):
                a = (a @ a).clamp_(-1, 1)
            torch.cuda.synchronize()

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    rows += series("matmul")
    stop.set()
    worker.join(timeout=30)
    sampler.close()
    out = Path(os.environ.get("OUT", ROOT / "bench" / "results")) / "nvml_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(0), "rows": rows}, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
