"""The paper's metric study (Fig. 2) on the fluid model: candidate scaling signals of a fixed deployment vs load
(`metric_study`), and over a scenario's day, how closely each signal tracks what each role needs
(`signal_quality`: targets from the tuning day, read on the scoring day)."""

from __future__ import annotations

import numpy

from bench.sim.model import Capacity, Scenario, SimService, evaluate, oracle_counts, role_utils

#: The candidate signals of `signal_quality`, per role they would size.
SIGNALS = {"decode": ("decode_tps", "decode_gpu_util"),
           "prefill": ("kv_miss_prefill_tps", "prompt_tps", "decode_tps", "prefill_gpu_util")}


def metric_study(svc: SimService, points: int = 24) -> list[dict]:
    """The paper's Fig. 2 on the model: a fixed deployment (sized for the service's peak) under load from 5 % to
    130 % of that peak; returns each candidate signal per load level."""
    cap = Capacity.of(svc)
    peak = svc.shape.max_rate()
    num_prefill, num_decode = oracle_counts(svc, cap, peak)
    rows = []
    for i in range(points):
        rps = peak * (0.05 + 1.25 * i / (points - 1))
        tick = evaluate(svc, cap, rps, num_prefill, num_decode)
        util_p, sm_p, util_d, sm_d = role_utils(svc, cap, tick, rps, num_prefill, num_decode)
        rows.append({"load_fraction_of_peak": round(rps / peak, 3), "rps": round(rps, 3),
                     "decode_tps": round(tick.decode_tps, 1), "prefill_tps": round(rps * svc.mean_input, 1),
                     "decode_gpu_util": round(util_d, 4), "decode_sm_activity": round(sm_d, 4),
                     "prefill_gpu_util": round(util_p, 4), "prefill_sm_activity": round(sm_p, 4),
                     "ttft_p90_s": round(tick.ttft_p90_s, 4), "tbt_s": round(tick.tbt_s, 5),
                     "instances": {"prefill": num_prefill, "decode": num_decode}})
    return rows


