"""Sequence-pass profiling: time every unit inside whole generations, the way a run calls it.

The unit-by-unit profile (profile.py, method "units") loads each unit as a Stage of its
own and times it alone, after a cache flush, at one mid-generation decode step with warm
mask and rotary tables. A run calls one Stage over many units once per token, its layers
back to back, at a new position every step. Timing each unit alone and cold read 1.15-1.25x
what the run then computed (README, "Prediction fidelity"), so this profiler times what
the run does instead:

- the units a rank holds at once (a memory group, split where the sampled units are not
  consecutive) are loaded as ONE Stage with the run's kernels (kernels.load_stage);
- that Stage generates whole sequences: a prefill of `prompt` tokens, then one decode step
  per new token at the run's positions, with the run's cache and per-step bookkeeping
  (masks and rotary tables are built anew each step, as the run does);
- forward hooks mark where each unit starts and ends inside the pass; a unit's share is its
  time between its marks (CPU x slowdown on an emulated device, wall time on real
  hardware); the call itself is charged as the run charges it (emulation.charged), and
  its time is shared out over its units in proportion: what the call spends outside every
  unit (masks, rotary tables, the Python around the layers) is counted, and a preemption
  is counted once per call, not once per unit, so the units of a stage sum to its call;
- no sleep after a call on an emulated device (the run sleeps the dilation): sleeping
  made the profiled speeds 1.07-1.25x slower than the configured shares (see README,
  "Wake-up cost and idle polling"); wake_cost below prices a wait before a call;
- caches are flushed once per token (other stages run between a stage's visits in a run),
  not once per unit;
- decode: the mean over up to STEPS steps spread over the generation (what a token costs
  on average, the mix the prediction uses); prefill: the prefill's time. Each is the
  median over `repeats` generations after `warmup` untimed ones.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from . import emulation
from .comm import IDLE_WAKE_S
from .kernels import load_stage
from .model import Stage, first_position, position_ids

STEPS = 8


def _segments(units: list[int]) -> list[list[int]]:
    """Runs of consecutive unit numbers: each becomes one Stage."""
    out: list[list[int]] = []
    for u in units:
        if out and u == out[-1][-1] + 1:
            out[-1].append(u)
        else:
            out.append([u])
    return out


class _Marks:
    """Charged time per unit inside one stage call, from forward hooks."""

    def __init__(self, stage, units: list[int]):
        self.units = units
        self.spent = dict.fromkeys(units, 0.0)
        self.handles = []
        self._t0 = self._c0 = 0.0
        mods: list[tuple[int, torch.nn.Module, torch.nn.Module]] = []
        k = 0
        if stage.has_embed:
            mods.append((units[k], stage.embed_tokens, stage.embed_tokens))
            k += 1
        for layer in stage.layers:
            mods.append((units[k], layer, layer))
            k += 1
        if stage.has_head:
            mods.append((units[k], stage.norm, stage.lm_head))
        for u, first, last in mods:
            self.handles.append(first.register_forward_pre_hook(self._start))
            self.handles.append(last.register_forward_hook(self._end(u)))

    def _start(self, *_):
        self._t0, self._c0 = time.perf_counter(), emulation.cpu_now()

    def _end(self, u: int):
        def hook(*_):
            # Inside the call, only the unit's share: its CPU time (emulated) or wall time
            # (real hardware). The call as a whole is charged as the run charges it.
            if emulation.MODE == "none":
                self.spent[u] += time.perf_counter() - self._t0
            else:
                self.spent[u] += (emulation.cpu_now() - self._c0) * emulation.SLOWDOWN

        return hook

    def reset(self) -> None:
        for u in self.units:
            self.spent[u] = 0.0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _sync(device) -> None:
    if getattr(device, "type", "cpu") == "cuda":
        torch.cuda.synchronize(device)


def time_segment(
    stage, units: list[int], batch: int, prompt: int, new_tokens: int,
    warmup: int, repeats: int, device, flush,
) -> tuple[dict[int, float], dict[int, float]]:  # fmt: skip
    """({unit: prefill s}, {unit: mean decode s per step}) of a stage over consecutive
    units, measured inside whole generations."""
    spec = stage.spec
    context = prompt + max(new_tokens, 1)
    cache = stage.new_cache(batch, context)
    marks = _Marks(stage, units)
    if stage.has_embed:
        pre_in = torch.randint(3, spec.vocab_size, (batch, prompt), device=device)
    else:
        pre_in = torch.randn(batch, prompt, spec.hidden_size, dtype=stage.dtype, device=device)
    dec_in = pre_in[:, :1].contiguous()
    # Decode steps spread over the generation (at most STEPS of them: the cache is rewound
    # to each one's length, so a long generation costs no more to profile).
    steps = sorted({round(float(x)) for x in np.linspace(1, max(new_tokens - 1, 1), STEPS)})
    positions = {s: position_ids(batch, prompt, s).to(device) for s in [0, *steps]}

    def call(x, step: int) -> tuple[dict[int, float], float]:
        """Per-unit charged time of one stage call, and the call's own charged time."""
        marks.reset()
        flush()
        t0, c0 = time.perf_counter(), emulation.cpu_now()
        stage(x, cache, positions[step], first_position(prompt, step))
        _sync(device)
        whole = emulation.charged(t0, c0)
        return dict(marks.spent), whole

    def spread(parts: dict[int, float], whole: float) -> dict[int, float]:
        # The units sum to the call: what the call spent outside them is shared out, and
        # a preemption is charged once per call as the run's stretch charges it, not once
        # per unit (charging each unit max(wall, CPU / share) read 1.2x the run's call).
        inside = sum(parts.values())
        scale = whole / inside if inside > 0 else 1.0
        return {u: t * scale for u, t in parts.items()}

    pre_runs, dec_runs = [], []
    try:
        with torch.inference_mode():
            for rep in range(warmup + repeats):
                if cache is not None:
                    cache.reset()
                pre = spread(*call(pre_in, 0))
                dec = {u: 0.0 for u in units}
                for s in steps:
                    if cache is not None:
                        Stage.rewind(cache, prompt + s - 1)
                    for u, t in spread(*call(dec_in, s)).items():
                        dec[u] += t / len(steps)
                if rep >= warmup:
                    pre_runs.append(pre)
                    dec_runs.append(dec)
    finally:
        marks.remove()
    med_pre = {u: float(np.median([r[u] for r in pre_runs])) for u in units}
    med_dec = {u: float(np.median([r[u] for r in dec_runs])) for u in units}
    return med_pre, med_dec


