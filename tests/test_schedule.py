"""Schedules: action lists for both orders, and deadlock freedom (pure, no MPI)."""

import itertools

import pytest

from edgeshard_mpi import schedule as sch


def test_sequential_single_rank_is_compute_send_recv():
    acts = sch.build([0], sch.Shape(groups=1, slots=1, steps=3))[0]
    assert [str(a) for a in acts] == [
        "C0.0.0",
        "S0.0.0",
        "R0.0.0",
        "C0.0.1",
        "S0.0.1",
        "R0.0.1",
        "C0.0.2",
        "S0.0.2",
        "R0.0.2",
    ]


def test_orders_differ_only_at_the_source():
    shape = sch.Shape(groups=2, slots=2, steps=2)
    nb = sch.build([0, 1, 2], shape, "no-bubbles")
    bb = sch.build([0, 1, 2], shape, "bubbles")
    assert nb[1] == bb[1] and nb[2] == bb[2]
    assert [str(a) for a in nb[0]] == [
        "C0.0.0",
        "S0.0.0",
        "C0.1.0",
        "S0.1.0",
        "R0.0.0",
        "C0.0.1",
        "S0.0.1",
        "R0.1.0",
        "C0.1.1",
        "S0.1.1",
        "R0.0.1",
        "R0.1.1",
    ]
    assert [str(a) for a in bb[0]] == [
        "C0.0.0",
        "S0.0.0",
        "C0.1.0",
        "S0.1.0",
        "R0.0.0",
        "R0.1.0",
        "C0.0.1",
        "S0.0.1",
        "C0.1.1",
        "S0.1.1",
        "R0.0.1",
        "R0.1.1",
    ]


def test_slots_serve_groups_in_turn():
    shape = sch.Shape(groups=5, slots=2, steps=3)
    assert shape.slot_groups(0) == 3 and shape.slot_groups(1) == 2
    assert shape.group_step(1, 4) == (3, 1)
    assert shape.iterations(0) == 9


def test_channels_are_unique_per_receiving_stage_and_slot():
    ranks = [0, 1, 0, 2]  # a device may recur (the paper's Algorithm 1 allows it)
    shape = sch.Shape(groups=3, slots=3, steps=2)
    tags = {}
    for acts in sch.build(ranks, shape).values():
        for a in acts:
            if a.op != sch.COMPUTE:
                tag = sch.channel(a, len(ranks), shape.slots)
                dst_stage = a.stage if a.op == sch.RECV else (a.stage + 1) % len(ranks)
                assert tags.setdefault(tag, (dst_stage, a.slot)) == (dst_stage, a.slot)


@pytest.mark.parametrize("ranks", [[0], [0, 1], [0, 1, 2, 3], [0, 1, 0], [0, 2, 1, 2, 0]])
@pytest.mark.parametrize("order", sch.ORDERS)
@pytest.mark.parametrize("groups, slots", [(1, 1), (3, 1), (4, 2), (5, 3), (2, 4)])
def test_every_schedule_completes(ranks, order, groups, slots):
    shape = sch.Shape(groups=groups, slots=slots, steps=3)
    res = sch.simulate(ranks, shape, order, lambda s, k: 1.0 + s, lambda a, b, s, k: 0.5)
    for slot in range(shape.active_slots):
        assert all((slot, it) in res.token_time for it in range(shape.iterations(slot)))


def test_receives_match_sends_one_to_one():
    ranks, shape = [0, 1, 2], sch.Shape(groups=3, slots=2, steps=4)
    acts = sch.build(ranks, shape)
    sends = sorted(
        (sch.peer(a, ranks), sch.channel(a, 3, 2), a.it)
        for r, al in acts.items()
        for a in al
        if a.op == sch.SEND
    )
    recvs = sorted(
        (r, sch.channel(a, 3, 2), a.it) for r, al in acts.items() for a in al if a.op == sch.RECV
    )
    assert sends == recvs


def test_reordered_lists_deadlock_is_detected():
    shape = sch.Shape(groups=1, slots=1, steps=2)
    acts = sch.build([0, 1], shape)
    bad = {0: acts[0][2:] + acts[0][:2], 1: acts[1]}  # source waits for a token first
    with pytest.raises(sch.Deadlock, match="no rank can move"):
        sch.simulate([0, 1], shape, "no-bubbles", lambda s, k: 1, lambda *a: 1, actions=bad)


def test_sequential_makespan_is_sum_of_costs():
    ranks, shape = [0, 1, 2], sch.Shape(groups=2, slots=1, steps=3)
    res = sch.simulate(ranks, shape, "no-bubbles", lambda s, k: 2.0, lambda *a: 0.25)
    # per token: 3 computes of 2 s + 3 hops (two forward, one home) of 0.25 s
    assert res.makespan == pytest.approx(2 * 3 * (3 * 2.0 + 3 * 0.25))


def test_a_link_carries_the_next_message_once_the_bytes_are_through():
    """hop_s may give (link busy, arrival): a long latency delays each message but does
    not hold the link, so micro-batches in flight are not spaced by it; a float is both."""
    ranks, shape = [0, 1], sch.Shape(groups=4, slots=4, steps=1)
    compute = lambda s, k: 0.001  # noqa: E731
    both = sch.simulate(ranks, shape, "no-bubbles", compute, lambda *a: 1.0)
    split = sch.simulate(ranks, shape, "no-bubbles", compute, lambda *a: (0.01, 1.0))
    # 4 micro-batches: held links space them 1 s apart each way; free ones 0.01 s
    assert both.makespan > 4.0
    assert split.makespan == pytest.approx(2 * 1.0 + 4 * 0.01 + 0.002, abs=0.01)


def test_all_orders_and_shapes_keep_token_order():
    for slots, order in itertools.product((1, 2, 3), sch.ORDERS):
        shape = sch.Shape(groups=3, slots=slots, steps=4)
        res = sch.simulate([0, 1], shape, order, lambda s, k: 1.0, lambda *a: 0.1)
        for slot in range(shape.active_slots):
            times = [res.token_time[(slot, it)] for it in range(shape.iterations(slot))]
            assert times == sorted(times)
