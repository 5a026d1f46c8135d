"""`ktulhu store backup|restore`: exact copies of a closed store, point-in-time copies of a store a
separate process keeps writing (no torn WriteBatch, gap-free message sequences), and refusals that
change nothing.

RocksDB only (these tests take no `store`/`engine` fixture): backups are RocksDB checkpoints read
through a secondary instance. A PostgreSQL store is backed up with pg_dump, or copied into a RocksDB
directory with `ktulhu store copy` (tests/store/test_copy.py, which also checks that backup and
restore refuse a PostgreSQL store)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from rocksdict import AccessType, Options, Rdict

from ktulhu import store_cli
from ktulhu.store import Message, Store, User
from ktulhu.store import backup as backup_module
from ktulhu.store import keys
from ktulhu.store.backup import BackupError, backup
from ktulhu.store.migrate import SCHEMA_VERSION, rebuild_indexes
from tests.paths import REPO

from .conftest import dump, write_legacy_db

INDEX_PREFIXES = (keys.IX, keys.DEVICE_CHAT)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = store_cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def fingerprint(directory: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under `directory`: size, mtime and content hash (to prove nothing changed).

    rocksdict rewrites its ``rocksdict-config.json`` with the same bytes on every open, even a
    secondary one, so only that file's mtime is left out."""
    if not directory.exists():
        return {}
    return {
        str(p.relative_to(directory)): (
            p.stat().st_size, 0 if p.name == "rocksdict-config.json" else p.stat().st_mtime_ns,
            hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        for p in sorted(directory.rglob("*")) if p.is_file()
    }


def contents(path: Path) -> dict[bytes, bytes]:
    store = Store.open(path, migrate=False)
    try:
        return dump(store)
    finally:
        store.close()


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".before-restore-" in p.name)


def fill(path: Path) -> None:
    """A store with original-layout records (migrated), new records, replacements and deletions."""
    write_legacy_db(path)
    store = Store.open(path)
    try:
        for i in range(300):
            store.save_message(Message(id=f"m{i}", chat_id=f"c{i % 7}", role="user", text="é" * (i % 50),
                                       ts=1_700_000_000_000 + i))
            store.touch_chat(f"c{i % 7}", f"dev{i % 3}", now=1_700_000_000_000 + i)
        for i in range(0, 300, 9):
            store.delete_message(f"c{i % 7}", f"m{i}")
        store.delete_thread("c3")
        store.save_user(User(id="u1", created_ts=1, email="a@example.com"))
        store.add_device_for_user("u1", "dev1")
    finally:
        store.close()


# --- (1) a closed store: backup, restore, key for key ------------------------------------------


def test_backup_and_restore_of_a_closed_store_are_exact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "chatdb"
    fill(source)
    expected = contents(source)
    assert len(expected) > 500
    source_files = fingerprint(source)

    dest = tmp_path / "backups" / "monday"  # parents are created
    code, out, err = cli(capsys, "backup", str(dest), "--db", str(source))
    assert (code, err) == (0, "")
    assert out.count("\n") == 1 and f"{len(expected)} keys" in out and str(dest) in out and "bytes" in out
    assert fingerprint(source) == source_files  # read through a secondary: the source is untouched
    assert leftovers(dest.parent) == []

    restored_from = Store.open(dest)  # a normal store: current schema, no migration needed
    try:
        assert restored_from.schema_version == SCHEMA_VERSION
        assert dump(restored_from) == expected
        assert [m.id for m in restored_from.list_messages_for_chat("c1")] == \
            [f"m{i}" for i in range(300) if i % 7 == 1 and i % 9]
    finally:
        restored_from.close()
    backup_files = fingerprint(dest)

    # restore onto an absent path: no --force needed, the backup is left as it was
    target = tmp_path / "restored" / "chatdb"
    code, out, err = cli(capsys, "restore", str(dest), "--db", str(target))
    assert (code, err) == (0, "")
    assert out.startswith(f"restored {dest} to {target}: {len(expected)} keys") and out.count("\n") == 1
    assert fingerprint(dest) == backup_files
    assert contents(target) == expected

    # the restored store works, and its indexes are exactly what a rebuild produces
    store = Store.open(target)
    try:
        store.save_message(Message(id="after", chat_id="c1", role="user", ts=1_800_000_000_000))
        live = {k: v for k, v in dump(store).items() if k.startswith(INDEX_PREFIXES)}
        rebuild_indexes(store)
        assert {k: v for k, v in dump(store).items() if k.startswith(INDEX_PREFIXES)} == live
    finally:
        store.close()
    changed = contents(target)

    # --force over a non-empty store: the old one is renamed aside, intact, never deleted
    code, out, err = cli(capsys, "restore", str(dest), "--db", str(target), "--force")
    assert (code, err) == (0, "")
    [aside] = leftovers(target.parent)
    assert aside.startswith("chatdb.before-restore-") and f"moved to {target.parent / aside}" in out
    assert contents(target.parent / aside) == changed
    assert contents(target) == expected


