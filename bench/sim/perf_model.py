"""Performance model for the fleet simulator: GPU types, model shapes, roofline prefill/decode times, KV-cache
capacity and transfer, and NVML-style utilization. Pure: no Ray, no clock.

Assumptions (documented here and in docs/design.md):
- Dense BF16 matmul throughput and memory bandwidth from vendor datasheets (sources below), scaled by
  efficiency factors: prefill reaches `compute_eff` of peak FLOP/s, decode reaches `memory_eff` of peak
  bandwidth; each prefill pass pays a fixed `step_overhead_s`, each decode step `decode_step_overhead_s`
  plus `per_sequence_overhead_s` per sequence (kernel launches, scheduling, sampling): these dominate tiny
  models and were fitted on the CPU engine (bench/calibrate_cpu.py); on GPUs the per-sequence term is 0.
- Tensor parallelism splits weights, FLOPs and KV evenly over `tp` GPUs and adds no communication cost.
- A forward pass takes max(compute time, memory time) + overhead (roofline). FLOPs per token = 2 x params
  (linear layers) + 4 x layers x hidden x context (attention scores and values).
- KV bytes per token = 2 (K and V) x layers x kv_heads x head_dim x 2 bytes (BF16). KV capacity = memory x
  `kv_mem_fraction` x tp - weights.
- KV transfer: per-GPU RDMA bandwidth (400 Gb/s NIC per GPU, assumed) inside a domain; 20 % less across
  switch domains (paper: topology-agnostic placement cuts KV bandwidth by about 20 %).
- NVML "GPU utilization" is the fraction of time any kernel runs; "SM activity" weights it by the fraction of
  peak compute achieved. A memory-bound decode instance with any running request keeps kernels running, so it
  shows high utilization at low load (the paper's observation) while its SM activity stays low.

Sources (dense BF16 Tensor Core TFLOP/s, memory bandwidth, memory):
- H100 / H800 SXM5: 989 TFLOP/s, 3.35 TB/s, 80 GB — NVIDIA H100 Tensor Core GPU datasheet (H800 is the
  export variant with the same compute and memory and reduced NVLink).
- H20: 148 TFLOP/s, 4.0 TB/s, 96 GB HBM3 — NVIDIA HGX H20 specifications as reported publicly (e.g.
  SemiAnalysis, "Nvidia's new China AI chips", Nov 2023).
- L20: 119.5 TFLOP/s, 864 GB/s, 48 GB GDDR6 — NVIDIA L20 product specifications (as reported publicly, 2023).
- A100 SXM4 80GB: 312 TFLOP/s, 2.039 TB/s, 80 GB — NVIDIA A100 Tensor Core GPU datasheet.
- L40S: 362 TFLOP/s (733 with sparsity), 864 GB/s, 48 GB GDDR6 — NVIDIA L40S datasheet.
Relative hourly cost (H100 = 1.0) is an assumption for comparing policies, not a quoted price.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

BYTES_BF16 = 2


@dataclass(frozen=True)
class GpuSpec:
    name: str
    bf16_tflops: float  # dense, per GPU
    mem_bw_tbps: float  # TB/s
    mem_gb: float
    relative_cost: float  # per hour, H100 = 1.0 (assumed)
    rdma_gbps: float = 400.0  # per-GPU NIC, Gb/s (assumed)
    compute_eff: float = 0.55  # fraction of peak FLOP/s reached by prefill (assumed, typical 40-60 %)
    memory_eff: float = 0.75  # fraction of peak bandwidth reached by decode (assumed, typical 60-85 %)
    step_overhead_s: float = 0.004  # per prefill pass (assumed)
    decode_step_overhead_s: float | None = None  # per decode step; None = step_overhead_s
    per_sequence_overhead_s: float = 0.0  # per sequence per decode step (sampling, bookkeeping); CPU-fitted


GPUS: dict[str, GpuSpec] = {
    g.name: g for g in (
        GpuSpec("H100", 989.0, 3.35, 80.0, 1.00),
        GpuSpec("H800", 989.0, 3.35, 80.0, 1.00),
        GpuSpec("H20", 148.0, 4.00, 96.0, 0.45),
        GpuSpec("L20", 119.5, 0.864, 48.0, 0.30),
        GpuSpec("A100", 312.0, 2.039, 80.0, 0.55),
        GpuSpec("L40S", 362.0, 0.864, 48.0, 0.40),
    )
}


def register_gpu(spec: GpuSpec) -> None:
    """Add an accelerator to `GPUS` (a calibrated one, e.g. a CPU core in the local demo's twin); the same name
    with other constants is an error."""
    known = GPUS.get(spec.name)
    if known is not None and known != spec:
        raise ValueError(f"GPU type {spec.name!r} is already registered with other constants: {known}")
    GPUS[spec.name] = spec


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int

    @functools.cached_property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @functools.cached_property  # frozen: computed once (the simulator asks per tick)
    def params(self) -> float:
        attn = self.hidden * self.hidden * 2 + self.hidden * self.kv_heads * self.head_dim * 2
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attn + mlp) + 2 * self.vocab * self.hidden

    @functools.cached_property
    def weight_bytes(self) -> float:
        return self.params * BYTES_BF16

    @functools.cached_property
    def kv_bytes_per_token(self) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * BYTES_BF16


MODELS: Mapping[str, ModelShape] = {
    m.name: m for m in (
        ModelShape("llama-8b", layers=32, hidden=4096, heads=32, kv_heads=8, intermediate=14336, vocab=128256),
        ModelShape("llama-70b", layers=80, hidden=8192, heads=64, kv_heads=8, intermediate=28672, vocab=128256),
        # The generated test model the CPU engines serve (heteroscale_ray.tiny_model), for calibration.
        ModelShape("tiny-llama", layers=2, hidden=256, heads=4, kv_heads=2, intermediate=512, vocab=4096),
    )
}


@dataclass(frozen=True)
class Instance:
    """One engine instance: a model on `tp` GPUs of one type."""

    gpu: GpuSpec
    model: ModelShape
    tp: int = 1
    kv_mem_fraction: float = 0.9

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ValueError(f"tp ({self.tp}) must be >= 1")
        if self.kv_capacity_tokens() <= 0:
            raise ValueError(f"{self.model.name} does not fit on {self.tp}x {self.gpu.name} "
                             f"({self.model.weight_bytes / 1e9:.0f} GB of weights, "
                             f"{self.gpu.mem_gb * self.tp * self.kv_mem_fraction:.0f} GB usable)")

    @functools.cached_property
    def flops(self) -> float:
        return self.gpu.bf16_tflops * 1e12 * self.tp

    @functools.cached_property
    def bandwidth(self) -> float:
        return self.gpu.mem_bw_tbps * 1e12 * self.tp

    def kv_capacity_tokens(self) -> int:
        return self._kv_capacity_tokens

    @functools.cached_property
    def _kv_capacity_tokens(self) -> int:
        free = self.gpu.mem_gb * 1e9 * self.tp * self.kv_mem_fraction - self.model.weight_bytes
        return int(free // self.model.kv_bytes_per_token)

    def _flops(self, new_tokens: float, attended_tokens: float) -> float:
        m = self.model
        return 2 * m.params * new_tokens + 4 * m.layers * m.hidden * attended_tokens

    def prefill_time_s(self, prompt_lengths: Sequence[int]) -> tuple[float, float]:
        """(seconds, compute fraction) for one prefill pass over these prompts (uncached tokens only)."""
        tokens = sum(prompt_lengths)
        if tokens == 0:
            return 0.0, 0.0
        attended = sum(n * (n + 1) / 2 for n in prompt_lengths)
        compute = self._flops(tokens, attended) / (self.flops * self.gpu.compute_eff)
        memory = (self.model.weight_bytes + tokens * self.model.kv_bytes_per_token) / (
            self.bandwidth * self.gpu.memory_eff)
        busy = max(compute, memory)
        return busy + self.gpu.step_overhead_s, compute / (busy + self.gpu.step_overhead_s)

    def decode_step_time_s(self, context_lengths: Sequence[int]) -> tuple[float, float]:
        """(seconds, compute fraction) for one decode step of a batch with these context lengths."""
        batch = len(context_lengths)
        if batch == 0:
            return 0.0, 0.0
        kv_read = sum(context_lengths) * self.model.kv_bytes_per_token
        memory = (self.model.weight_bytes + kv_read) / (self.bandwidth * self.gpu.memory_eff)
        compute = self._flops(batch, sum(context_lengths)) / (self.flops * self.gpu.compute_eff)
        busy = max(compute, memory)
        fixed = self.gpu.step_overhead_s if self.gpu.decode_step_overhead_s is None else self.gpu.decode_step_overhead_s
        total = busy + fixed + batch * self.gpu.per_sequence_overhead_s
        return total, compute / total

    def decode_step_kernels(self, context_lengths: Sequence[int]) -> tuple[float, float]:
        """(kernel-busy share, compute share) of one decode step's wall time: the GPU runs kernels for
        max(compute, memory) of it; the fixed and per-sequence overheads (scheduling, launches, sampling on the
        CPU) leave it idle, which is what NVML's utilization and DCGM's SM activity see."""
        batch = len(context_lengths)
        if batch == 0:
            return 0.0, 0.0
        total, compute_share = self.decode_step_time_s(context_lengths)
        kv_read = sum(context_lengths) * self.model.kv_bytes_per_token
        memory = (self.model.weight_bytes + kv_read) / (self.bandwidth * self.gpu.memory_eff)
        busy = max(compute_share * total, memory)
        return busy / total, compute_share

    def decode_tps(self, batch: int, context: int) -> float:
        """Steady decode tokens/s of this instance at a batch size and mean context length."""
        step, _ = self.decode_step_time_s([context] * batch)
        return batch / step

    def max_decode_batch(self, context: int) -> int:
        return max(1, self.kv_capacity_tokens() // max(context, 1))


def kv_transfer_time_s(model: ModelShape, tokens: int, gpu: GpuSpec, tp: int = 1, cross_domain: bool = False
                       ) -> float:
    """Time to move `tokens` of KV cache from a prefill to a decode instance over RDMA."""
    bandwidth = gpu.rdma_gbps / 8 * 1e9 * tp * (0.8 if cross_domain else 1.0)
    return tokens * model.kv_bytes_per_token / bandwidth


def nvml_utilization(busy_fraction: float, compute_fraction: float) -> tuple[float, float]:
    """(GPU utilization, SM activity) over an interval: utilization is the time any kernel runs; SM activity
    weights it by how much of peak compute those kernels use."""
    busy = min(max(busy_fraction, 0.0), 1.0)
    return busy, busy * min(max(compute_fraction, 0.0), 1.0)


def saturation_decode_tps(instance: Instance, context: int, tbt_slo_s: float) -> float:
    """Highest decode tokens/s an instance sustains with steps no slower than the TBT SLO (stress-test proxy)."""
    best = 0.0
    for batch in range(1, instance.max_decode_batch(context) + 1):
        step, _ = instance.decode_step_time_s([context] * batch)
        if step > tbt_slo_s:
            break
        best = batch / step
    return best


def fit_overhead(measured: Mapping[int, float], instance_step) -> float:
    """Least-squares fixed overhead so that model(batch) + overhead matches measured step times (calibration)."""
    residuals = [t - instance_step(b) for b, t in measured.items()]
    return max(0.0, sum(residuals) / len(residuals)) if residuals else 0.0


def relative_error(predicted: float, measured: float) -> float:
    return abs(predicted - measured) / measured if measured else math.inf
