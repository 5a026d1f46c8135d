"""Hostile paths against the file tools: nothing outside the working directory is read, listed or written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from ktulhu.agent.actions import Action
from ktulhu.agent.sandbox import SandboxError, Workspace
from ktulhu.agent.tools import READ_LIMIT, ToolBox


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    """work/ (the workspace) next to outside/ (holding a secret), with links from inside to outside."""
    work, outside = tmp_path / "work", tmp_path / "outside"
    work.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("TOP SECRET")
    (work / "notes.txt").write_text("hello from inside\n")
    (work / "sub").mkdir()
    (work / "sub" / "deep.txt").write_text("deep")
    os.symlink(outside / "secret.txt", work / "link-to-secret")
    os.symlink(outside, work / "outdir")  # a directory link: writes "through" it must be refused
    os.symlink(outside / "missing.txt", work / "dangling-out")
    os.symlink(work / "notes.txt", work / "inner-link")
    os.symlink("../outside", work / "sub" / "relative-out")
    return work, outside


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


HOSTILE = [
    "../outside/secret.txt", "sub/../../outside/secret.txt", "..", "../", "./../outside", "sub/..",
    "link-to-secret", "outdir/secret.txt", "outdir/new.txt", "outdir", "dangling-out",
    "sub/relative-out/secret.txt", "sub/relative-out/new.txt", "outdir/a/b/c.txt",
    "/etc/passwd", "/tmp", "/", "//etc/passwd", "\x00", "notes.txt\x00.png", "a\nb", "", "  ",
]


@pytest.mark.parametrize("name", HOSTILE)
async def test_hostile_paths_are_refused_by_every_tool(layout: tuple[Path, Path], name: str) -> None:
    work, outside = layout
    before = _snapshot(outside)
    tools = ToolBox(Workspace.open(work))
    for action in (Action("read_file", {"path": name}), Action("list_dir", {"path": name}),
                   Action("write_file", {"path": name, "content": "pwned"})):
        result = await tools.execute(action)
        assert not result.ok, (action, result)
        assert "TOP SECRET" not in result.text
        assert "secret.txt" not in result.text or "refused" in result.text
        # the model sees no host path: the prompt (and so a seeded run) does not depend on where it runs
        assert str(work) not in result.text and str(outside) not in result.text, result.text
    assert _snapshot(outside) == before
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]


async def test_absolute_paths_inside_and_inner_links_are_allowed(layout: tuple[Path, Path]) -> None:
    work, _ = layout
    tools = ToolBox(Workspace.open(work))
    result = await tools.execute(Action("read_file", {"path": str(work / "notes.txt")}))
    assert result.ok and "hello from inside" in result.text
    result = await tools.execute(Action("read_file", {"path": "inner-link"}))
    assert result.ok and "hello from inside" in result.text
    result = await tools.execute(Action("write_file", {"path": "inner-link", "content": "changed"}))
    assert result.ok and (work / "notes.txt").read_text() == "changed" and (work / "inner-link").is_symlink()


async def test_write_creates_parents_inside_and_lists(layout: tuple[Path, Path]) -> None:
    work, _ = layout
    tools = ToolBox(Workspace.open(work))
    result = await tools.execute(Action("write_file", {"path": "new/dir/file.txt", "content": "x\ny\n"}))
    assert result.ok, result
    assert (work / "new" / "dir" / "file.txt").read_text() == "x\ny\n"
    listing = await tools.execute(Action("list_dir", {"path": "."}))
    assert listing.ok
    assert "new/" in listing.text and "notes.txt (18 bytes)" in listing.text and "outdir@ (symlink)" in listing.text
    assert tools.files_written == 1


async def test_write_refuses_directories_and_special_files(layout: tuple[Path, Path]) -> None:
    work, _ = layout
    os.mkfifo(work / "pipe")
    tools = ToolBox(Workspace.open(work))
    for name in (".", "sub", "pipe", "notes.txt/inner"):
        result = await tools.execute(Action("write_file", {"path": name, "content": "x"}))
        assert not result.ok, name
    with trio.fail_after(5):  # a FIFO must not block the reader
        result = await tools.execute(Action("read_file", {"path": "pipe"}))
    assert not result.ok and "not a regular file" in result.text


async def test_read_reports_binary_and_truncates(layout: tuple[Path, Path]) -> None:
    work, _ = layout
    (work / "blob.bin").write_bytes(b"\x7fELF\x00\x01\x02" * 10)
    (work / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (work / "big.txt").write_text("é" * READ_LIMIT)  # 2 bytes a character: the cut falls inside one
    tools = ToolBox(Workspace.open(work))
    blob = await tools.execute(Action("read_file", {"path": "blob.bin"}))
    assert blob.ok and "binary file of 70 bytes" in blob.text and "ELF" not in blob.text
    assert "binary" in (await tools.execute(Action("read_file", {"path": "latin1.txt"}))).text
    big = await tools.execute(Action("read_file", {"path": "big.txt"}))
    assert big.ok and "[truncated: first 16384 of 32768 bytes shown]" in big.text
    assert big.text.count("é") == READ_LIMIT // 2
    directory = await tools.execute(Action("read_file", {"path": "sub"}))
    assert not directory.ok and "use list_dir" in directory.text
    missing = await tools.execute(Action("read_file", {"path": "nope.txt"}))
    assert not missing.ok and "does not exist" in missing.text


def test_workspace_must_be_an_existing_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    for bad in (tmp_path / "missing", tmp_path / "file"):
        with pytest.raises(SandboxError):
            Workspace.open(bad)


path_text = st.lists(
    st.sampled_from(["..", ".", "", "/", "outdir", "link-to-secret", "sub", "relative-out", "dangling-out",
                     "notes.txt", "secret.txt", "x", "\\", "~", "%2e%2e", "..."]),
    max_size=6,
).map("/".join) | st.text(max_size=30)


@given(name=path_text)
@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_path_resolves_inside_or_is_refused(layout: tuple[Path, Path], name: str) -> None:
    work, outside = layout
    workspace = Workspace.open(work)
    for check in (workspace.existing, workspace.writable):
        try:
            resolved = check(name)
        except SandboxError:
            continue
        assert resolved.is_relative_to(work.resolve())
        assert not resolved.is_relative_to(outside.resolve())
        assert ".." not in resolved.parts
