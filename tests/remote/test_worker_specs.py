"""`KTULHU_ENGINE` / `KTULHU_WORKERS`: the syntax, clear one-line errors, masked keys, implied remote
mode, no model file needed; and the rendezvous order moving only a removed worker's chats."""

from __future__ import annotations

from pathlib import Path

import pytest

from ktulhu.engine.routing import WorkerState, rank
from ktulhu.engine.worker_specs import WorkerSpec
from ktulhu.settings import SettingsError, load_settings


def test_a_worker_list_parses_with_its_options(tmp_path: Path) -> None:
    (tmp_path / "w2.key").write_text("from-a-file\n")
    s = load_settings(environ={
        "KTULHU_WORKERS": " http://10.0.0.5:8080|slots=4|key=env:W1_KEY , https://gpu2.internal/llm/v1/|slots=8|"
                          "key=file:w2.key|model=qwen2.5-7b,http://[::1]:9000|key=literal-secret,",
        "W1_KEY": "from-the-env"}, root=tmp_path)
    assert s.remote and s.engine_mode == "remote"
    assert s.sources["KTULHU_ENGINE"] == "implied by KTULHU_WORKERS"
    assert [w.url for w in s.workers] == ["http://10.0.0.5:8080", "https://gpu2.internal/llm", "http://[::1]:9000"]
    assert [w.slots for w in s.workers] == [4, 8, None]
    assert [w.key for w in s.workers] == ["from-the-env", "from-a-file", "literal-secret"]
    assert s.workers[1].model == "qwen2.5-7b"
    s.check_runtime()  # no model file, no chat template in tmp_path: remote mode needs neither
    shown = dict((env, value) for env, value, _ in s.public_items())["KTULHU_WORKERS"]
    assert shown == ("http://10.0.0.5:8080|slots=4|key=env:W1_KEY,https://gpu2.internal/llm|slots=8|key=file:w2.key|"
                     "model=qwen2.5-7b,http://[::1]:9000|key=***")
    assert "secret" not in repr(s.workers) and "from-the-env" not in repr(s)


def test_local_stays_the_default_and_an_explicit_local_wins(tmp_path: Path) -> None:
    assert not load_settings(environ={}, root=tmp_path).remote
    s = load_settings(environ={"KTULHU_ENGINE": "local", "KTULHU_WORKERS": "http://w1:8080"}, root=tmp_path)
    assert not s.remote and s.workers == (WorkerSpec("http://w1:8080"),)
    with pytest.raises(SettingsError, match="no file at"):
        s.check_runtime()  # local mode still needs its model


@pytest.mark.parametrize(("env", "message"), [
    ({"KTULHU_ENGINE": "remote"}, "KTULHU_ENGINE=remote but KTULHU_WORKERS is not set"),
    ({"KTULHU_ENGINE": "cloud"}, "KTULHU_ENGINE='cloud'"),
    ({"KTULHU_WORKERS": "w1:8080"}, "is not an http(s) URL"),
    ({"KTULHU_WORKERS": "ftp://w1"}, "is not an http(s) URL"),
    ({"KTULHU_WORKERS": "http://"}, "is not an http(s) URL"),
    ({"KTULHU_WORKERS": "http://w1:99999"}, "is not a URL"),
    ({"KTULHU_WORKERS": "http://w1:8080?x=1"}, "has a query or fragment"),
    ({"KTULHU_WORKERS": "http://user:hunter2@w1:8080"}, "carries credentials"),
    ({"KTULHU_WORKERS": "http://w1|slots=0"}, "slots='0' is not a whole number from 1 to 1024"),
    ({"KTULHU_WORKERS": "http://w1|slots=four"}, "slots='four'"),
    ({"KTULHU_WORKERS": "http://w1|weight=2"}, "unknown option 'weight=2'"),
    ({"KTULHU_WORKERS": "http://w1|slots=2|slots=3"}, "slots given twice"),
    ({"KTULHU_WORKERS": "http://w1|key=env:1BAD"}, "is not a variable name"),
    ({"KTULHU_WORKERS": "http://w1|key=env:UNSET_WORKER_KEY"}, "read from UNSET_WORKER_KEY, which is not set"),
    ({"KTULHU_WORKERS": "http://w1|key=file:nowhere.key"}, "cannot be read from"),
    ({"KTULHU_WORKERS": "http://w1,http://w1/"}, "http://w1 is listed twice"),
    ({"KTULHU_WORKERS": "http://w1|model="}, "empty model name"),
])
def test_malformed_values_are_one_clear_line(tmp_path: Path, env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(environ=env, root=tmp_path)
    [problem] = raised.value.problems
    assert message in problem and "\n" not in problem
    assert "hunter2" not in problem


def test_a_literal_key_never_appears_in_an_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(environ={"KTULHU_WORKERS": "http://w1|key=sk-verysecret|slots=0"}, root=tmp_path)
    assert "sk-verysecret" not in str(raised.value) and "key=***" in str(raised.value)


def test_removing_a_worker_moves_only_its_chats() -> None:
    workers = [WorkerState(WorkerSpec(f"http://w{i}:8080"), 4) for i in range(4)]
    keys = [f"chat-{i}" for i in range(400)]
    before = {k: rank(k, workers)[0].url for k in keys}
    after = {k: rank(k, workers[:3])[0].url for k in keys}
    moved = {k for k in keys if before[k] != after[k]}
    assert moved == {k for k in keys if before[k] == "http://w3:8080"}
    assert all(0 < sum(1 for k in keys if before[k] == w.url) for w in workers)  # each is first for some
    bigger = [WorkerState(WorkerSpec("http://big:8080"), 12), WorkerState(WorkerSpec("http://small:8080"), 4)]
    share = sum(1 for k in keys if rank(k, bigger)[0].url == "http://big:8080") / len(keys)
    assert 0.6 < share < 0.9  # weighted by slots: three times the slots, about three quarters of the chats
