"""The paper's metric study (Fig. 2) on the fluid model: candidate scaling signals of a fixed deployment vs load."""

from __future__ import annotations

from bench.sim.model import Capacity, SimService, evaluate, oracle_counts, role_utils


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
