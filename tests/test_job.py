"""Job file parsing: every mistake names the field and how to fix it."""

from pathlib import Path

import pytest

from edgeshard_mpi.job import JobError, parse_bytes, parse_job
from edgeshard_mpi.presets import PRESETS

TINY = PRESETS["tiny"]  # 6 units


def parse(text: str, tmp_path: Path = Path("/tmp")):
    return parse_job(text, tmp_path / "job.toml")


def test_minimal_job_defaults():
    job = parse('[model]\nsource = "tiny"\n')
    assert job.name == "job"
    assert job.model.dtype == "float32"
    assert job.workload.prompt_tokens == 32 and job.workload.new_tokens == 96
    assert job.workload.dataset is None
    assert job.partition.strategy == "even"
    assert job.runtime.threads == 0


@pytest.mark.parametrize(
    "text, words",
    [
        ('[model]\nsource = "tiny"\ncolour = 3\n', ["unknown field", "colour", "[model]"]),
        (
            '[model]\nsource = "tiny"\n[workload]\nprompts = "four"\n',
            ["workload.prompts", "expected int"],
        ),
        ('[model]\nsource = "tiny"\n[workload]\nprompts = 0\n', ["workload.prompts", ">= 1"]),
        (
            '[model]\nsource = "tiny"\n[workload]\nprompts = 5\nbatch_size = 2\n',
            ["multiple of workload.batch_size"],
        ),
        ('[model]\nsource = "tiny"\ndtype = "int3"\n', ["model.dtype", "'float32'"]),
        ("[workload]\nprompts = 1\n", ["[model] is missing"]),
        (
            '[model]\nsource = "tiny"\n[partition]\nstrategy = "explicit"\n',
            ["needs partition.stages"],
        ),
        (
            '[model]\nsource = "tiny"\n[partition]\nstrategy = "explicit"\nstages = [1, 2]\n',
            ["partition.stages[0]", "{rank = R, layers = [start, end]}"],
        ),
        ('[model]\nsource = "tiny"\n[partition]\nranks = [1, 0]\n', ["must start with 0"]),
        ('[model]\nsource = "tiny"\n[output]\npath = "x.csv"\n', ["output.path", ".h5"]),
        (
            '[model]\nsource = "tiny"\n[workload]\ndataset = "$NO_SUCH_VAR_XYZ/w.raw"\n',
            ["NO_SUCH_VAR_XYZ", "not set"],
        ),
        ("[model\nsource = 1", ["not valid TOML"]),
        (
            '[model]\nsource = "tiny"\n[runtime]\npoll_min_us = 50.0\npoll_max_us = 10.0\n',
            ["poll_min_us <= poll_max_us"],
        ),
    ],
)
def test_bad_jobs_name_the_field(text, words):
    with pytest.raises(JobError) as err:
        parse(text)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_unset_variable_falls_back_when_allowed():
    job = parse(
        '[model]\nsource = "tiny"\n[workload]\ndataset = "${NO_SUCH_VAR_XYZ}/w.raw"\n'
        'fallback = "builtin"\n'
    )
    assert job.workload.dataset is None and job.workload.fallback == "builtin"


def test_relative_paths_are_relative_to_the_job_file(tmp_path):
    job = parse_job(
        '[model]\nsource = "tiny"\n[workload]\ndataset = "data/w.raw"\n',
        tmp_path / "sub" / "job.toml",
    )
    assert job.workload.dataset == (tmp_path / "sub" / "data" / "w.raw").resolve()


def test_model_source_expands_variables_and_is_relative_to_the_job_file(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESHARD_TEST_DATA", str(tmp_path / "data"))
    job = parse_job('[model]\nsource = "${EDGESHARD_TEST_DATA}/m"\n', tmp_path / "job.toml")
    assert job.model.source == str(tmp_path / "data" / "m")
    job = parse_job('[model]\nsource = "models/m"\n', tmp_path / "sub" / "job.toml")
    assert job.model.source == str((tmp_path / "sub" / "models" / "m").resolve())
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_job('[model]\nsource = "~/m"\n', tmp_path / "j.toml").model.source == str(
        tmp_path / "m"
    )
    assert parse_job('[model]\nsource = "tiny"\n', tmp_path / "j.toml").model.source == "tiny"


def _explicit(stages: str):
    return parse(
        f'[model]\nsource = "tiny"\n[partition]\nstrategy = "explicit"\nstages = {stages}\n'
    )


def test_explicit_partition_accepted():
    job = _explicit("[{rank = 0, layers = [0, 2]}, {rank = 1, layers = [2, 6]}]")
    job.check_context(2, TINY)
    assert [(s.rank, s.start, s.end) for s in job.partition.stages] == [(0, 0, 2), (1, 2, 6)]


@pytest.mark.parametrize(
    "stages, world, words",
    [
        (
            "[{rank = 0, layers = [0, 2]}, {rank = 1, layers = [2, 5]}]",
            2,
            ["cover [0, 5)", "6 units"],
        ),
        ("[{rank = 0, layers = [0, 2]}, {rank = 1, layers = [3, 6]}]", 2, ["gap"]),
        ("[{rank = 0, layers = [0, 3]}, {rank = 1, layers = [2, 6]}]", 2, ["overlaps"]),
        (
            "[{rank = 0, layers = [0, 2]}, {rank = 5, layers = [2, 6]}]",
            2,
            ["rank 5 does not exist", "2 rank(s)"],
        ),
        ("[{rank = 1, layers = [0, 2]}, {rank = 0, layers = [2, 6]}]", 2, ["must be on rank 0"]),
    ],
)
def test_explicit_partition_checked_against_world_and_model(stages, world, words):
    job = _explicit(stages)
    with pytest.raises(JobError) as err:
        job.check_context(world, TINY)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_context_checks_length_and_ranks():
    job = parse('[model]\nsource = "tiny"\n[workload]\nnew_tokens = 600\n')
    with pytest.raises(JobError, match="max_position_embeddings"):
        job.check_context(1, TINY)
    job = parse('[model]\nsource = "tiny"\n[partition]\nranks = [0, 3]\n')
    with pytest.raises(JobError, match="names rank 3"):
        job.check_context(2, TINY)


@pytest.mark.parametrize(
    "value, expected",
    [
        ("24GiB", 24 * 2**30),
        ("512MB", 512_000_000),
        ("1.5e3", 1500),
        (2048, 2048),
        ("8 GiB", 8 * 2**30),
        ("16kib", 16384),
    ],
)
def test_parse_bytes(value, expected):
    assert parse_bytes(value, "x") == expected


@pytest.mark.parametrize("value", ["lots", -1, 0, True, "12 parsecs"])
def test_parse_bytes_rejects(value):
    with pytest.raises(JobError):
        parse_bytes(value, "x")
