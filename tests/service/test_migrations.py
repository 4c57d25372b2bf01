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
