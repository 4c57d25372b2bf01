"""The `scen` command line: serve, worker, prepare, db, keys, edits, eval.

An error ends the command with one line on stderr and exit status 1, never a traceback
(``--verbose`` on ``eval`` aside, which logs at debug level).
"""

from __future__ import annotations

import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from app.logs import configure_logging
from app.settings import ROLES, Settings, get_settings, redact_url

# Tracebacks are for bugs; main() turns every other failure into one line.
cli = typer.Typer(no_args_is_help=True, add_completion=False, help="SCEN model-editing service.",
                  pretty_exceptions_enable=False)
db_cli = typer.Typer(no_args_is_help=True, help="Database schema.")
cli.add_typer(db_cli, name="db")
keys_cli = typer.Typer(no_args_is_help=True, help="API keys stored (hashed) in the database.")
cli.add_typer(keys_cli, name="keys")
edits_cli = typer.Typer(no_args_is_help=True, help="Live edits moved between deployments of one model.")
cli.add_typer(edits_cli, name="edits")


def _version() -> str:
    try:
        return version("scen-service")
    except PackageNotFoundError:  # a checkout that was not installed
        return "unknown"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"scen {_version()}")
        raise typer.Exit()


@cli.callback()
def _main(
    show_version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                               help="Print the version and exit.")] = False,
) -> None:
    """SCEN model-editing service."""


def _settings() -> Settings:
    """Settings read once, up front, so a bad value stops the process before anything starts."""
    try:
        settings = get_settings()
    except ValidationError as exc:
        # One line; hide_input_in_errors keeps the values (passwords, keys) out of it.
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}"
                             for e in exc.errors())
        raise SystemExit(f"scen: invalid SCEN_* settings: {problems}") from None
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
def worker(
    check: Annotated[bool, typer.Option("--check", help="Exit 0 when this host's worker is alive (its heartbeat "
                                                        "is fresh), else 1: a container healthcheck.")] = False,
) -> None:
    """Start an edit worker that consumes the Redis queue."""
    settings = _settings()
    if check:
        # Light: a healthcheck runs every few seconds and must not load torch.
        from workers.metrics import check as check_heartbeat

        alive, line = check_heartbeat(settings.heartbeat_path, settings.worker_heartbeat_max_age_s)
        typer.echo(line, err=not alive)
        raise typer.Exit(0 if alive else 1)
    from workers.main import run as run_worker

    run_worker(settings)


@cli.command()
def prepare() -> None:
    """Fill SCEN_CACHE_DIR before a first start: the model converted for loading and the routing
    pool's keys (an image built with them starts its replicas without computing either)."""
    settings = _settings()
    from app.live.runtime import load_configured_model, new_editor

    started = time.perf_counter()
    loaded = load_configured_model(settings)
    new_editor(settings, loaded)
    typer.echo(f"prepared {loaded.name} in {settings.cache_dir} ({time.perf_counter() - started:.1f} s)")


