"""`ktulhu agent` as a user runs it, for the review's two findings: the default model no longer replays the
prompt's example actions and a placeholder answer is not a success (exit 5); replacing an existing file asks
first (stdin, a terminal, --yes). Real-model runs where the model's choice can be pinned (temperature 0,
`--tools write_file`), and a scripted /v1 server where an exact sequence of actions is needed."""

from __future__ import annotations

import io
import json
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import attrs
import pytest
import trio

from ktulhu.agent.actions import ACTIONS, Action
from ktulhu.agent.answers import RunRecord, judge_answer, words
from ktulhu.agent.backends import Backend, Completion, LocalBackend
from ktulhu.agent.loop import AgentConfig, Console, instruction_text, run_agent, system_prompt
from ktulhu.agent.sandbox import Workspace
from ktulhu.agent.tools import ToolBox, ToolResult
from ktulhu.engine.engine import Engine
from ktulhu.engine.prompt import ChatMessage
from ktulhu.settings import Settings
from tests.paths import REPO

from .terminal import on_terminal

REVIEW_GOAL = "Create a file named fruit.txt that contains the word banana."
REPLACE_GOAL = "Replace the text in fruit.txt with apple."


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KTULHU_", "LLAMA_CLI_"))}
    env.update({"LLAMA_CLI_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    return env


def agent(work: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ktulhu", "agent", "--workdir", str(work), "--temperature", "0", "--seed", "7",
            *extra]


async def run(cmd: list[str], stdin: bytes = b"") -> tuple[int, str]:
    result = await trio.run_process(cmd, cwd=REPO, env=_env(), stdin=stdin, capture_stdout=True,
                                    capture_stderr=True, check=False)
    return result.returncode, result.stdout.decode() + result.stderr.decode()


@pytest.fixture
def fruit(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    (work / "fruit.txt").write_text("banana\n")
    os.symlink("fruit.txt", work / "link.txt")
    return work


# --- the real model ------------------------------------------------------------------------------------

class Recording:
    """Passes steps to the real model and keeps the actions it chose."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.description = inner.description
        self.texts: list[str] = []

    async def complete(self, messages: Sequence[ChatMessage], **kwargs: object) -> Completion:
        completion = await self.inner.complete(messages, **kwargs)  # type: ignore[arg-type]
        self.texts.append(completion.text)
        return completion


@attrs.define
class RecordingTools(ToolBox):
    """Runs the real tools and keeps what the run produced: the arguments and results the answer rule
    counts as evidence."""

    evidence: list[str] = attrs.Factory(list)

    async def execute(self, action: Action) -> ToolResult:
        result = await super().execute(action)
        self.evidence += [*action.args.values(), result.text]
        return result


def _run_of(words_: Sequence[str]) -> str:
    return " " + " ".join(words_) + " "


@pytest.mark.parametrize(("temperature", "seed"), [(0.0, 7), (0.8, 1)])
async def test_the_default_model_does_not_replay_the_prompt(engine: Engine, agent_settings: Settings,
                                                            tmp_path: Path, temperature: float, seed: int) -> None:
    """The review's run: whatever the goal, the model listed `.`, read notes.txt, wrote hello.txt and answered
    "what you did or found", and that was exit 0. No action may now be copied from the instructions, and an
    exit 0 answer must pass the answer rule.

    At temperature 0.8 the seed fixes the path here (the prompt names no host path: see test_sandbox), but
    the assertions hold for any path the sampler takes: the model or its numerics may change."""
    backend = Recording(LocalBackend(engine, agent_settings, "smol"))
    config = AgentConfig(goal=REVIEW_GOAL, max_steps=5, max_tokens=96, temperature=temperature, seed=seed)
    tools = RecordingTools(Workspace.open(tmp_path), cmd_timeout=5, confirm=_no_commands)
    outcome = await run_agent(config, backend, tools, Console(io.StringIO()))
    prompt = system_prompt(REVIEW_GOAL, tuple(ACTIONS), 5)
    instructions = prompt.replace(REVIEW_GOAL, "")
    actions = [json.loads(text) for text in backend.texts]
    assert actions, outcome
    for action in actions:
        assert json.dumps(action) not in prompt, action  # no example action, verbatim
        for field, value in action.items():
            if field != "action":
                assert json.dumps(value) not in instructions, (field, value)  # no example value
    if outcome.code == 0:  # an exit 0 answer is never a placeholder, nor a sentence copied from the instructions
        assert outcome.answer and judge_answer(outcome.answer, RunRecord(
            "", instruction_text(tuple(ACTIONS), 5), False)).reason != "the answer is a placeholder, not a result"
        said = words(outcome.answer)  # one word ("no", "file") is no copy; the goal and results may hold any text
        if len(said) >= 2 and not any(_run_of(said) in _run_of(words(text)) for text in (REVIEW_GOAL, *tools.evidence)):
            assert _run_of(said) not in _run_of(words(instruction_text(tuple(ACTIONS), 5))), outcome.answer
    assert outcome.code in (0, 3, 4, 5)


async def _no_commands(cmd: str) -> bool:
    return False


async def test_no_keeps_the_file_and_the_run_goes_on(fruit: Path) -> None:
    code, out = await run(agent(fruit, "--tools", "write_file", "--max-steps", "2", "--max-tokens", "160",
                                REPLACE_GOAL), stdin=b"n\n")
    assert "step 1/2: write_file" in out and "path: fruit.txt" in out, out
    assert "replace the existing file fruit.txt (7 bytes)" in out and "[y/N]" in out
    assert "declined: fruit.txt was not replaced" in out
    assert (fruit / "fruit.txt").read_text() == "banana\n"
    assert "step 2/2:" in out and code != 4, out  # a declined overwrite does not stop the run like a command
    assert "0 file(s) written, 1 overwrite(s) declined" in out


async def test_yes_replaces_the_file(fruit: Path) -> None:
    code, out = await run(agent(fruit, "--tools", "write_file", "--max-steps", "1", "--max-tokens", "160",
                                REPLACE_GOAL), stdin=b"y\n")
    assert "replace the existing file fruit.txt (7 bytes)" in out and "ok: replaced fruit.txt" in out, out
    assert (fruit / "fruit.txt").read_text() != "banana\n" and "1 file(s) written" in out


async def test_the_yes_option_replaces_without_asking(fruit: Path) -> None:
    code, out = await run(agent(fruit, "--yes", "--tools", "write_file", "--max-steps", "1", "--max-tokens", "160",
                                REPLACE_GOAL))
    assert "[y/N]" not in out and "ok: replaced fruit.txt" in out, out
    assert (fruit / "fruit.txt").read_text() != "banana\n"


async def test_a_link_to_an_existing_file_asks_too(fruit: Path) -> None:
    code, out = await run(agent(fruit, "--tools", "write_file", "--max-steps", "1", "--max-tokens", "160",
                                "Replace the text in link.txt with apple."), stdin=b"")
    assert "path: link.txt" in out, out
    assert "replace the existing file fruit.txt (named 'link.txt') (7 bytes)" in out
    assert "no answer: end of input" in out and "declined: fruit.txt (named 'link.txt') was not replaced" in out
    assert (fruit / "fruit.txt").read_text() == "banana\n" and (fruit / "link.txt").is_symlink()


async def test_the_overwrite_question_waits_on_a_terminal(fruit: Path) -> None:
    async with on_terminal(agent(fruit, "--tools", "write_file", "--max-steps", "1", "--max-tokens", "160",
                                 REPLACE_GOAL), cwd=REPO, env=_env()) as terminal:
        with trio.fail_after(180):
            await terminal.read_until(b"[y/N]")
            # A real second, on purpose: "it waits for the answer" is a negative about another process,
            # which signals nothing while it waits; one that went on would have replaced the file by now.
            await trio.sleep(1.0)
            assert terminal.proc.poll() is None and (fruit / "fruit.txt").read_text() == "banana\n"
            await terminal.type(b"n\n")
            await terminal.read_until(b"summary:")
            await terminal.proc.wait()
    seen = terminal.seen
    assert b"replace the existing file fruit.txt" in seen and b"declined: fruit.txt was not replaced" in seen
    assert (fruit / "fruit.txt").read_text() == "banana\n"


# --- a scripted model behind --server: exact action sequences through the real command line -------------

class ScriptedServer:
    """A /v1/chat/completions stand-in that answers with `replies` in turn and records each request."""

    def __init__(self, replies: Sequence[str]) -> None:
        self.replies = list(replies)
        self.requests: list[dict[str, object]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                text = server.replies.pop(0) if server.replies else act("final", answer="out of script")
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text},
                                                   "finish_reason": "stop"}], "usage": {}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> "ScriptedServer":
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted() -> Iterator[type[ScriptedServer]]:
    yield ScriptedServer


def act(name: str, **args: str) -> str:
    return Action(name, args).to_json()


async def test_a_placeholder_answer_exits_5(tmp_path: Path, scripted: type[ScriptedServer]) -> None:
    """The review's transcript, replayed exactly: on the old code this was exit 0 'final answer given'."""
    replies = [act("list_dir", path="."), act("read_file", path="notes.txt"),
               act("write_file", path="hello.txt", content="Hello\n"), act("run_cmd", cmd="ls -l"),
               act("final", answer="what you did or found"), act("final", answer="what you did or found")]
    with scripted(replies) as server:
        code, out = await run(agent(tmp_path, "--server", server.url, "--yes", "--max-steps", "8", REVIEW_GOAL))
    assert code == 5, out
    assert "rejected: the answer is a placeholder, not a result" in out and "final answer:\n" not in out
    assert "exit 5 (final answer rejected)" in out
    told = server.requests[5]["messages"][-1]  # type: ignore[index]
    assert told["role"] == "user" and "Your answer was not accepted" in told["content"]


async def test_a_real_answer_after_a_rejected_one_exits_0(tmp_path: Path, scripted: type[ScriptedServer]) -> None:
    replies = [act("final", answer="Done."), act("write_file", path="fruit.txt", content="banana"),
               act("final", answer="fruit.txt now contains banana.")]
    with scripted(replies) as server:
        code, out = await run(agent(tmp_path, "--server", server.url, "--max-steps", "5", REVIEW_GOAL))
    assert code == 0 and "rejected: no action was taken" in out and "final answer:\n  fruit.txt now" in out, out
    assert (tmp_path / "fruit.txt").read_text() == "banana"


async def test_a_declined_overwrite_is_told_to_the_model(fruit: Path, scripted: type[ScriptedServer]) -> None:
    replies = [act("write_file", path="./fruit.txt", content=""), act("write_file", path="new.txt", content="apple"),
               act("final", answer="fruit.txt was kept; apple went to new.txt")]
    with scripted(replies) as server:
        code, out = await run(agent(fruit, "--server", server.url, "--max-steps", "5", REPLACE_GOAL), stdin=b"no\n")
    assert code == 0, out
    assert out.count("[y/N]") == 1  # the new file needed no question
    assert (fruit / "fruit.txt").read_text() == "banana\n" and (fruit / "new.txt").read_text() == "apple"
    told = server.requests[1]["messages"][-1]  # type: ignore[index]
    assert "not written: the user did not allow replacing the existing file fruit.txt" in told["content"]
