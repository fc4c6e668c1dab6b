"""Schedules as data (pure: no torch, no MPI).

The workload is cut into *groups* of prompts (micro-batches). `slots` groups are in flight
at once; slot j serves groups j, j + slots, j + 2 * slots, ... one after another, each for
`steps` token steps (step 0 = prefill of the prompt, step k = decode of token k). A slot's
*iteration* `it` counts its steps across its groups.

Each rank gets an ordered list of actions:
  recv    (stage s, slot, it): the input of compute(s, slot, it) arrives; for s = 0 it is
          the token of (slot, it - 1) coming back from the last stage.
  compute (stage s, slot, it)
  send    (stage s, slot, it): the output goes to stage s + 1, or, from the last stage,
          the sampled token goes back to the source (stage 0).

Every rank sorts its actions by one global key (it, stage, slot, phase); since every
dependency of an action has a smaller key, any set of ranks following these lists, with
receives posted early and non-blocking sends, cannot deadlock. The two orders of the
EdgeShard paper (Fig. 5) differ only at the source:
  no-bubbles: a slot starts its next step as soon as its own token is back;
  bubbles:    the source waits for the tokens of every slot before starting the next step.
"""

from __future__ import annotations

from dataclasses import dataclass

ORDERS = ("no-bubbles", "bubbles")
RECV, COMPUTE, SEND = "recv", "compute", "send"


