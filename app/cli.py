"""The `scen` command line: serve, worker, db, eval."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from app.logs import configure_logging
from app.settings import Settings, get_settings

cli = typer.Typer(no_args_is_help=True, add_completion=False, help="SCEN model-editing service.")
db_cli = typer.Typer(no_args_is_help=True, help="Database schema.")
cli.add_typer(db_cli, name="db")


def _settings() -> Settings:
    """Settings read once, up front, so a bad value stops the process before anything starts."""
    try:
        settings = get_settings()
    except ValidationError as exc:
        raise SystemExit(f"invalid SCEN_* settings: {exc}") from None
    configure_logging(json_lines=settings.log_json)
    return settings


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8000,
) -> None:
    """Start the HTTP API (with an embedded worker and queue unless SCEN_* settings say otherwise)."""
    settings = _settings()
    from app.api.server import serve as run_server

    run_server(settings, host=host, port=port)


@cli.command()
def worker() -> None:
    """Start an edit worker that consumes the Redis queue."""
    settings = _settings()
    from workers.main import run as run_worker

    run_worker(settings)


@db_cli.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Apply Alembic migrations to SCEN_DATABASE_URL."""
    settings = _settings()
    from app.db.migrate import upgrade

    upgrade(revision, settings.db_url)


@cli.command("eval")
def eval_(
    dataset: Annotated[Path, typer.Option(help="ZsRE (MEND), EasyEdit/KnowEdit, CounterFact or hallucination JSON.")],
    edits: Annotated[str, typer.Option(help="Number of sequential edits, or checkpoints such as 10,50,200.")] = "200",
    seed: Annotated[int, typer.Option(help="Seed of the record shuffle and of training.")] = 0,
    out: Annotated[Path, typer.Option(help="Where to write results.json.")] = Path("results.json"),
    model: Annotated[str | None, typer.Option(help="HF id or path; default: the bundled SmolLM2.")] = None,
    methods: Annotated[str, typer.Option(help="Comma-separated methods: scen, ft, ft_kl, grace.")] = "scen",
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Engine setting, e.g. --set layer=25 --set theta=0.65.")
    ] = None,
    sweep: Annotated[list[str] | None, typer.Option(help="e.g. theta=0.5:0.9:0.05")] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue an interrupted run: methods already finished in --out are kept.")
    ] = False,
    option: Annotated[
        list[str] | None,
        typer.Option("--option", help="Baseline setting, e.g. --option grace.epsilon=5 --option ft_kl.kl_weight=1."),
    ] = None,
    generation: Annotated[bool, typer.Option(help="Also measure free greedy generation (slower).")] = True,
    sample: Annotated[
        int,
        typer.Option(help="Generation and sweeps past this many edits measure a seeded sample of this size; 0: all."),
    ] = 300,
    jobs: Annotated[
        int, typer.Option(min=1, help="Run the methods in this many processes side by side (faster on a CPU).")
    ] = 1,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Sequentially edit a dataset and measure reliability, generality and locality."""
    configure_logging(verbose)
    from app.eval.command import run_from_cli

    run_from_cli(
        dataset=dataset, edits=edits, seed=seed, out=out, model=model, methods=methods,
        overrides=set_ or [], sweeps=sweep or [], resume=resume, method_options=option or [], generation=generation,
        sample=sample, jobs=jobs,
    )


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
