"""Settings are read and checked in one place, before anything starts."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from app.cli import cli
from app.db.models import EditStatus
from app.queue import EditChanged
from app.settings import Settings, get_settings


@pytest.mark.parametrize("engine,message", [(["thetta=0.7"], "SCEN_ENGINE: bad setting 'thetta=0.7'"),
                                            (["theta=high"], "SCEN_ENGINE: bad value for theta")])
def test_bad_engine_setting_fails_when_settings_are_read(engine, message):
    with pytest.raises(ValidationError, match=message):
        Settings(_env_file=None, engine=engine)


def test_engine_setting_is_parsed():
    assert Settings(_env_file=None, engine=["theta=0.7", "layer=none"]).engine_config.theta == 0.7


def test_cli_refuses_bad_settings_before_starting(tmp_path, monkeypatch):
    monkeypatch.setenv("SCEN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SCEN_ENGINE", '["thetta=0.7"]')
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli, ["db", "upgrade"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 1 and "SCEN_ENGINE: bad setting" in result.output
    assert not (tmp_path / "data").exists()


def test_cache_dir_is_a_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("SCEN_CACHE_DIR", str(tmp_path / "cache"))
    assert Settings(_env_file=None).cache_dir == tmp_path / "cache"


@pytest.mark.parametrize("value,expected", [("none", None), ("", None), ("64", 64.0)])
def test_expert_cache_budget_from_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv("SCEN_EXPERT_CACHE_MB", value)
    assert Settings(_env_file=None).expert_cache_mb == expected


def test_edit_changed_wire_form():
    event = EditChanged("e1", EditStatus.rolled_back)
    assert event.to_dict() == {"type": "edit_changed", "id": "e1", "status": "rolled_back"}
    assert EditChanged.from_dict(event.to_dict()) == event
    assert EditChanged.from_dict({"type": "something_new", "id": "e1"}) is None
    assert EditChanged.from_dict({"type": "edit_changed"}) is None
