"""`ktulhu agent --server`: the same loop against a real Ktulhu server's /v1/chat/completions."""

from __future__ import annotations

import os
import re
import sys
import uuid
from pathlib import Path

import trio

from ktulhu.agent.actions import action_grammar, parse_action
from ktulhu.agent.backends import server_backend
from ktulhu.agent.loop import system_prompt
from ktulhu.auth.api_keys import create_key
from ktulhu.engine.prompt import ChatMessage
from ktulhu.store.records import User


async def _api_key(server) -> str:
    store = server.runtime.store
    user = User(id=uuid.uuid4().hex, created_ts=1_700_000_000_000, email="agent@example.com")
    await store.aio.save_user(user)
    _, key = await store.aio.run(create_key, store, user.id, "agent")
    return key


async def test_agent_runs_against_a_live_server(live_server, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("hello\n")
    async with live_server(KTULHU_FREE_GENERATIONS="1000", KTULHU_ANON_RATE="0") as server:
        key = await _api_key(server)
        # the client alone: a grammar-constrained step through the server parses
        async with server_backend(server.url, key, timeout=120) as backend:
            goal = "List the files."
            completion = await backend.complete(
                [ChatMessage("system", system_prompt(goal, ("list_dir", "final"), 30)),
                 ChatMessage("user", f"Goal: {goal}\nWhat is your first action?")],
                max_tokens=96, grammar_for=lambda n: action_grammar(n, ("list_dir", "final")), temperature=0.0,
                seed=1,
            )
            assert parse_action(completion.text, ("list_dir", "final")).name in ("list_dir", "final")
        # the whole command line, served by the running server
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KTULHU_", "LLAMA_CLI_"))}
        result = await trio.run_process(
            [sys.executable, "-m", "ktulhu", "agent", "--workdir", str(work), "--server", server.url,
             "--api-key", key, "--yes", "--max-steps", "3", "--max-tokens", "96", "--temperature", "0.5",
             "--seed", "3", "--tools", "list_dir,read_file", "Say what notes.txt contains."],
            cwd=tmp_path, env=env, capture_stdout=True, capture_stderr=True, check=False,
        )
        out = result.stdout.decode()
        assert result.returncode in (0, 3), out + result.stderr.decode()
        assert f"model: server {server.url}" in out
        assert re.search(r"^step 1/3: (list_dir|read_file|final) ", out, re.MULTILINE), out
        assert "not a valid action" not in out
        # a wrong key is a clear failure, not a crash
        result = await trio.run_process(
            [sys.executable, "-m", "ktulhu", "agent", "--workdir", str(work), "--server", server.url,
             "--api-key", "ktk_nope_nope", "--yes", "goal"],
            cwd=tmp_path, env=env, capture_stdout=True, capture_stderr=True, check=False,
        )
        out = result.stdout.decode()
        assert result.returncode == 1 and "HTTP 401" in out, out
