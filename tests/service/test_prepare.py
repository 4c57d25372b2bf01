"""`scen prepare` fills the cache a first start would otherwise fill: a replica started from an
image built with it computes no pool keys."""

from __future__ import annotations

from typer.testing import CliRunner

from app.cli import cli
from app.live.runtime import load_configured_model, new_editor
from app.scen.editor import Editor
from app.settings import Settings, get_settings
from tests.utils.tiny_models import tiny_model


def test_prepare_caches_the_pool_keys_a_start_then_reads(tmp_path, monkeypatch):
    lm = tiny_model("llama")
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    env = {"SCEN_MODEL": str(tmp_path / "model"), "SCEN_DEVICE": "cpu", "SCEN_CACHE_DIR": str(tmp_path / "cache"),
           "SCEN_DATA_DIR": str(tmp_path / "data")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli, ["prepare"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert f"prepared {tmp_path / 'model'} in {tmp_path / 'cache'}" in result.stdout
    assert len(list((tmp_path / "cache" / "pool-keys").glob("*.safetensors"))) == 1

    def computed(*_args, **_kwargs):
        raise AssertionError("a prepared start computed the pool keys")

    monkeypatch.setattr(Editor, "_pool_keys", computed)
    settings = Settings(_env_file=None)
    new_editor(settings, load_configured_model(settings))


def test_prepare_reports_a_model_it_cannot_load(tmp_path, monkeypatch):
    monkeypatch.setenv("SCEN_MODEL", str(tmp_path / "missing"))
    monkeypatch.setenv("SCEN_CACHE_DIR", str(tmp_path / "cache"))
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli, ["prepare"])
    finally:
        get_settings.cache_clear()
    # main() turns the error into one line (test_api_docs.py); nothing is cached.
    assert isinstance(result.exception, OSError) and "missing" in str(result.exception)
    assert not (tmp_path / "cache" / "pool-keys").exists()