def measure_groups(
    spec, source, dtype: str, device, groups: list[list[int]], budget: float,
    batch_sizes: list[int], prompt: int, new_tokens: int, warmup: int, repeats: int,
    flush, kernels: str, pre: np.ndarray, dec: np.ndarray, log=None,
) -> None:  # fmt: skip
    """Fill pre/dec [len(batch_sizes), N] for every unit of `groups` (memory groups)."""
    for group in groups:
        fits = [u for u in group if spec.unit_weight_bytes(u, dtype) <= budget / 2]
        for seg in _segments(fits):
            stage = load_stage(spec, seg[0], seg[-1] + 1, dtype, device, source, kernels)
            for bi, b in enumerate(batch_sizes):
                p, d = time_segment(
                    stage, seg, b, prompt, new_tokens, warmup, repeats, device, flush
                )
                for u in seg:
                    pre[bi, u], dec[bi, u] = p[u], d[u]
            del stage
        if log is not None:
            log(f"units {group[0]}..{group[-1]} timed in sequence passes")


# -- the cost of waking up ------------------------------------------------------------------

WAKE_GAP_S = 0.25
"""How long a stage waits for its input in the wake-up measurement: a run's stage waits
for the rest of the token's chain, 30-300 ms on `small`, 0.1-3 s on `paper`. The cost
grows with the wait (measured in a testbed cgroup, mini-7b, CPU ms over a flushed call:
one layer +0.23 / +0.45 / +0.48 after 20 / 300 / 1000 ms, four layers +0.22 / +0.55 /
+1.0) and levels off past a few hundred ms; 20 ms (the first choice) saw half of it."""
WAKE_CALLS = 5


def _idle(seconds: float, stream=None) -> None:
    """Wait as a run's stage waits for its input: asleep (an unrung doorbell wait wakes
    every IDLE_WAKE_S at most: wakeup.py), while other stages compute. `stream`, when
    given, is called over and over on a second thread meanwhile (a flush: another stage
    streaming its weights through the shared caches and memory, as the run's other ranks
    do)."""
    done = threading.Event()
    worker = None
    if stream is not None:

        def busy() -> None:
            while not done.is_set():
                stream()  # torch releases the GIL while it reads

        worker = threading.Thread(target=busy, daemon=True)
        worker.start()
    end = time.perf_counter() + seconds
    try:
        while (left := end - time.perf_counter()) > 0:
            time.sleep(min(left, IDLE_WAKE_S))
    finally:
        done.set()
        if worker is not None:
            worker.join()


def wake_cost(
    spec, source, dtype: str, device, budget: float, flush, kernels: str, unit: int | None = None
) -> float:
    """Charged seconds a stage call costs more after waiting for its input, as every stage
    of a multi-stage run does once per token, than right after a cache flush, as the
    sequence pass times it. The wait is the run's: WAKE_GAP_S asleep while other work
    streams memory (_idle). First measured (mini-7b, one layer, CPU time): 0.33 ms back to
    back, 0.66 after a flush, 0.93 / 1.43 after sleeping 5 / 40 ms, 1.09 after spinning
    40 ms (other work on the host evicts what a flush leaves: predictors, TLB, the other
    core's caches after a migration); a wait of 20 ms with nothing else running (the
    first version) charged a third to a half of what the run's stages then paid (README,
    "Stages after a wait"). The planner charges it with the hop into the device
    (profile.py adds it to latency_s). `unit`: the one timed, a decoder layer by default;
    unit 0 prices a source stage that only looks up the embedding (profile.py). 0 when
    the unit does not fit in half the budget."""
    if unit is None:
        unit = 1 if spec.n_units > 2 else 0
    if spec.unit_weight_bytes(unit, dtype) > budget / 2:
        return 0.0
    stage = load_stage(spec, unit, unit + 1, dtype, device, source, kernels)
    prompt, calls = 8, 2 * WAKE_CALLS + 2
    cache = stage.new_cache(1, prompt + calls + 1)
    if stage.has_embed:
        x = torch.randint(3, spec.vocab_size, (1, prompt), device=device)
    else:
        x = torch.randn(1, prompt, spec.hidden_size, dtype=stage.dtype, device=device)
    flushed, woken = [], []
    with torch.inference_mode():
        stage(x, cache, position_ids(1, prompt, 0).to(device), first_position(prompt, 0))
        x = x[:, :1].contiguous()
        for i in range(calls):
            waited = i % 2 == 1
            if waited:
                _idle(WAKE_GAP_S, flush if getattr(flush, "buf", None) is not None else None)
            else:
                flush()
            t0, c0 = time.perf_counter(), emulation.cpu_now()
            pos = position_ids(1, prompt, i + 1).to(device)
            stage(x, cache, pos, first_position(prompt, i + 1))
            _sync(device)
            (woken if waited else flushed).append(emulation.charged(t0, c0))
    del stage
    return max(0.0, float(np.median(woken[1:]) - np.median(flushed[1:])))
