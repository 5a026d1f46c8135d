"""write_file asks before it replaces an existing file (like a command), however the path is spelled; a new
file needs no question; a refusal leaves the file untouched and is reported to the model as the result."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from ktulhu.agent.actions import Action
from ktulhu.agent.sandbox import Workspace
from ktulhu.agent.tools import ToolBox, ToolResult


class Asker:
    """Records every overwrite question and answers with `answer` (or runs `meanwhile` first)."""

    def __init__(self, answer: bool, meanwhile: Callable[[], None] | None = None) -> None:
        self.answer = answer
        self.meanwhile = meanwhile
        self.asked: list[tuple[str, int]] = []

    async def __call__(self, name: str, size: int) -> bool:
        self.asked.append((name, size))
        if self.meanwhile is not None:
            self.meanwhile()
        return self.answer


@pytest.fixture
def work(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "notes.txt").write_text("keep me\n")
    (work / "other.txt").write_text("other\n")
    os.symlink("notes.txt", work / "inner-link")
    os.symlink("../notes.txt", work / "sub" / "up-link")
    os.link(work / "notes.txt", work / "hard-link")
    return work


async def write(tools: ToolBox, path: str, content: str = "REPLACED") -> ToolResult:
    return await tools.execute(Action("write_file", {"path": path, "content": content}))


async def test_a_new_file_is_written_without_a_question(work: Path) -> None:
    asker = Asker(False)
    tools = ToolBox(Workspace.open(work), confirm_overwrite=asker)
    result = await write(tools, "new/fresh.txt", "fresh")
    assert result.ok and (work / "new" / "fresh.txt").read_text() == "fresh"
    assert asker.asked == [] and tools.files_written == 1


async def test_no_leaves_the_file_unchanged_and_tells_the_model(work: Path) -> None:
    asker = Asker(False)
    tools = ToolBox(Workspace.open(work), confirm_overwrite=asker)
    result = await write(tools, "notes.txt", "")  # emptying a file is replacing it too
    assert asker.asked == [("notes.txt", 8)]
    assert not result.ok and "did not allow replacing the existing file notes.txt" in result.text
    assert "unchanged" in result.text and result.summary == "declined: notes.txt was not replaced"
    assert (work / "notes.txt").read_text() == "keep me\n"
    assert tools.files_written == 0 and tools.overwrites_declined == 1


async def test_yes_replaces_the_file(work: Path) -> None:
    asker = Asker(True)
    tools = ToolBox(Workspace.open(work), confirm_overwrite=asker)
    result = await write(tools, "notes.txt", "new text")
    assert result.ok and asker.asked == [("notes.txt", 8)]
    assert (work / "notes.txt").read_text() == "new text" and "replaced notes.txt" in result.text
    assert tools.files_written == 1


async def test_without_a_confirmer_it_replaces_without_asking(work: Path) -> None:
    """`--yes`: ToolBox(confirm_overwrite=None)."""
    tools = ToolBox(Workspace.open(work), confirm_overwrite=None)
    result = await write(tools, "notes.txt", "new text")
    assert result.ok and (work / "notes.txt").read_text() == "new text"


@pytest.mark.parametrize("spelling", [
    "notes.txt", "./notes.txt", ".//notes.txt", "sub/../notes.txt", "inner-link", "sub/up-link", "hard-link",
    "ABSOLUTE",
])
async def test_every_spelling_of_an_existing_file_asks(work: Path, spelling: str) -> None:
    path = str(work / "notes.txt") if spelling == "ABSOLUTE" else spelling
    asker = Asker(False)
    tools = ToolBox(Workspace.open(work), confirm_overwrite=asker)
    before = {p.name: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    result = await write(tools, path)
    assert not result.ok
    if ".." not in spelling:  # `..` is refused before anything is asked
        assert len(asker.asked) == 1 and asker.asked[0][1] == 8, asker.asked
    assert {p.name: p.read_bytes() for p in work.rglob("*") if p.is_file()} == before
    assert os.path.islink(work / "inner-link") and (work / "notes.txt").read_text() == "keep me\n"


async def test_a_link_names_the_file_it_would_replace(work: Path) -> None:
    asker = Asker(False)
    tools = ToolBox(Workspace.open(work), confirm_overwrite=asker)
    await write(tools, "inner-link")
    assert asker.asked == [("notes.txt (named 'inner-link')", 8)]


async def test_a_file_swapped_while_asking_is_not_written(work: Path) -> None:
    """The user agreed to replace notes.txt; if the path leads elsewhere by then, nothing is written."""
    def swap_for_link() -> None:
        (work / "notes.txt").unlink()
        os.symlink("other.txt", work / "notes.txt")

    def swap_for_new_file() -> None:
        (work / "notes.txt").unlink()
        (work / "notes.txt").write_text("a different file\n")

    for swap, survivor, kept in ((swap_for_link, "other.txt", "other\n"),
                                 (swap_for_new_file, "notes.txt", "a different file\n")):
        tools = ToolBox(Workspace.open(work), confirm_overwrite=Asker(True, swap))
        result = await write(tools, "notes.txt")
        assert not result.ok and "changed while the user was asked" in result.text, result
        assert (work / survivor).read_text() == kept and (work / "other.txt").read_text() == "other\n"
        assert tools.files_written == 0
        (work / "notes.txt").unlink()
        (work / "notes.txt").write_text("keep me\n")


async def test_a_file_that_appears_after_the_check_is_not_clobbered(work: Path) -> None:
    """The sandbox check finds no file, then one appears before the write: O_EXCL turns it into a question."""

    class Racing(Workspace):
        def writable(self, name: object) -> Path:
            target = super().writable(name)
            if not target.exists():
                target.write_text("appeared\n")
            return target

    asker = Asker(False)
    tools = ToolBox(Racing(work.resolve()), confirm_overwrite=asker)
    result = await write(tools, "late.txt")
    assert not result.ok and asker.asked == [("late.txt", 9)]
    assert (work / "late.txt").read_text() == "appeared\n"


@given(parts=st.lists(st.sampled_from([".", "", "sub", "..", "notes.txt", "inner-link", "up-link", "hard-link",
                                       "other.txt"]), min_size=1, max_size=4))
@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
async def test_no_spelling_replaces_anything_without_a_yes(work: Path, parts: list[str]) -> None:
    before = {str(p.relative_to(work)): p.read_bytes() for p in work.rglob("*") if p.is_file()}
    asker = Asker(False)
    tools = ToolBox(Workspace.open(work), confirm_overwrite=asker)
    name = "/".join(parts)
    result = await write(tools, name)
    after = {str(p.relative_to(work)): p.read_bytes() for p in work.rglob("*") if p.is_file()}
    changed = {k for k in before if after.get(k) != before[k]}
    assert not changed, (name, result)
    if result.ok:  # only a new file may have been written, without a question
        assert asker.asked == [] and len(after) == len(before) + 1
        for created in set(after) - set(before):
            (work / created).unlink()