@db_cli.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Apply Alembic migrations to SCEN_DATABASE_URL."""
    settings = _settings()
    from app.db.migrate import upgrade

    upgrade(revision, settings.db_url)


def _key_database(settings: Settings):
    from app.db.migrate import upgrade
    from app.db.session import Database

    if settings.auto_migrate:
        upgrade("head", settings.db_url)
    return Database(settings.db_url)


@keys_cli.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="Who the key is for; events record it as the actor.")],
    role: Annotated[str, typer.Option(help=f"One of {', '.join(ROLES)}.")] = "reader",
) -> None:
    """Make a key and print it, once: only its sha256 is stored."""
    import re

    if role not in ROLES:
        raise SystemExit(f"scen: the role must be one of {', '.join(ROLES)}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}", name):
        raise SystemExit("scen: the name must be 1-64 letters, digits or _.@- characters")
    settings = _settings()
    from app.db.keys import KeyExists, create_key

    db = _key_database(settings)
    try:
        with db.session() as session:
            key = create_key(session, name, role)
    except KeyExists as exc:
        raise SystemExit(f"scen: {exc}") from None
    finally:
        db.close()
    typer.echo(key)
    typer.echo(f"key {name!r} ({role}) created; it is shown this once. Send it as Authorization: Bearer KEY",
               err=True)


@keys_cli.command("list")
def keys_list() -> None:
    """Names, roles and dates of the stored keys (never the keys)."""
    settings = _settings()
    from app.db.keys import list_keys

    db = _key_database(settings)
    try:
        with db.session() as session:
            for info in list_keys(session):
                typer.echo(f"{info.name}\t{info.role}\t{info.created_at}\t{'revoked' if info.revoked else 'active'}")
    finally:
        db.close()


@keys_cli.command("revoke")
def keys_revoke(name: Annotated[str, typer.Argument(help="The key's name.")]) -> None:
    """Revoke a stored key; running services refuse it within seconds."""
    settings = _settings()
    from app.db.keys import KeyNotFound, revoke_key

    db = _key_database(settings)
    try:
        with db.session() as session:
            revoke_key(session, name)
    except KeyNotFound as exc:
        raise SystemExit(f"scen: {exc}") from None
    finally:
        db.close()
    typer.echo(f"key {name!r} revoked", err=True)


def _with_archive(verb: str, settings: Settings, action):
    """Run ``action(db, fingerprint)`` against this deployment; an archive error ends the command
    with its one-line reason. Returns (fingerprint, result)."""
    from app.live.archive import ArchiveError, fingerprint_of

    here = fingerprint_of(settings.model, settings.engine_config, settings.cache_dir)
    db = _key_database(settings)
    try:
        return here, action(db, here)
    except ArchiveError as exc:
        raise SystemExit(f"scen edits {verb}: {exc}") from None
    finally:
        db.close()


@edits_cli.command("export")
def edits_export(path: Annotated[Path, typer.Argument(help="The archive to write (a tar file).")]) -> None:
    """Write every active edit (metadata, expert and neuron tensors, sha256) and the fingerprint of
    the model, layers and key normalisation they were trained for to one archive."""
    from app.live.archive import export_edits
    from app.live.experts import open_experts

    settings = _settings()
    here, done = _with_archive("export", settings,
                               lambda db, here: export_edits(db, open_experts(settings, db), here, path))
    typer.echo(f"exported {done.edits} edits to {path} (model {here.model}, layers {here.layers})")


@edits_cli.command("import")
def edits_import(path: Annotated[Path, typer.Argument(help="An archive written by `scen edits export`.")]) -> None:
    """Make an archive's edits active here. Refused, with nothing written, unless they were trained
    for this deployment's model, layers and key normalisation; importing again changes nothing."""
    from app.live import open_queue
    from app.live.archive import import_edits
    from app.live.experts import open_experts
    from app.queue import EditChanged

    settings = _settings()
    _, done = _with_archive("import", settings,
                            lambda db, here: import_edits(db, open_experts(settings, db), here, path))
    if settings.queue_url is not None and (done.imported or done.superseded):
        # Running API processes follow at once (else at their next reconciliation).
        queue = open_queue(settings)
        try:
            for edit_id in done.imported:
                queue.publish(EditChanged(edit_id, "active").to_dict())
            for edit_id in done.superseded:
                queue.publish(EditChanged(edit_id, "superseded").to_dict())
        finally:
            queue.close()
    for edit_id, why in done.skipped.items():
        typer.echo(f"skipped {edit_id}: {why}", err=True)
    typer.echo(f"imported {len(done.imported)} edits from {path} ({len(done.skipped)} skipped, "
               f"{len(done.superseded)} local edits superseded)")


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
        typer.Option(help="Generation, sweeps and the routing snapshot past this many edits measure a seeded "
                           "sample of this size; 0: all."),
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
    try:
        cli()
    except KeyboardInterrupt:
        sys.stderr.write("scen: interrupted\n")
        sys.exit(130)
    except Exception as exc:  # SystemExit (our own one-line refusals) passes through
        sys.stderr.write(f"scen: {one_line(exc)}\n")
        sys.exit(1)


def one_line(exc: BaseException) -> str:
    """An exception as one line, with any password in a URL it quotes replaced by ***."""
    import re

    text = " ".join(str(exc).split()) or "no detail"
    text = re.sub(r"[a-z][a-z0-9+.-]*://[^\s'\"]+", lambda m: redact_url(m.group(0)), text)
    return f"{type(exc).__name__}: {text}"[:500]


if __name__ == "__main__":
    main()
