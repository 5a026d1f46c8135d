"""`ktulhu store copy`: RocksDB -> PostgreSQL -> RocksDB is lossless byte for byte (original-layout
records included), a re-run changes nothing, an interrupted copy resumes where it stopped, counts are
printed and verified, and hostile inputs are refused without changing anything."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from ktulhu import store_cli
from ktulhu.ports import free_port
from ktulhu.store import Message, Store, StoreError
from ktulhu.store.copy import PROGRESS_KEY, copy_store
from ktulhu.store.rocks import RocksKV
from tests.paths import REPO

from .conftest import write_legacy_db
from .test_backup import fill, fingerprint


@contextmanager
def server_holding(location: Path | str) -> Iterator[None]:
    """Another process with the store open, as a running server has it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from ktulhu.store import Store; s = Store.open(sys.argv[1]); "
         "print('open', flush=True); sys.stdin.read(); s.close()", str(location)],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "open"
    try:
        yield
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=60)


@pytest.fixture
def engine() -> str:
    return "postgresql"  # every copy here goes through PostgreSQL (and RocksDB at either end)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = store_cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def rocks_dump(path: Path) -> dict[bytes, bytes]:
    kv = RocksKV.open(path, create=False)
    try:
        return dict(kv.scan(b""))
    finally:
        kv.close()


def pg_rows(url: str) -> list[tuple[bytes, bytes, str]]:
    """Every row with its xmin (the transaction that wrote it: unchanged when nothing was rewritten)."""
    with psycopg.connect(url) as conn:
        return [(bytes(k), bytes(v), str(x)) for k, v, x in
                conn.execute("SELECT k, v, xmin::text FROM kv ORDER BY k").fetchall()]


