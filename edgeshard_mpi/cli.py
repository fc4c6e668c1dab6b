"""Command line: thin wrappers that parse arguments and call the library."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="EdgeShard: collaborative LLM inference over heterogeneous devices.",
)


@app.command()
def run(
    job: Annotated[Path, typer.Argument(help="job file (TOML)")],
    resume: Annotated[
        str | None, typer.Option(help="journal of a killed run to continue (<out>.h5.journal)")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option(help="device name the plan must leave out (repeatable)")
    ] = None,
) -> None:
    """Run a job under MPI: mpiexec -n M python -m mpi4py -m edgeshard_mpi run JOB."""
    from .runner import finish, run_job

    finish(run_job(str(job), resume, tuple(exclude or ())))


@app.command("eval")
def eval_(job: Annotated[Path, typer.Argument(help="job file (TOML)")]) -> None:
    """Perplexity through the split model, and token agreement of a lossy wire with the
    exact one (under MPI, like run; job fields in [eval] and [transport])."""
    from .evaluate import eval_job
    from .runner import finish

    finish(eval_job(str(job)))


@app.command()
def profile(
    job: Annotated[Path, typer.Argument(help="job file (TOML)")],
    out: Annotated[str | None, typer.Option(help="profile file to write")] = None,
) -> None:
    """Measure every unit on every rank and every link, save a reusable profile (under MPI,
    like run)."""
    from .runner import finish, profile_job

    finish(profile_job(str(job), out))


@app.command()
def plan(
    profile: Annotated[
        str | None,
        typer.Option("--profile", "-p", help="profile file, or a shipped one's name (--list)"),
    ] = None,
    objective: Annotated[str, typer.Option(help="latency | throughput")] = "latency",
    strategy: Annotated[
        list[str] | None, typer.Option(help="one or more strategies (default: all)")
    ] = None,
    algorithm: Annotated[str, typer.Option(help="exact | paper")] = "exact",
    profile_strategy: Annotated[
        str, typer.Option(help="prefill | decode | average | workload")
    ] = "average",
    batch: Annotated[int | None, typer.Option(help="batch size (a profiled one)")] = None,
    source: Annotated[int | None, typer.Option(help="device index of the source")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    list_: Annotated[bool, typer.Option("--list", help="list shipped profiles")] = False,
    pipeline: Annotated[
        bool, typer.Option("--pipeline", help="the pipelined choice a job would make")
    ] = False,
    prompts: Annotated[int, typer.Option(help="prompts in the workload (--pipeline)")] = 8,
    micro_batch_size: Annotated[int | None, typer.Option(help="fixed (default: auto)")] = None,
    micro_batches: Annotated[int | None, typer.Option(help="in flight (default: auto)")] = None,
    order: Annotated[str, typer.Option(help="no-bubbles | bubbles")] = "no-bubbles",
    sweep: Annotated[
        str | None, typer.Option(help="A,B:MBPS,... e.g. 0,14:1,2,5,10,20,50 (a PNG too)")
    ] = None,
    png: Annotated[str, typer.Option(help="where --sweep writes its plot")] = "sweep.png",
) -> None:
    """Plans and predictions of every strategy for a profile (offline, no MPI); with
    --pipeline the pipelined choice, with --sweep a link's bandwidth swept."""
    from .offline import format_report, plan_report, to_json
    from .planner.problem import ProfileError, shipped_profiles

    if list_ or profile is None:
        typer.echo("shipped profiles: " + ", ".join(shipped_profiles()))
        if profile is None and not list_:
            typer.echo("give one with --profile NAME (or a profile file)", err=True)
            raise typer.Exit(2)
        return
    if pipeline or sweep:
        from .offline_sweep import run_offline

        try:
            text = run_offline(
                profile, strategy, objective, algorithm, profile_strategy, batch, source,
                pipeline, prompts, micro_batch_size, micro_batches, order, sweep, png, as_json,
            )
        except (ProfileError, ValueError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        typer.echo(text)
        return
    try:
        rep = plan_report(profile, objective, strategy, algorithm, profile_strategy, batch, source)
    except (ProfileError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(to_json(rep) if as_json else format_report(rep))


@app.command()
def schedule(
    stages: Annotated[int, typer.Option(help="stages in the chain")] = 3,
    micro_batches: Annotated[int, typer.Option(help="micro-batches in flight")] = 3,
    steps: Annotated[int, typer.Option(help="token steps (1 prefill + decodes)")] = 3,
    groups: Annotated[int, typer.Option(help="micro-batches in the workload (0: one round)")] = 0,
    order: Annotated[str, typer.Option(help="no-bubbles | bubbles")] = "no-bubbles",
    prefill: Annotated[float, typer.Option(help="prefill cost, in decode steps")] = 1.0,
    hop: Annotated[float, typer.Option(help="cost of a message, in decode steps")] = 0.0,
) -> None:
    """Print a pipeline schedule as a time x rank chart (unit decode cost per stage)."""
    from . import schedule as sch

    if order not in sch.ORDERS or min(stages, micro_batches, steps) < 1 or groups < 0:
        typer.echo(f"error: order in {sch.ORDERS}; stages, micro-batches, steps >= 1", err=True)
        raise typer.Exit(2)
    if stages * steps * max(groups, micro_batches) > 100_000 or not prefill > 0 or hop < 0:
        typer.echo(
            "error: a chart of at most 100000 actions (stages x steps x groups), with "
            "prefill > 0 and hop >= 0; use smaller numbers",
            err=True,
        )
        raise typer.Exit(2)
    shape = sch.Shape(groups or micro_batches, micro_batches, steps)
    typer.echo(
        sch.grid(
            list(range(stages)),
            shape,
            order,
            lambda stage, step: prefill if step == 0 else 1.0,
            lambda src, dst, stage, step: hop,
            tick=min(1.0, prefill),
        )
    )


@app.command()
def presets() -> None:
    """List the built-in model presets and their sizes."""
    from .presets import PRESETS

    typer.echo(
        f"{'name':<12}{'layers':>7}{'hidden':>8}{'heads':>7}{'kv':>4}{'params':>10}{'fp32 GB':>9}"
    )
    for name, s in PRESETS.items():
        p = s.total_params()
        typer.echo(
            f"{name:<12}{s.num_layers:>7}{s.hidden_size:>8}{s.num_heads:>7}"
            f"{s.num_kv_heads:>4}{p / 1e6:>9.1f}M{p * 4 / 1e9:>9.2f}"
        )


@app.command()
def hosts(hostfile: Path, n: Annotated[int, typer.Option("-n", help="ranks")] = 0) -> None:
    """Check a hostfile (MPICH host:N or Open MPI host slots=N) and show rank placement."""
    from .cluster import HostfileError, block_placement, parse_hostfile

    try:
        fmt, entries = parse_hostfile(hostfile)
        total = sum(e.slots for e in entries)
        if n < 0:
            raise HostfileError(f"-n {n}: give a number of ranks >= 1 (0: every slot)")
        placement = block_placement(entries, n or total)
    except HostfileError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{hostfile}: {fmt} format, {len(entries)} host(s), {total} slot(s)")
    for rank, host in enumerate(placement):
        typer.echo(f"  rank {rank}: {host}")


@app.command()
def report(
    results: Annotated[list[Path], typer.Argument(help="run files or folders of them")],
    out: Annotated[Path, typer.Option(help="folder for report.md, runs.csv, plots")] = Path(
        "results/report"
    ),
) -> None:
    """Markdown and CSV tables and PNG plots from many run files."""
    from .report import write_report

    try:
        path = write_report(results, out)
    except OSError as e:  # no run files; --out not a writable folder
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {path}")


testbed_app = typer.Typer(
    help="An emulated cluster on this host: namespaces, tc-shaped links, cgroup limits.",
    no_args_is_help=True,
)
app.add_typer(testbed_app, name="testbed")


def _load_testbed(name: str):
    from .testbed import TestbedError, load_testbed

    try:
        return load_testbed(name)
    except TestbedError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


def _testbed_call(fn, *args) -> None:
    from .testbed import TestbedError

    try:
        fn(*args)
    except TestbedError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


@testbed_app.command("up")
def testbed_up(testbed: Annotated[str, typer.Argument(help="shipped name or file")]) -> None:
    """Create the testbed (root; idempotent) and print how to launch a job in it."""
    from .testbed import up

    tb = _load_testbed(testbed)
    _testbed_call(up, tb)
    typer.echo(f"launch a job: edgeshard-mpi testbed launch {testbed} JOB")


@testbed_app.command("down")
def testbed_down(testbed: Annotated[str, typer.Argument(help="shipped name or file")]) -> None:
    """Remove everything the testbed created, also after a crash."""
    from .testbed import down

    _testbed_call(down, _load_testbed(testbed))


@testbed_app.command("status")
def testbed_status(testbed: Annotated[str, typer.Argument(help="shipped name or file")]) -> None:
    """Show the devices, their limits and links, and whether the testbed is up."""
    from .testbed import status

    typer.echo(status(_load_testbed(testbed)))


@testbed_app.command("launch")
def testbed_launch(
    testbed: Annotated[str, typer.Argument(help="shipped name or file")],
    job: Annotated[Path, typer.Argument(help="job file (TOML)")],
    command: Annotated[str, typer.Option(help="run | profile")] = "run",
) -> None:
    """Print the mpiexec line that starts one rank inside each device."""
    import shlex
    import shutil
    import sys

    from .testbed import MPI_TCP_ENV, launch_argv

    tb = _load_testbed(testbed)
    if command not in ("run", "profile"):
        typer.echo(f"error: --command {command!r}: use run or profile", err=True)
        raise typer.Exit(2)
    if not job.is_file():
        typer.echo(f"error: job file {str(job)!r} not found (looked in {Path.cwd()})", err=True)
        raise typer.Exit(2)
    local = Path(sys.executable).parent / "mpiexec"
    mpiexec = str(local) if local.exists() else (shutil.which("mpiexec") or "mpiexec")
    argv = launch_argv(tb, str(job.resolve()), mpiexec, sys.executable, command)
    # `env VAR=... mpiexec ...`: the line works typed, pasted, or run as $(...) (where
    # VAR=value words would be taken for a command name).
    env = " ".join(f"{k}={v}" for k, v in MPI_TCP_ENV.items())
    typer.echo(f"env {env} {shlex.join(argv)}")


@testbed_app.command("list")
def testbed_list() -> None:
    """List the shipped testbeds."""
    from .testbed import shipped_testbeds

    typer.echo(", ".join(shipped_testbeds()))


def main() -> None:
    app()
