"""Hostfiles (MPICH and Open MPI formats) and device descriptions."""

import pytest

from edgeshard_mpi.cluster import (
    HostfileError,
    block_placement,
    describe_devices,
    parse_hostfile,
)
from tests.conftest import ROOT


def test_shipped_hostfiles_parse():
    fmt, entries = parse_hostfile(ROOT / "hostfiles" / "localhost.hydra")
    assert fmt == "mpich" and entries[0].host == "localhost" and entries[0].slots == 4
    fmt, entries = parse_hostfile(ROOT / "hostfiles" / "localhost.openmpi")
    assert fmt == "openmpi" and entries[0].slots == 4


@pytest.mark.parametrize(
    "text, fmt, hosts",
    [
        ("a:2\nb:1  # gpu server\n", "mpich", ["a", "a", "b"]),
        ("a slots=2\nb slots=1 max_slots=4\n", "openmpi", ["a", "a", "b"]),
        ("# comment only line\nnode-1\nnode-2\n", "either", ["node-1", "node-2"]),
    ],
)
def test_hostfile_formats(tmp_path, text, fmt, hosts):
    f = tmp_path / "hosts"
    f.write_text(text)
    got_fmt, entries = parse_hostfile(f)
    assert got_fmt == fmt
    assert block_placement(entries, len(hosts)) == hosts


@pytest.mark.parametrize(
    "text, words",
    [
        ("a:2\nb slots=2\n", "mixes"),
        ("a slots=2 cpus=4\n", "unknown option"),
        ("a:0\n", "at least one slot"),
        ("a b c\n", "cannot read"),
        ("\n# nothing\n", "lists no hosts"),
    ],
)
def test_bad_hostfiles(tmp_path, text, words):
    f = tmp_path / "hosts"
    f.write_text(text)
    with pytest.raises(HostfileError, match=words):
        parse_hostfile(f)


def test_too_many_ranks_for_slots(tmp_path):
    f = tmp_path / "hosts"
    f.write_text("a:2\n")
    with pytest.raises(HostfileError, match="3 ranks but the hostfile has 2 slots"):
        block_placement(parse_hostfile(f)[1], 3)


def _view(host, cores=2.0, mem_limit=None, avail=8 * 2**30, mem_group="/", cpu_group="/"):
    return {
        "host": host,
        "cores": cores,
        "mem_limit": mem_limit,
        "mem_available": avail,
        "mem_group": mem_group,
        "cpu_group": cpu_group,
        "rss": 0,
    }


def test_devices_share_host_resources():
    views = [_view("a"), _view("a"), _view("a"), _view("b", cores=8.0)]
    devs = describe_devices(views, 0, {}, {}, ["cpu"] * 4, [None] * 4)
    assert [d.threads for d in devs] == [1, 1, 1, 8]  # 2 cores / 3 ranks -> 1 thread
    assert devs[0].memory_budget == 8 * 2**30 // 3 and devs[0].memory_source == "meminfo"
    assert devs[3].memory_budget == 8 * 2**30 and devs[3].local_size == 1


def test_devices_budget_precedence():
    views = [
        _view("a", mem_limit=2**30, mem_group="/dev0", cpu_group="/dev0"),
        _view("a", mem_limit=2**31, mem_group="/dev1", cpu_group="/dev1"),
        _view("c"),
    ]
    devs = describe_devices(
        views, 3, {2: 5000}, {0: "source"}, ["cpu", "cpu", "GPU-X"], [None, None, None]
    )
    assert devs[0].memory_budget == 2**30 and devs[0].memory_source == "cgroup"
    assert devs[1].memory_budget == 2**31  # own cgroup: not shared with rank 0
    assert devs[2].memory_budget == 5000 and devs[2].memory_source == "job"
    assert devs[0].name == "source" and devs[1].name == "a/r1"
    assert all(d.threads == 3 for d in devs)