def test_an_empty_destination_directory_is_allowed_and_an_unmigrated_store_stays_as_it_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    source = tmp_path / "original-chatdb"
    write_legacy_db(source)  # written by the original server: schema version 0, no ix: keys
    dest = tmp_path / "copy"
    dest.mkdir()
    code, out, err = cli(capsys, "backup", str(dest), "--db", str(source))
    assert (code, err) == (0, "")
    assert "schema version 0" in out
    raw = Rdict(str(source), Options(raw_mode=True), access_type=AccessType.read_only(False))
    try:
        original = dict(raw.items())
    finally:
        raw.close()
    assert contents(dest) == original


def test_the_default_store_is_the_configured_one(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "configured"
    fill(source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KTULHU_DB_PATH", "configured")
    code, out, err = cli(capsys, "backup", "copy")
    assert (code, err) == (0, "")
    assert contents(tmp_path / "copy") == contents(source)


# --- (2) consistency while another process is writing ------------------------------------------

#: Keys of the wide batch each step writes: all of a step's keys must be in a backup, or none.
WIDE = 25
CHATS = 5
READY = 300
MAX_STEPS = 200_000

WRITER = textwrap.dedent(f"""
    import sys, time
    from pathlib import Path
    from rocksdict import WriteBatch
    from ktulhu.store import Message, Store

    path, stop = Path(sys.argv[1]), Path(sys.argv[2])
    store = Store.open(path)
    db = store._rdict()

    def step(i):
        chat = f"c{{i % {CHATS}}}"
        store.save_message(Message(id=f"m{{i}}", chat_id=chat, role="user", text="x" * 100, ts=1_700_000_000_000 + i))
        store.touch_chat(chat, "dev1", now=1_700_000_000_000 + i)
        batch = WriteBatch(raw_mode=True)
        for j in range({WIDE}):
            batch.put(b"test:wide:%08d:%02d" % (i, j), b"%d" % i)
        if i:
            batch.delete(b"test:last:%08d" % (i - 1))
        batch.put(b"test:last:%08d" % i, b"")
        db.write(batch)

    i = 0
    while i < {READY}:
        step(i)
        i += 1
    print(sum(1 for _ in db.keys()), flush=True)  # the key count before any backup started
    while i < {MAX_STEPS} and not stop.exists():
        step(i)
        i += 1
        if i % 150 == 0:
            db.flush()  # WAL switches and purges, new SSTs and compactions while the backup reads
    while not stop.exists():
        time.sleep(0.01)
    step(i)  # at least one write after the backup finished
    i += 1
    print(i, flush=True)
    store.close()
""")


def test_backup_while_another_process_writes_is_a_point_in_time_copy(tmp_path: Path) -> None:
    source, stop, dest = tmp_path / "chatdb", tmp_path / "stop", tmp_path / "backup"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(source), str(stop)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None
        keys_before = int(writer.stdout.readline())
        result = subprocess.run(
            [sys.executable, "-m", "ktulhu", "store", "backup", str(dest), "--db", str(source)],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )
        stop.touch()
        steps = int(writer.stdout.readline())
        assert writer.wait(timeout=60) == 0
    finally:
        stop.touch()
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and str(dest) in result.stdout

    keys_after = len(contents(source))
    store = Store.open(dest)
    try:
        assert store.schema_version == SCHEMA_VERSION
        everything = dump(store)
        assert keys_before <= len(everything) < keys_after
        assert f"{len(everything)} keys" in result.stdout

        # the wide batches: a gap-free run of whole batches, each with all its keys
        wide: dict[int, int] = {}
        for key in everything:
            if key.startswith(b"test:wide:"):
                step = int(key.split(b":")[2])
                wide[step] = wide.get(step, 0) + 1
        whole = len(wide)
        assert READY <= whole < steps
        assert sorted(wide) == list(range(whole)) and set(wide.values()) == {WIDE}
        # a batch that deletes one key and puts another: exactly the latest one is there
        assert [k for k in everything if k.startswith(b"test:last:")] == [b"test:last:%08d" % (whole - 1)]

        # messages: a prefix of the writes (step `whole` may have saved its message, not its wide batch)
        messages = [m for c in range(CHATS) for m in store.list_messages_for_chat(f"c{c}")]
        saved = len(messages)
        assert saved in (whole, whole + 1)
        assert sorted(int(m.id[1:]) for m in messages) == list(range(saved))
        for c in range(CHATS):
            thread = store.list_messages_for_chat(f"c{c}")
            assert [m.id for m in thread] == [f"m{i}" for i in range(c, saved, CHATS)]
            assert [m.seq for m in thread] == list(range(1, len(thread) + 1))  # no gap in the numbering
            chat = store.load_chat(f"c{c}")
            assert chat is not None
            last_touch = chat.updated_ts - 1_700_000_000_000
            assert last_touch % CHATS == c and whole - CHATS <= last_touch < saved
            # the chat and its recency index entry were one batch: exactly one entry, the current one
            entries = [k for k in everything if k.startswith(keys.IX_CHAT_UPDATED) and k.endswith(b":c%d" % c)]
            assert entries == [keys.ix_chat_updated(chat.updated_ts, chat.id)]

        # every index entry is exactly what a rebuild from the copied records produces
        live = {k: v for k, v in everything.items() if k.startswith(INDEX_PREFIXES)}
        rebuild_indexes(store)
        assert {k: v for k, v in dump(store).items() if k.startswith(INDEX_PREFIXES)} == live
        assert store.statistics().corrupt_records == 0
    finally:
        store.close()


# --- (3) refusals change nothing ---------------------------------------------------------------


def refused(code: int, err: str, command: str, words: str) -> None:
    assert code == 1
    assert err.count("\n") == 1 and err.startswith(f"ktulhu store {command}: "), err
    assert words in err, err


def test_backup_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "chatdb"
    fill(source)
    source_files = fingerprint(source)

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    taken_files = fingerprint(taken)
    code, _, err = cli(capsys, "backup", str(taken), "--db", str(source))
    refused(code, err, "backup", "exists and is not empty")
    assert fingerprint(taken) == taken_files

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    code, _, err = cli(capsys, "backup", str(a_file), "--db", str(source))
    refused(code, err, "backup", "is not a directory")

    code, _, err = cli(capsys, "backup", str(source / "inside"), "--db", str(source))
    refused(code, err, "backup", "inside the store")

    code, _, err = cli(capsys, "backup", str(tmp_path / "new"), "--db", str(tmp_path / "missing"))
    refused(code, err, "backup", "does not exist")
    assert not (tmp_path / "new").exists() and not (tmp_path / "missing").exists()

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "notes.txt").write_text("not a database")
    garbage_files = fingerprint(garbage)
    code, _, err = cli(capsys, "backup", str(tmp_path / "new"), "--db", str(garbage))
    refused(code, err, "backup", "is not a store")

    bogus = tmp_path / "bogus"
    bogus.mkdir()
    (bogus / "CURRENT").write_text("MANIFEST-000099\n")
    bogus_files = fingerprint(bogus)
    code, _, err = cli(capsys, "backup", str(tmp_path / "new"), "--db", str(bogus))
    refused(code, err, "backup", "cannot read the store")
    assert fingerprint(bogus) == bogus_files and fingerprint(garbage) == garbage_files

    assert not (tmp_path / "new").exists()
    assert leftovers(tmp_path) == []
    assert fingerprint(source) == source_files


def test_a_failed_copy_leaves_no_directory_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "chatdb"
    fill(source)

    def broken(view: Rdict, tmp: Path) -> None:
        (tmp / "000001.sst").write_bytes(b"half")
        raise BackupError("disk full")

    monkeypatch.setattr(backup_module, "_copy", broken)
    with pytest.raises(BackupError, match="disk full"):
        backup(source, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    assert leftovers(tmp_path) == []


LOCK_HOLDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from ktulhu.store import Store
    store = Store.open(Path(sys.argv[1]))
    print("ready", flush=True)
    sys.stdin.readline()
    store.close()
""")


def test_restore_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "chatdb"
    fill(source)
    good = tmp_path / "good-backup"
    assert cli(capsys, "backup", str(good), "--db", str(source))[0] == 0
    good_files = fingerprint(good)

    # onto a store a server has open: refused, with or without --force
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(source)], cwd=REPO,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "ready"
        source_files = fingerprint(source)
        for extra in ((), ("--force",)):
            code, _, err = cli(capsys, "restore", str(good), "--db", str(source), *extra)
            refused(code, err, "restore", "is in use")
        assert fingerprint(source) == source_files
        holder.stdin.write("done\n")
        holder.stdin.flush()
        assert holder.wait(timeout=60) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()

    # onto a non-empty store without --force
    source_files = fingerprint(source)
    code, _, err = cli(capsys, "restore", str(good), "--db", str(source))
    refused(code, err, "restore", "pass --force")
    assert fingerprint(source) == source_files

    # from something that is not a backup
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "notes.txt").write_text("not a database")
    target = tmp_path / "fresh"
    for src, words in ((tmp_path / "missing", "does not exist"), (garbage, "is not a store")):
        code, _, err = cli(capsys, "restore", str(src), "--db", str(target), "--force")
        refused(code, err, "restore", words)
    assert not target.exists()

    # onto itself
    code, _, err = cli(capsys, "restore", str(good), "--db", str(good), "--force")
    refused(code, err, "restore", "overlap")

    assert fingerprint(good) == good_files
    assert fingerprint(source) == source_files
    assert leftovers(tmp_path) == []
