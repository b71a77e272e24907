"""`heteroscale demo --fleet`: two services on the local labelled cluster under one fleet controller
(examples/fleet-local.yaml: `chat`, priority 10, one group in s1-a; `batch`, best effort with minimum 0, one group
in s1-b; the budget is the whole cluster, 2 L20 + 2 H20).

Load (in units of one decode replica's target): batch steady at 0.3 all along; chat light (0.6), then a ramp to
2.4, two decode replicas' worth (no domain has room for its second group: the budget's share by priority cuts
batch to its floor, zero, so batch's group is withdrawn whole, removed a period later, and chat's second group
opens in s1-b), held until that group serves, then chat falls (0.3) and gives it back, and batch returns. While batch has no group its requests are refused
at once with 503 + Retry-After (counted as shed), never held.

Writes runs/demo-fleet-<UTC>/: timeline.png (the two services side by side: replicas per role, requests per
second by outcome), fleet.jsonl (the fleet controller's status every 2 s), decisions-<service>.jsonl and
summary.json (`num_preemptions`, `budget_exceeded`, `preemption_to_serving_s`, and per service `priority`,
`sent`, `ok`, `shed`, `failed`). Takes ~12 minutes.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import json
import threading
import time
from pathlib import Path
from typing import Callable

from common.config import ClusterSpec, FleetSpec, check_service_fits_cluster
from heteroscale_ray import local_cluster, service as svc

OUTPUT_TOKENS = 24
# loads in units of one decode replica's target (the high-priority service's): light holds one group, the ramp
# asks for two decode replicas (a second group: no domain has room), the fall gives it back
LIGHT, RAMP, FALL, BEST_EFFORT = 0.6, 2.4, 0.3, 0.3


class PacedLoad:
    """Open-loop streaming completions at `rate` requests/s to one service (bounded by count and by `stop`);
    every outcome kept: ok, shed (429, or 503 with Retry-After: refused at once) or failed (anything else)."""

    def __init__(self, url: str, model: str, rate: float, max_requests: int = 5_000):
        self.url, self.model, self.rate, self.max_requests = url, model, rate, max_requests
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.rows: list[tuple[float, str]] = []  # (sent at, outcome)
        self.failures: list[str] = []
        self.pool = cf.ThreadPoolExecutor(24)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def count(self, outcome: str) -> int:
        with self.lock:
            return sum(1 for _, o in self.rows if o == outcome)

    def _one(self, n: int) -> None:
        import httpx

        sent, outcome = time.time(), "failed"
        body = {"model": self.model, "prompt": f"{n} tell me about the sea", "max_tokens": OUTPUT_TOKENS,
                "temperature": 0, "stream": True, "ignore_eos": True}
        try:
            with httpx.stream("POST", f"{self.url}/v1/completions", json=body, timeout=90) as r:
                if r.status_code in (429, 503):
                    text = r.read().decode(errors="replace")
                    if not r.headers.get("retry-after"):
                        raise AssertionError(f"HTTP {r.status_code} without Retry-After: {text[:200]}")
                    outcome = "shed"
                elif r.status_code != 200:
                    raise AssertionError(f"HTTP {r.status_code}: {r.read()[:200]!r}")
                elif sum(1 for line in r.iter_lines() if line.startswith("data: {")) == 0:
                    raise AssertionError("empty stream")
                else:
                    outcome = "ok"
        except Exception as exc:  # counted, never hidden
            with self.lock:
                self.failures.append(repr(exc)[:300])
        with self.lock:
            self.rows.append((sent, outcome))

    def _run(self) -> None:
        next_t, n = time.monotonic(), 0
        while not self.stop.is_set() and n < self.max_requests:
            self.pool.submit(self._one, n)
            n += 1
            next_t += 1.0 / self.rate
            self.stop.wait(max(0.0, next_t - time.monotonic()))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=30)
        self.pool.shutdown(wait=True)

    def summary(self) -> dict:
        with self.lock:
            outcomes = [o for _, o in self.rows]
        return {"sent": len(outcomes), "ok": outcomes.count("ok"), "shed": outcomes.count("shed"),
                "failed": outcomes.count("failed")}


def serving_decode(spec, address: str) -> int:
    """Decode replicas RUNNING in the service's groups (Serve's view)."""
    report = svc.status(spec, address)
    return sum(d["replicas"].get("RUNNING", 0) for deps in report["applications"].values()
               for name, d in deps.items() if name.endswith("decode"))


class FleetWatch:
    """The fleet controller's status every `period_s` in a thread, every sample kept."""

    def __init__(self, fleet: str, address: str, period_s: float = 2.0):
        self.fleet, self.address, self.period_s = fleet, address, period_s
        self.samples: list[dict] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.period_s):
            try:
                st = svc.fleet_status(self.fleet, self.address)
            except Exception:  # a slow status call is skipped, not fatal
                continue
            if st.get("services"):
                self.samples.append({"wall": time.time(), **st})

    def last(self) -> dict:
        return self.samples[-1] if self.samples else {}

    def wait(self, what: str, predicate, timeout_s: float, progress) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.samples and predicate(self.samples[-1]):
                progress(f"  {what} ({len(self.samples)} samples)")
                return True
            time.sleep(1)
        progress(f"  {what}: not within {timeout_s:.0f}s")
        return False