def plot_metric_study(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["load_fraction_of_peak"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(x, [r["decode_tps"] for r in rows], label="decode TPS")
    axes[0].plot(x, [r["prefill_tps"] / 10 for r in rows], label="prefill TPS / 10")
    axes[0].set_title("throughput: linear in load")
    axes[1].plot(x, [r["decode_gpu_util"] for r in rows], label="decode GPU util")
    axes[1].plot(x, [r["decode_sm_activity"] for r in rows], label="decode SM activity")
    axes[1].plot(x, [r["prefill_gpu_util"] for r in rows], label="prefill GPU util")
    axes[1].set_title("hardware: decode util saturates")
    axes[2].plot(x, [min(r["ttft_p90_s"], 10) for r in rows], label="TTFT p90 (s, capped 10)")
    axes[2].plot(x, [r["tbt_s"] * 100 for r in rows], label="TBT (s x 100)")
    axes[2].set_title("latency: flat, then a cliff")
    for ax in axes:
        ax.set_xlabel("load / peak")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _settled(variant, cap, rps: float, p: int, d: int, role: str, target: float) -> float:
    """The size of `role` at which its utilization first falls to `target` (the other role at the oracle's),
    over the oracle's size for that role."""
    need = d if role == "decode" else p
    for n in range(1, 4 * need + 5):
        pair = (p, n) if role == "decode" else (n, d)
        util_p, _, util_d, _ = role_utils(variant, cap, evaluate(variant, cap, rps, *pair), rps, *pair)
        if (util_d if role == "decode" else util_p) <= target:
            return n / need
    return (4 * need + 5) / need


def _signal_series(scenario: Scenario, stride: int, targets: dict | None = None
                   ) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Per service, per "role:signal", (signal / the role's need) at every `stride`-th tick of the day.

    Throughput signals against fractional needs, so rounding does not blur them: decode = output tokens/s
    asked / one decode instance's SLO-feasible tokens/s at this tick's mix; prefill = KV-miss prompt tokens/s /
    one prefill instance's tokens/s at full batching (the instance-seconds of prefill work per second).
    Utilization is a different kind of signal: a controller holding it at a target (HPA) settles where the
    utilization of the size it runs equals the target. Its entry is (the utilization at the oracle's (P, D);
    the weight) on `targets is None` (the tuning day: the target is what the right size reads), else (the
    size at which utilization first falls to the target / the oracle's size) — how far from need it settles."""
    out: dict[str, dict[str, list[tuple[float, float]]]] = {}
    steps = int(scenario.duration_s // scenario.tick_s)
    for svc in scenario.services:
        series: dict[str, list[tuple[float, float]]] = {}
        for i in range(0, steps, stride):
            t = i * scenario.tick_s
            rps = svc.shape.rate(t)
            if rps <= 0:
                continue
            variant, cap = svc.capacities.at(t)
            demand = rps * variant.mean_output
            need_d = demand / cap.cap_decode_tps
            need_p = rps * cap.tau_s  # instance-seconds of prefill per second (tau: the KV misses it computes)
            p, d = oracle_counts(variant, cap, rps)
            tick = evaluate(variant, cap, rps, p, d)
            util_p, _, util_d, _ = role_utils(variant, cap, tick, rps, p, d)
            values = {"decode:decode_tps": demand / need_d,
                      "prefill:kv_miss_prefill_tps": rps * variant.mean_input * variant.kv_miss / need_p,
                      "prefill:prompt_tps": rps * variant.mean_input / need_p,
                      "prefill:decode_tps": demand / need_p}
            if targets is None:
                values.update({"decode:decode_gpu_util": util_d, "prefill:prefill_gpu_util": util_p})
            else:
                own = targets[svc.name]
                values.update({f"{role}:{role}_gpu_util": _settled(variant, cap, rps, p, d, role,
                                                                    own[f"{role}:{role}_gpu_util"])
                               for role in ("decode", "prefill")})
            weight = rps
            for key, value in values.items():
                series.setdefault(key, []).append((value, weight))
        out[svc.name] = series
    return out


def signal_quality(scenario: Scenario, stride: int = 5) -> dict:
    """How closely each candidate signal sizes each role over the scoring day, with each service's target
    (signal per needed instance) taken from the tuning day: per signal, the load-weighted share of ticks the
    target sizes the role below 90 % or above 110 % of its need, and the 10th/90th percentile of size / need.
    A signal whose value per needed instance does not move with the mix sizes right with one target."""
    from bench.sim.days import tuning_and_scoring

    tuning, scoring = tuning_and_scoring(scenario)
    targets = {name: {k: numpy.average([v for v, _ in rows], weights=[w for _, w in rows])
                      for k, rows in series.items()}
               for name, series in _signal_series(tuning, stride).items()}
    pooled: dict[str, list[tuple[float, float]]] = {}
    for name, series in _signal_series(scoring, stride, targets).items():
        for key, rows in series.items():
            settled = key.endswith("_gpu_util")  # already a size over need (`_signal_series`)
            pooled.setdefault(key, []).extend((v if settled else v / targets[name][key], w) for v, w in rows)
    report = {}
    for key, rows in sorted(pooled.items()):
        size = numpy.array([v for v, _ in rows])  # the size the tuning day's target gives, per needed instance
        w = numpy.array([w for _, w in rows])
        order = numpy.argsort(size)
        cum = numpy.cumsum(w[order]) / w.sum()
        q = lambda f: float(size[order][min(len(size) - 1, numpy.searchsorted(cum, f))])  # noqa: E731
        report[key] = {"under_10pct": round(float(w[size < 0.9].sum() / w.sum()), 4),
                       "over_10pct": round(float(w[size > 1.1].sum() / w.sum()), 4),
                       "size_over_need_p10": round(q(0.1), 3), "size_over_need_p90": round(q(0.9), 3)}
    return {"scenario": scenario.name, "tuning_day": tuning.name, "scoring_day": scoring.name, "stride_ticks": stride,
            "signals": report}