def pg_dump(url: str) -> dict[bytes, bytes]:
    return {k: v for k, v, _ in pg_rows(url)}


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A migrated store: original-layout records, new ones, replacements and deletions."""
    path = tmp_path / "source"
    fill(path)
    return path


def test_rocksdb_to_postgresql_to_rocksdb_is_lossless(source: Path, location: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    original = rocks_dump(source)
    assert any(k.startswith(b"chat:c-legacy-1:msg:") for k in original) and b"meta:schema_version" in original
    code, out, err = cli(capsys, "copy", "--from", str(source), "--to", location)
    assert (code, err) == (0, ""), err
    assert f"keys in source: {len(original)}; keys in destination: {len(original)}" in out
    assert "verified: every key and value is identical" in out and "ktulhu@" in out
    assert pg_dump(location) == original

    back = tmp_path / "back"
    code, out, err = cli(capsys, "copy", "--from", location, "--to", str(back))
    assert (code, err) == (0, ""), err
    assert rocks_dump(back) == original  # byte for byte, every key in the same order

    store = Store.open(location)  # the copy is a working store
    try:
        assert [m.id for m in store.list_messages_for_chat("c-legacy-1")] == ["zz-prompt", "aa-reply", "sum-1"]
        assert store.find_user_by_email("a@example.com").id == "u1"
    finally:
        store.close()


def test_an_original_unmigrated_store_is_copied_as_it_is(tmp_path: Path, location: str) -> None:
    write_legacy_db(tmp_path / "legacy")
    original = rocks_dump(tmp_path / "legacy")
    report = copy_store(tmp_path / "legacy", location, progress=False)
    assert report.verified and report.source_keys == len(original) == report.dest_keys
    assert pg_dump(location) == original and b"meta:schema_version" not in pg_dump(location)


def test_a_rerun_changes_nothing(source: Path, location: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(capsys, "copy", "--from", str(source), "--to", location)[0] == 0
    rows = pg_rows(location)
    code, out, err = cli(capsys, "copy", "--from", str(source), "--to", location)
    assert (code, err) == (0, "") and "nothing written" in out and "keys in destination" in out
    assert pg_rows(location) == rows  # not one row rewritten (same xmin)

    back = tmp_path / "back"
    assert cli(capsys, "copy", "--from", location, "--to", str(back))[0] == 0
    before = rocks_dump(back)
    code, out, _ = cli(capsys, "copy", "--from", location, "--to", str(back))
    assert code == 0 and "nothing written" in out and rocks_dump(back) == before


def test_a_destination_with_missing_or_older_values_is_brought_up_to_date(source: Path, location: str) -> None:
    assert copy_store(source, location, progress=False).verified
    store = Store.open(source)
    try:
        store.save_message(Message(id="later", chat_id="c1", role="user", ts=1_800_000_000_000))
    finally:
        store.close()
    report = copy_store(source, location, progress=False)
    assert report.verified and report.copied == report.source_keys
    assert pg_dump(location) == rocks_dump(source)


@pytest.mark.parametrize("direction", ["to_postgresql", "to_rocksdb"])
def test_an_interrupted_copy_resumes_where_it_stopped(source: Path, location: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str], direction: str) -> None:
    original = rocks_dump(source)
    if direction == "to_postgresql":
        src, dst = str(source), location
        read = pg_dump
    else:
        assert copy_store(source, location, progress=False).verified
        src, dst = location, str(tmp_path / "back")
        read = rocks_dump  # type: ignore[assignment]
    first = copy_store(src, dst, batch_keys=40, stop_after_batches=3, progress=False)
    assert not first.complete and first.copied == 120 and first.batches == 3
    partial = read(dst)  # type: ignore[arg-type]
    marker = json.loads(partial.pop(PROGRESS_KEY))
    assert marker["copied"] == 120 and bytes.fromhex(marker["after"]) == max(partial)
    assert partial == dict(sorted(original.items())[:120])  # the first 120 keys, nothing else
    with pytest.raises(StoreError, match="unfinished copy"):
        Store.open(dst)  # a server refuses a half-copied store
    code, out, err = cli(capsys, "copy", "--from", src, "--to", dst)
    assert (code, err) == (0, ""), err
    assert "resuming after 120 keys copied before" in out
    assert f"copied {len(original) - 120} keys" in out
    assert f"keys in source: {len(original)}; keys in destination: {len(original)}" in out
    assert read(dst) == original  # type: ignore[arg-type]


def test_progress_lines_on_a_non_terminal(source: Path, location: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "copy", "--from", str(source), "--to", location)
    lines = out.splitlines()
    assert code == 0 and err == ""
    assert lines[0].startswith(f"copying {source} to postgresql://ktulhu@") and "keys to copy" in lines[0]
    assert lines[1].startswith("copy finished in")


# --- refusals: nothing changes ------------------------------------------------------------------------


def refused(capsys: pytest.CaptureFixture[str], fragment: str, *argv: str) -> str:
    code, out, err = cli(capsys, "copy", *argv)
    assert code == 1 and out == "", (out, err)
    assert err.startswith("ktulhu store copy: ") and err.count("\n") == 1, err
    assert fragment in err, err
    return err


def test_hostile_inputs_are_refused_and_change_nothing(source: Path, location: str, tmp_path: Path,
                                                       postgres_server, capsys: pytest.CaptureFixture[str]) -> None:

    assert copy_store(source, location, progress=False).verified
    capsys.readouterr()
    rows = pg_rows(location)
    before = fingerprint(source)  # reading a source changes none of its files
    new = tmp_path / "new"
    secret = "hunter2-pw"

    err = refused(capsys, "port 'abc'", "--from", str(source), "--to", f"postgresql://ktulhu:{secret}@127.0.0.1:abc/x")
    assert secret not in err
    err = refused(capsys, "not a usable PostgreSQL URL", "--from", f"postgres://ktulhu:{secret}@[::1/x", "--to", str(new))
    assert secret not in err
    refused(capsys, "neither a directory nor a postgresql:// URL", "--from", str(source), "--to", "mysql://u@h/db")
    unreachable = f"postgresql://ktulhu:{secret}@127.0.0.1:{free_port()}/chats"
    err = refused(capsys, "cannot open the destination: cannot connect to the store at postgresql://ktulhu@127.0.0.1:",
                  "--from", str(source), "--to", unreachable)
    assert secret not in err and "/chats" in err

    refused(capsys, "does not exist", "--from", str(tmp_path / "missing"), "--to", str(new))
    assert not (tmp_path / "missing").exists()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    refused(capsys, "is not a store", "--from", str(tmp_path / "junk"), "--to", str(new))
    refused(capsys, "a non-empty directory that is not a store", "--from", str(source), "--to", str(tmp_path / "junk"))
    assert (tmp_path / "junk" / "notes.txt").read_text() == "mine" and len(list((tmp_path / "junk").iterdir())) == 1

    refused(capsys, "the same store", "--from", str(source), "--to", str(source))
    refused(capsys, "the same store", "--from", str(source), "--to", str(source / ".." / "source"))
    refused(capsys, "the same store", "--from", str(source), "--to", str(source / "inside"))
    other_spelling = location.replace("postgresql://ktulhu@", "postgres://ktulhu:whatever@")
    refused(capsys, "the same store", "--from", location, "--to", other_spelling)

    with server_holding(source):
        refused(capsys, "the source is in use: the store at", "--from", str(source), "--to", str(new))
        refused(capsys, "the destination is in use", "--from", location, "--to", str(source))
    assert not new.exists()
    before = fingerprint(source)  # (the server's own open and close changed its files)

    with server_holding(location):  # a server has the PostgreSQL destination open
        refused(capsys, "the destination is in use", "--from", str(source), "--to", location)
    assert pg_rows(location) == rows

    write_legacy_db(tmp_path / "legacy")  # schema 0 (no version) into a schema 1 store
    refused(capsys, "holds a store of schema version 1, the source 0 (none)",
            "--from", str(tmp_path / "legacy"), "--to", location)
    other = Store.open(tmp_path / "other")
    other.save_message(Message(id="mine", chat_id="elsewhere", role="user", ts=1))
    other.close()
    other_before = rocks_dump(tmp_path / "other")
    refused(capsys, "keys the source does not have", "--from", location, "--to", str(tmp_path / "other"))
    assert rocks_dump(tmp_path / "other") == other_before  # (RocksDB's own files change on any open)
    assert pg_rows(location) == rows and fingerprint(source) == before


def test_a_source_that_is_an_unfinished_copy_is_refused(source: Path, location: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert not copy_store(source, location, batch_keys=10, stop_after_batches=1, progress=False).complete
    capsys.readouterr()
    refused(capsys, "is itself an unfinished copy", "--from", location, "--to", str(tmp_path / "next"))
    assert not (tmp_path / "next").exists()
    write_legacy_db(tmp_path / "legacy")
    refused(capsys, "holds an unfinished copy of", "--from", str(tmp_path / "legacy"), "--to", location)


def test_backup_and_restore_of_a_postgresql_store_point_to_pg_dump(location: str, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    Store.open(location).close()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KTULHU_STORE", location.replace("ktulhu@", "ktulhu:pw-secret@"))
    for argv in (["backup", str(tmp_path / "b")], ["restore", str(tmp_path / "b")]):
        code, out, err = cli(capsys, *argv)
        assert code == 1 and out == "" and "pg_dump" in err and "ktulhu store copy" in err
        assert "pw-secret" not in err and "postgresql://ktulhu@127.0.0.1:" in err
    code, _, err = cli(capsys, "backup", str(tmp_path / "b"), "--db", location)
    assert code == 1 and "pg_dump" in err
    assert not (tmp_path / "b").exists()
