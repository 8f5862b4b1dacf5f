"""The Alembic migrations and the models agree, and the schema goes up, down and up again."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import URL
from typer.testing import CliRunner

from allocator.cli import app
from allocator.history import migrate
from allocator.history.db import HistoryError, make_engine, resolve_url
from allocator.history.models import Base

TABLES = {"allocations", "events", "hosts", "placements"}


def _tables(url: URL) -> set[str]:
    e = make_engine(url)
    try:
        return set(inspect(e).get_table_names()) - {"alembic_version"}
    finally:
        e.dispose()


def test_there_is_a_single_head() -> None:
    assert len(migrate.heads()) == 1


def test_migrations_produce_exactly_the_models(empty_database_url: URL) -> None:
    migrate.upgrade(empty_database_url)
    e = make_engine(empty_database_url)
    try:
        with e.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    finally:
        e.dispose()
    assert diff == []


def test_upgrade_downgrade_upgrade_round_trip(empty_database_url: URL) -> None:
    migrate.upgrade(empty_database_url)
    assert _tables(empty_database_url) == TABLES and migrate.current(empty_database_url) == migrate.head()
    migrate.downgrade(empty_database_url, "base")
    assert _tables(empty_database_url) == set() and migrate.current(empty_database_url) is None
    migrate.upgrade(empty_database_url)
    assert _tables(empty_database_url) == TABLES and migrate.current(empty_database_url) == migrate.head()


def test_cli_db_upgrade_and_current(empty_database_url: URL, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # works from any directory: no alembic.ini to find
    url = empty_database_url.render_as_string(hide_password=False)
    r = CliRunner().invoke(app, ["db", "upgrade", "--database-url", url])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["db", "current", "--database-url", url])
    assert r.exit_code == 0 and f"revision {migrate.head()}" in r.output


def test_cli_db_downgrade_takes_minus_one_as_written_in_the_docs(empty_database_url: URL) -> None:
    url = empty_database_url.render_as_string(hide_password=False)
    assert CliRunner().invoke(app, ["db", "upgrade", "--database-url", url]).exit_code == 0
    r = CliRunner().invoke(app, ["db", "downgrade", "-1", "--database-url", url])
    assert r.exit_code == 0, r.output
    assert migrate.current(url) != migrate.head()


def test_no_url_means_a_sqlite_file_in_the_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALLOCATOR_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("ALLOCATOR_DATABASE_URL", raising=False)
    assert resolve_url(None).database == str(tmp_path / "state" / "history.sqlite3")
    r = CliRunner().invoke(app, ["db", "upgrade"])
    assert r.exit_code == 0, r.output
    assert _tables(resolve_url(None)) == TABLES


def test_plain_postgres_urls_use_psycopg3() -> None:
    assert resolve_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert resolve_url("postgres://u:secret@h/db").drivername == "postgresql+psycopg"
    assert "secret" not in resolve_url("postgres://u:secret@h/db").render_as_string(hide_password=True)


def test_an_unmigrated_postgres_is_refused_with_the_fix(empty_database_url: URL) -> None:
    if empty_database_url.get_backend_name() == "sqlite":
        e = migrate.open_engine(empty_database_url.render_as_string(hide_password=False))  # the fallback migrates itself
        assert migrate.current(engine=e) == migrate.head()
        e.dispose()
        return
    with pytest.raises(HistoryError, match="allocator db upgrade"):
        migrate.open_engine(empty_database_url.render_as_string(hide_password=False))


def test_a_database_migrated_by_a_newer_release_is_refused_as_newer(empty_database_url: URL) -> None:
    from sqlalchemy import text

    url = empty_database_url.render_as_string(hide_password=False)
    migrate.upgrade(url)
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(HistoryError, match="newer than this code"):
        migrate.open_engine(url)
    res = CliRunner().invoke(app, ["db", "current", "--database-url", url])
    assert "newer than this code" in res.output and "run `allocator db upgrade`" not in res.output


@pytest.mark.parametrize("round_", range(10))  # the WAL switch lost a race about one time in eighty
def test_two_first_uses_of_a_sqlite_file_at_once_both_find_it_migrated(tmp_path: Path, round_: int) -> None:
    import threading

    url = f"sqlite:///{tmp_path / 'history.sqlite3'}"
    errors: list[BaseException] = []

    def first_use() -> None:
        try:
            migrate.open_engine(url).dispose()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=first_use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert migrate.current(url) == migrate.head()


def _at_revision_0003_with_a_draining_host(url: str) -> None:
    from sqlalchemy import text

    migrate.upgrade(url, "0003")
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO hosts (namespace, host_id, state, labels, spec, gpu_count, gpu_memory_mb, cpu_cores, ram_mb,"
            " last_event_id) VALUES ('ns', 'h1', 'draining', '{}', '{}', 0, 0, 0, 0, '5-0')"))
    engine.dispose()


def _host_row(url: str) -> dict[str, object]:
    from sqlalchemy import text

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            row = conn.execute(text("SELECT drained_by, state_event_id, drain_event_id FROM hosts WHERE host_id = 'h1'"))
            return dict(row.mappings().one())
    finally:
        engine.dispose()


def test_a_database_at_revision_0003_upgrades_and_its_hosts_take_their_last_event(empty_database_url: URL) -> None:
    url = empty_database_url.render_as_string(hide_password=False)
    _at_revision_0003_with_a_draining_host(url)
    migrate.upgrade(url)
    assert migrate.current(url) == migrate.head()
    assert _host_row(url) == {"drained_by": "operator", "state_event_id": "5-0", "drain_event_id": "5-0"}


def test_a_database_at_the_form_of_revision_0003_that_carried_the_event_columns_upgrades(empty_database_url: URL) -> None:
    """One release put state_event_id and drain_event_id inside 0003; such a database says 0003 and has them."""
    from sqlalchemy import text

    url = empty_database_url.render_as_string(hide_password=False)
    _at_revision_0003_with_a_draining_host(url)
    engine = make_engine(url)
    with engine.begin() as conn:
        for name in ("state_event_id", "drain_event_id"):
            conn.execute(text(f"ALTER TABLE hosts ADD COLUMN {name} VARCHAR(40)"))
        conn.execute(text("UPDATE hosts SET state_event_id = '7-0', drain_event_id = '6-0', drained_by = 'agent'"))
    engine.dispose()
    migrate.upgrade(url)
    assert migrate.current(url) == migrate.head()
    assert _host_row(url) == {"drained_by": "agent", "state_event_id": "7-0", "drain_event_id": "6-0"}
