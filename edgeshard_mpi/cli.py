"""Command line: thin wrappers that parse arguments and call the library."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="EdgeShard: collaborative LLM inference over heterogeneous devices.")


@app.command()
def run(job: Annotated[Path, typer.Argument(help="job file (TOML)")]) -> None:
    """Run a job under MPI: mpiexec -n M python -m mpi4py -m edgeshard_mpi run JOB."""
    from .runner import main_run

    main_run(str(job))


@app.command()
def presets() -> None:
    """List the built-in model presets and their sizes."""
    from .presets import PRESETS

    typer.echo(f"{'name':<12}{'layers':>7}{'hidden':>8}{'heads':>7}{'kv':>4}{'params':>10}"
               f"{'fp32 GB':>9}")
    for name, s in PRESETS.items():
        p = s.total_params()
        typer.echo(f"{name:<12}{s.num_layers:>7}{s.hidden_size:>8}{s.num_heads:>7}"
                   f"{s.num_kv_heads:>4}{p / 1e6:>9.1f}M{p * 4 / 1e9:>9.2f}")


@app.command()
def hosts(hostfile: Path, n: Annotated[int, typer.Option("-n", help="ranks")] = 0) -> None:
    """Check a hostfile (MPICH host:N or Open MPI host slots=N) and show rank placement."""
    from .cluster import HostfileError, block_placement, parse_hostfile

    try:
        fmt, entries = parse_hostfile(hostfile)
        total = sum(e.slots for e in entries)
        placement = block_placement(entries, n or total)
    except HostfileError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{hostfile}: {fmt} format, {len(entries)} host(s), {total} slot(s)")
    for rank, host in enumerate(placement):
        typer.echo(f"  rank {rank}: {host}")


def main() -> None:
    app()
