"""Timing candidates on the GPU with CUDA events, through the attention launch module."""

from __future__ import annotations


import math
import statistics

import torch

from ..attention_kernel import block_order, launch_attention
from ..jit import AttentionSpec, get_kernel_on
from ..progress import progress_bar
from ..mask import SliceMask, num_blocks, positive_int, random_topk_mask
from ..timing import queue_lead_cycles
from .keys import DeviceInfo, ProblemKey, _TORCH_DTYPES
from .selection import WRONG_RESULT, Measurement, TuneResult, tune

# Timed work per candidate: enough CTAs for this many full waves (1 CTA/SM) keeps the tail
# (wave quantisation) small against the 3 % margin.
SAMPLE_WAVES = 32
# Relative L2 of a candidate's output against the float32 reference: above this it is wrong.
CHECK_TOLERANCE = {"bfloat16": 2e-2, "float16": 6e-3}


# Measurement on the GPU
# ---------------------------------------------------------------------------------------------
def sample_heads(total_heads: int, q_blocks: int, sm_count: int, waves: int = SAMPLE_WAVES) -> int:
    """Heads to time: enough CTAs for ``waves`` full waves, never more than the problem has."""
    return max(1, min(total_heads, math.ceil(waves * sm_count / max(q_blocks, 1))))


class EventMeasure:
    """Times specs on random q/k/v and a random top-k mask of the key's shape (``plan(spec=)``).

    Each spec is first checked against a float32 reference on one head (a wrong kernel never
    wins), then all are timed in interleaved rounds (order reversed every round) so clock or
    thermal drift does not favour whichever ran first; the result is the median of every rep.
    """

    def __init__(self, key: ProblemKey, device, q_len: int, kv_len: int, heads: int, *, density: float | None = None,
                 warmup: int = 2, rounds: int = 3, reps: int = 5, seed: int = 0, progress=None):
        rounds, reps, heads = (positive_int(name, value) for name, value in
                               (("rounds", rounds), ("reps", reps), ("heads", heads)))
        self.key, self.device = key, torch.device(device)
        self.q_len, self.kv_len, self.heads = q_len, kv_len, heads
        self.density = key.density if density is None else density
        self.warmup, self.rounds, self.reps, self.seed = warmup, rounds, reps, seed
        self.progress = progress or (lambda line: None)

    def workload(self) -> dict:
        return {"heads": self.heads, "q_len": self.q_len, "kv_len": self.kv_len, "density": self.density,
                "reps": self.rounds * self.reps}

    def __call__(self, specs: list[AttentionSpec]) -> dict[AttentionSpec, Measurement]:
        from ..reference import reference_attention, relative_l2

        key, device = self.key, self.device
        dtype = _TORCH_DTYPES[key.dtype]
        results: dict[AttentionSpec, Measurement] = {}
        with torch.cuda.device(device):
            gen = torch.Generator(device=device).manual_seed(self.seed)
            q, k, v = (torch.randn(1, self.heads, n, key.head_dim, generator=gen, device=device, dtype=dtype)
                       for n in (self.q_len, self.kv_len, self.kv_len))
            mask = random_topk_mask(1, self.heads, self.q_len, self.kv_len, key.slice_m, self.density, device, gen)
            keys_per_row = mask.capacity // max(1, mask.heads * mask.q_blocks)
            flops = 4.0 * self.heads * self.q_len * keys_per_row * key.head_dim
            head0 = SliceMask(mask.indptr[:, :1].contiguous(), mask.indices, key.slice_m, self.q_len, self.kv_len)
            ref, _ = reference_attention(q[:, :1], k[:, :1], v[:, :1], head0, rows_per_chunk=2048)
            order = block_order(mask)
            out = torch.empty_like(q)
            scale = 1.0 / math.sqrt(key.head_dim)
            current = []

            def use(spec):
                get_kernel_on(device, spec)
                current[:] = [spec]

            def run():
                launch_attention(current[0], q, k, v, out, None, mask, order, scale)

            good, registers = [], {}
            for i, spec in enumerate(progress_bar(specs, desc="fgcupy autotune: load + check")):
                self.progress(f"  [{i + 1}/{len(specs)}] load + check {spec.name}")
                try:
                    registers[spec] = getattr(get_kernel_on(device, spec), "num_regs", None)
                    use(spec)
                    out.fill_(float("nan"))
                    run()
                    err = relative_l2(out[:, :1].float(), ref)
                except Exception as exc:  # noqa: BLE001 - one bad candidate must not end the tune
                    results[spec] = Measurement(None, note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
                    continue
                if not err <= CHECK_TOLERANCE[key.dtype]:
                    results[spec] = Measurement(None, note=f"{WRONG_RESULT}: rel L2 {err:.2e} vs float32 reference")
                    continue
                for _ in range(self.warmup):
                    run()
                good.append(spec)
            torch.cuda.synchronize(device)
            samples = {s: [] for s in good}
            stream = torch.cuda.current_stream(device)
            bar = progress_bar(total=self.rounds * len(good), desc="fgcupy autotune: timing")
            if good:
                use(good[0])
                lead = queue_lead_cycles(run, self.reps, device)
            for r in range(self.rounds):
                self.progress(f"  round {r + 1}/{self.rounds}: {len(good)} candidates x {self.reps} reps")
                for spec in (good if r % 2 == 0 else good[::-1]):
                    bar.update()
                    use(spec)
                    run()
                    torch.cuda._sleep(lead)  # the reps queue behind it: the events time GPU work alone
                    events = []
                    for _ in range(self.reps):
                        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        start.record(stream)
                        run()
                        stop.record(stream)
                        events.append((start, stop))
                    events[-1][1].synchronize()
                    samples[spec].extend(a.elapsed_time(b) for a, b in events)
            bar.close()
            for spec, times in samples.items():
                ms = statistics.median(times)
                results[spec] = Measurement(ms, flops / (ms * 1e-3) / 1e12, registers=registers.get(spec))
        return results


def tune_on_device(key: ProblemKey, device, q_len: int, kv_len: int, total_heads: int, *,
                   progress=None, **measure_options) -> TuneResult:
    """Tune ``key`` on ``device`` with inputs of length q_len/kv_len over a sample of heads."""
    info = DeviceInfo.of(device)
    heads = sample_heads(total_heads, num_blocks(q_len, key.slice_m), info.sm_count)
    measure = EventMeasure(key, device, q_len, kv_len, heads, progress=progress, **measure_options)
    return tune(key, info, measure, progress=progress, workload=measure.workload())