def budget_exceeded(fleet: FleetSpec, samples: list[dict]) -> bool:
    for st in samples:
        used = st["budget"]["used_by_type"]
        if fleet.gpu_budget is not None and sum(used.values()) > fleet.gpu_budget:
            return True
        if any(used.get(t, 0) > cap for t, cap in fleet.gpu_budget_by_type.items()):
            return True
    return False


def plot(samples: list[dict], loads: dict[str, PacedLoad], start: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(loads)
    fig, axes = plt.subplots(2, len(names), figsize=(6 * len(names), 7), sharex=True, squeeze=False)
    ts = [s["wall"] - start for s in samples]
    for col, name in enumerate(names):
        ax = axes[0][col]
        for role, style in (("prefill", ":"), ("decode", "-")):
            ax.step(ts, [sum(g[role] for g in s["services"][name]["groups"]) for s in samples], where="post",
                    linestyle=style, label=f"{role} held")
        ax.step(ts, [sum(g["withdrawn"] for g in s["services"][name]["groups"]) for s in samples], where="post",
                color="tab:red", alpha=0.6, label="withdrawn")
        prio = samples[0]["services"][name]["priority"] if samples else "?"
        ax.set_title(f"{name} (priority {prio})")
        ax.set_ylabel("replicas")
        ax.legend(fontsize="small", loc="upper left")
        marks = {p["t"] for s in samples for p in s.get("preemptions", []) if p["service"] == name}
        for t in marks:
            for row in axes:
                row[col].axvline(t - start, color="tab:red", linewidth=1)
        ax = axes[1][col]
        with loads[name].lock:
            rows = list(loads[name].rows)
        end = max([t - start for t, _ in rows], default=0) + 10
        bins = list(range(0, int(end) + 10, 10))
        for outcome, color in (("ok", "tab:green"), ("shed", "tab:orange"), ("failed", "tab:red")):
            xs = [t - start for t, o in rows if o == outcome]
            if xs:
                ax.hist(xs, bins=bins, weights=[0.1] * len(xs), histtype="step", color=color, label=outcome)
        ax.set_ylabel("requests/s by outcome")
        ax.set_xlabel("seconds since the load started")
        ax.legend(fontsize="small", loc="upper left")
    fig.suptitle("fleet: red lines mark the capacity a service gave up to a higher priority")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(cluster: ClusterSpec, fleet: FleetSpec, address: str | None, progress: Callable[[str], None] = print,
        runs_dir: str | Path = "runs") -> int:
    import ray

    from autoscaler import lifecycle

    names = [m.spec.name for m in fleet.members]
    if len(names) != 2:
        raise ValueError(f"fleet {fleet.name!r}: the fleet demo drives two services (a high priority and a best "
                         f"effort one), got {names}")
    high, low = sorted(fleet.members, key=lambda m: -m.priority)
    out = Path(runs_dir) / f"demo-fleet-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"
    out.mkdir(parents=True, exist_ok=True)
    started_here = False
    if address is None:
        for m in fleet.members:
            check_service_fits_cluster(m.spec, cluster)
        started_here = not local_cluster.is_running()
        address = local_cluster.up(cluster, progress=progress).address
    try:
        urls = svc.deploy_fleet(fleet, address, progress=progress)
        watch = FleetWatch(fleet.name, address)
        watch.thread.start()
        model = high.spec.model.id
        rate = lambda load, m: round(load * m.spec.autoscaling.target_decode_tps_per_instance / OUTPUT_TOKENS, 3)  # noqa: E731
        start = time.time()
        took = None
        with PacedLoad(urls[high.spec.name], model, rate(LIGHT, high)) as hi, \
                PacedLoad(urls[low.spec.name], model, rate(BEST_EFFORT, low)) as lo:
            loads = {high.spec.name: hi, low.spec.name: lo}
            progress(f"load: {low.spec.name} {lo.rate:g} req/s all along; {high.spec.name} {hi.rate:g} req/s for 40 s, "
                     f"then {rate(RAMP, high):g} req/s until its second group serves ({OUTPUT_TOKENS} output tokens "
                     "each)")
            time.sleep(40)
            hi.rate = rate(RAMP, high)
            gave = watch.wait(f"{low.spec.name} gave up capacity", lambda st: any(
                p["service"] == low.spec.name for p in st["preemptions"]), 180, progress)
            decided = min((p["t"] for p in watch.last().get("preemptions", []) if p["service"] == low.spec.name),
                          default=None)
            deadline = time.monotonic() + 420
            while gave and serving_decode(high.spec, address) < 2 and time.monotonic() < deadline:
                time.sleep(2)
            if gave and serving_decode(high.spec, address) >= 2 and decided is not None:
                took = round(time.time() - decided, 1)
                progress(f"  {high.spec.name}'s second group serves {took:.0f}s after the preemption decision")
            time.sleep(20)
            hi.rate = rate(FALL, high)
            progress(f"{high.spec.name} falls to {hi.rate:g} req/s: it gives its second group back")
            watch.wait(f"{low.spec.name} back", lambda st: st["services"][low.spec.name]["groups"] and
                       len(st["services"][high.spec.name]["groups"]) == 1, 300, progress)
            deadline = time.monotonic() + 420
            while serving_decode(low.spec, address) < 1 and time.monotonic() < deadline:
                time.sleep(2)
            time.sleep(20)
        watch.stop.set()
        watch.thread.join(timeout=10)
        for name in names:
            log = ray.get(lifecycle.find(name).decision_log.remote(), timeout=60)
            with open(out / f"decisions-{name}.jsonl", "w") as f:
                for d in log:
                    f.write(json.dumps(d) + "\n")
        with open(out / "fleet.jsonl", "w") as f:
            for st in watch.samples:
                f.write(json.dumps(st, default=str) + "\n")
        final = svc.fleet_status(fleet.name, address)
        summary = {
            "fleet": fleet.name, "budget": {"total": fleet.gpu_budget, "by_type": fleet.gpu_budget_by_type},
            "num_preemptions": len(final["preemptions"]), "preemptions": final["preemptions"],
            "budget_exceeded": budget_exceeded(fleet, watch.samples), "preemption_to_serving_s": took,
            "services": {m.spec.name: {"priority": m.priority, "min_decode": m.min_decode,
                                       **loads[m.spec.name].summary(),
                                       "failures": loads[m.spec.name].failures[:10]} for m in fleet.members}}
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        plot(watch.samples, loads, start, out / "timeline.png")
        progress(f"results in {out}/ (timeline.png, fleet.jsonl, decisions-*.jsonl, summary.json)")
        progress(svc.format_fleet_status(final))
        for name, s in summary["services"].items():
            progress(f"  {name}: sent {s['sent']}, ok {s['ok']}, shed {s['shed']} (503/429 + Retry-After), "
                     f"failed {s['failed']}")
        progress(f"  preemptions {summary['num_preemptions']}, budget exceeded: {summary['budget_exceeded']}")
        bad = summary["services"][high.spec.name]["failed"] or summary["services"][low.spec.name]["failed"]
        return 1 if bad or summary["budget_exceeded"] or not summary["num_preemptions"] else 0
    finally:
        try:
            svc.undeploy_fleet(fleet, address)
        finally:
            if started_here:
                local_cluster.down(progress=progress)