@dataclass(frozen=True)
class Shape:
    """How the workload is cut."""

    groups: int
    """Micro-batches of prompts in the whole workload."""
    slots: int
    """Micro-batches in flight (1 = sequential inference)."""
    steps: int
    """Token steps per group: the number of new tokens."""

    def __post_init__(self):
        if min(self.groups, self.slots, self.steps) < 1:
            raise ValueError(f"bad schedule shape {self}")

    def slot_groups(self, slot: int) -> int:
        return len(range(slot, self.groups, self.slots))

    def iterations(self, slot: int) -> int:
        return self.slot_groups(slot) * self.steps

    def group_step(self, slot: int, it: int) -> tuple[int, int]:
        """(group index, token step) of a slot's iteration."""
        return slot + self.slots * (it // self.steps), it % self.steps

    @property
    def active_slots(self) -> int:
        return min(self.slots, self.groups)


@dataclass(frozen=True)
class Action:
    op: str
    stage: int
    slot: int
    it: int

    def __str__(self) -> str:
        return f"{self.op[0].upper()}{self.stage}.{self.slot}.{self.it}"


def build(
    stage_ranks: list[int] | tuple[int, ...], shape: Shape, order: str = "no-bubbles"
) -> dict[int, list[Action]]:
    """Per-rank ordered actions for a chain of stages (stage_ranks[s] runs stage s)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    keyed: dict[int, list[tuple[tuple, Action]]] = {r: [] for r in stage_ranks}
    for slot in range(shape.active_slots):
        n_it = shape.iterations(slot)
        for it in range(n_it + 1):
            if it > 0:
                # The token of (slot, it - 1) returns to the source. In bubbles order the
                # source collects every slot's token before it starts step `it`.
                key = (it, -1 if order == "bubbles" else 0, slot, 0)
                keyed[stage_ranks[0]].append((key, Action(RECV, 0, slot, it - 1)))
            if it == n_it:
                break
            for s, rank in enumerate(stage_ranks):
                if s > 0:
                    keyed[rank].append(((it, s, slot, 0), Action(RECV, s, slot, it)))
                keyed[rank].append(((it, s, slot, 1), Action(COMPUTE, s, slot, it)))
                keyed[rank].append(((it, s, slot, 2), Action(SEND, s, slot, it)))
    return {r: [a for _, a in sorted(items, key=lambda x: x[0])] for r, items in keyed.items()}


def peer(action: Action, stage_ranks) -> int:
    """The rank at the other end of a recv or send."""
    last = len(stage_ranks) - 1
    if action.op == RECV:
        return stage_ranks[last] if action.stage == 0 else stage_ranks[action.stage - 1]
    if action.op == SEND:
        return stage_ranks[0] if action.stage == last else stage_ranks[action.stage + 1]
    raise ValueError("compute has no peer")


def channel(action: Action, n_stages: int, slots: int) -> int:
    """The MPI tag of the message a recv/send moves: one channel per (receiving stage,
    slot). Messages on a channel arrive in order (MPI's non-overtaking rule)."""
    if action.op == RECV:
        dst = action.stage
    else:
        dst = 0 if action.stage == n_stages - 1 else action.stage + 1
    return dst * slots + action.slot


class Deadlock(RuntimeError):
    pass


@dataclass(frozen=True)
class SimResult:
    makespan: float
    """Seconds from the first action to the last."""
    busy: dict
    """Compute seconds per rank."""
    token_time: dict
    """(slot, it) -> when that token reached the source."""
    start: dict
    """(rank, index) -> start time of each action, for grids and tests."""

    def idle(self, rank: int) -> float:
        return self.makespan - self.busy.get(rank, 0.0)


def simulate(
    stage_ranks,
    shape: Shape,
    order: str,
    compute_s,
    hop_s,
    actions: dict[int, list[Action]] | None = None,
) -> SimResult:
    """Replay every rank's action list with modelled costs.

    compute_s(stage, step) -> seconds of one compute (step 0 = prefill);
    hop_s(src_rank, dst_rank, stage, step) -> seconds for that message to arrive (the
    token's return is asked for with stage = the last stage), or (seconds the link is
    busy with it, seconds until it arrives): a link carries its next message once this
    one's bytes are through, without waiting out its latency.
    Sends are non-blocking; messages on one link queue behind each other. Raises Deadlock
    if no rank can move while some still have work, which also proves, when it does not
    raise, that the lists are deadlock-free for any positive costs of the same order.
    `actions` replaces the built lists (to check hand-made ones).
    """
    if actions is None:
        actions = build(stage_ranks, shape, order)
    pc = dict.fromkeys(actions, 0)
    clock = dict.fromkeys(actions, 0.0)
    busy = dict.fromkeys(actions, 0.0)
    arrivals: dict[tuple, float] = {}  # (dst stage, slot, it) -> arrival time
    link_free: dict[tuple[int, int], float] = {}
    token_time, start = {}, {}
    n_stages = len(stage_ranks)
    remaining = sum(len(a) for a in actions.values())
    while remaining:
        moved = False
        for rank, acts in actions.items():
            while pc[rank] < len(acts):
                a = acts[pc[rank]]
                _, step = shape.group_step(a.slot, a.it)
                t = clock[rank]
                if a.op == RECV:
                    key = (a.stage, a.slot, a.it)
                    if key not in arrivals:
                        break
                    t = max(t, arrivals.pop(key))
                    if a.stage == 0:
                        token_time[(a.slot, a.it)] = t
                elif a.op == COMPUTE:
                    d = compute_s(a.stage, step)
                    busy[rank] += d
                    t += d
                else:
                    dst = peer(a, stage_ranks)
                    dst_stage, dst_it = (
                        (0, a.it) if a.stage == n_stages - 1 else (a.stage + 1, a.it)
                    )
                    if dst == rank:
                        arrival = t
                    else:
                        begin = max(t, link_free.get((rank, dst), 0.0))
                        h = hop_s(rank, dst, a.stage, step)
                        busy_s, delay_s = h if isinstance(h, tuple) else (h, h)
                        arrival = begin + delay_s
                        link_free[(rank, dst)] = begin + busy_s
                    arrivals[(dst_stage, a.slot, dst_it)] = arrival
                start[(rank, pc[rank])] = clock[rank]
                clock[rank] = t
                pc[rank] += 1
                remaining -= 1
                moved = True
        if not moved:
            stuck = {r: str(acts[pc[r]]) for r, acts in actions.items() if pc[r] < len(acts)}
            raise Deadlock(f"no rank can move; waiting: {stuck}")
    return SimResult(max(clock.values()), busy, token_time, start)


def grid(
    stage_ranks,
    shape: Shape,
    order: str,
    compute_s=None,
    hop_s=None,
    tick: float | None = None,
    width: int = 120,
) -> str:
    """A time x rank chart of the schedule: each cell is one `tick` (default: the shortest
    compute); Pj / Dj = prefill / decode of the micro-batch in slot j, '.' = idle.
    Without costs every compute takes 1 and messages are free (the textbook picture)."""
    compute_s = compute_s or (lambda stage, step: 1.0)
    hop_s = hop_s or (lambda src, dst, stage, step: 0.0)
    actions = build(stage_ranks, shape, order)
    sim = simulate(stage_ranks, shape, order, compute_s, hop_s, actions)
    if tick is None:
        tick = min(compute_s(s, k) for s in range(len(stage_ranks)) for k in (0, 1)) or 1.0
    cols = min(width, round(sim.makespan / tick))
    cell = 2 + len(str(shape.slots - 1))
    lines = []
    for rank in sorted(actions):
        row = ["." * cell] * cols
        for i, a in enumerate(actions[rank]):
            if a.op != COMPUTE:
                continue
            _, step = shape.group_step(a.slot, a.it)
            t0 = sim.start[(rank, i)]
            c0 = round(t0 / tick)
            c1 = max(c0 + 1, round((t0 + compute_s(a.stage, step)) / tick))
            label = f"{'P' if step == 0 else 'D'}{a.slot}".ljust(cell)
            for c in range(c0, min(c1, cols)):
                row[c] = label
        lines.append(f"rank {rank:<3}|" + "".join(row))
    idle = {r: sim.idle(r) for r in sorted(actions)}
    lines.append(
        f"makespan {sim.makespan / tick:g} ticks; idle per rank: "
        + ", ".join(f"r{r} {v / tick:g}" for r, v in idle.items())
        + ("" if cols * tick >= sim.makespan else f" (chart cut at {cols} ticks)")
    )
    return "\n".join(lines)
