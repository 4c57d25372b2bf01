from __future__ import annotations

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from app.cli import cli
from app.db.migrate import downgrade, upgrade


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_upgrade_and_downgrade(db, request):
    url = request.getfixturevalue(f"{db}_url")
    upgrade("head", url=url)
    upgrade("head", url=url)  # idempotent
    engine = sa.create_engine(url)
    try:
        assert "edits" in sa.inspect(engine).get_table_names()
        downgrade("base", url)
        assert "edits" not in sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()


def test_cli_db_upgrade(tmp_path, monkeypatch):
    from app.settings import get_settings

    monkeypatch.setenv("SCEN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("SCEN_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli, ["db", "upgrade"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'data' / 'scen.db'}")
    assert "edits" in sa.inspect(engine).get_table_names()
    engine.dispose()


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_0002_keys_existing_edits_and_downgrade_keeps_superseded_out(db, request):
    from datetime import UTC, datetime

    from app.db.edits import prompt_key

    url = request.getfixturevalue(f"{db}_url")
    upgrade("0001", url=url)
    engine = sa.create_engine(url)
    now = datetime.now(UTC)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO edits (id, status, prompt, target, rephrases, metadata, created_at, updated_at, attempts) "
                "VALUES ('e1', 'active', ' Who is  the CEO? ', 'Jane', '[]', '{}', :now, :now, 0)"), {"now": now})
        upgrade("head", url=url)
        with engine.begin() as conn:
            row = conn.execute(sa.text("SELECT prompt_key, subject, superseded_by FROM edits")).one()
            assert tuple(row) == (prompt_key("who is the ceo?"), None, None)
            conn.execute(sa.text("UPDATE edits SET status = 'superseded'"))
        downgrade("0001", url)
        with engine.connect() as conn:
            status, rolled_back_at = conn.execute(sa.text("SELECT status, rolled_back_at FROM edits")).one()
        assert status == "rolled_back" and rolled_back_at is not None
        assert "superseded_by" not in {c["name"] for c in sa.inspect(engine).get_columns("edits")}
    finally:
        engine.dispose()
