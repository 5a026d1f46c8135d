"""ModelPool: several GGUFs, loaded on first use, unloaded when idle or to fit the memory budget.

Real (tiny, generated) GGUFs; every wait is on the pool's own change events, bounded by fail_after.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from ktulhu.engine.pool import ModelBudgetFull, ModelPool, ModelUnavailable, UnknownModel
from ktulhu.engine.sampling import SamplingParams
from ktulhu.settings import SettingsError, load_settings

from tests.paths import REPO
from .tiny_gguf import write_tiny_gguf

LIMIT_S = 60


@pytest.fixture(scope="module")
def big_ggufs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two models of about 3.3 MiB each (the default tiny one is under 0.5 MiB)."""
    folder = tmp_path_factory.mktemp("pool")
    return (write_tiny_gguf(folder / "alpha.gguf", n_embd=256, seed=1),
            write_tiny_gguf(folder / "beta.gguf", n_embd=256, seed=2))


def _settings(tiny_gguf: Path, models: str, **env: str):
    return load_settings(environ={"LLAMA_CLI_MODEL": str(tiny_gguf), "KTULHU_MODELS": models,
                                  "LLAMA_CLI_THREADS": "1", "LLAMA_CLI_CTX": "256", "KTULHU_SLOTS": "1", **env},
                         root=REPO)


async def _run(pool: ModelPool, name: str | None) -> str:
    lease = await pool.acquire(name)
    params = SamplingParams.defaults(pool.settings, max_tokens=3, temperature=0)
    generation = await lease.engine.complete("hello", params)
    lease.follow(generation)
    with generation:
        return await generation.text()


async def test_load_on_first_use_and_unload_when_idle(tiny_gguf, tiny_model, running_engine, big_ggufs) -> None:
    alpha, _ = big_ggufs
    settings = _settings(tiny_gguf, f"alpha={alpha}|ctx=128", KTULHU_MODEL_KEEP_ALIVE="0")
    async with running_engine(tiny_model, LLAMA_CLI_MODEL=str(tiny_gguf)) as default, trio.open_nursery() as nursery:
        pool = await nursery.start(ModelPool.serve, settings, default)
        with trio.fail_after(LIMIT_S):
            assert pool.names == ["tiny", "alpha"]
            assert pool.resolve(None) == pool.resolve("tiny") == pool.resolve("tiny.gguf") == "tiny"
            with pytest.raises(UnknownModel, match="`tiny`, `alpha`"):
                pool.resolve("mistral-7b-lora")
            assert pool.resolve("mistral-7b-lora", strict=False) == "tiny"
            assert await pool.engine_for(None) is default
            assert pool.state("alpha") == "unloaded"

            # concurrent first requests load the model once
            async with trio.open_nursery() as requests:
                for _ in range(3):
                    requests.start_soon(_run, pool, "alpha")
            assert pool.loads("alpha") == 1
            alpha_card = next(d for d in pool.describe() if d["name"] == "alpha")
            assert alpha_card["settings"].ctx == 128
            # keep-alive 0: once its generations ended it unloads
            await pool.wait_until(lambda: pool.state("alpha") == "unloaded")
            assert pool.state("tiny") == "loaded"
            # and loads again on the next use
            await _run(pool, "alpha")
            assert pool.loads("alpha") == 2
            await pool.wait_until(lambda: pool.state("alpha") == "unloaded")
        nursery.cancel_scope.cancel()


async def test_running_generation_keeps_the_model(tiny_gguf, tiny_model, running_engine, big_ggufs) -> None:
    alpha, _ = big_ggufs
    settings = _settings(tiny_gguf, f"alpha={alpha}", KTULHU_MODEL_KEEP_ALIVE="0")
    async with running_engine(tiny_model, LLAMA_CLI_MODEL=str(tiny_gguf)) as default, trio.open_nursery() as nursery:
        pool = await nursery.start(ModelPool.serve, settings, default)
        with trio.fail_after(LIMIT_S):
            lease = await pool.acquire("alpha")
            params = SamplingParams.defaults(settings, max_tokens=200, temperature=0)
            generation = await lease.engine.complete("hello", params)
            lease.follow(generation)
            async for _ in generation:  # its first piece: it is running
                break
            # the default model serves meanwhile
            assert await _run(pool, None) is not None
            assert pool.state("alpha") == "loaded"
            generation.cancel()
            await pool.wait_until(lambda: pool.state("alpha") == "unloaded")
        nursery.cancel_scope.cancel()


async def test_memory_budget_evicts_idle_and_refuses_busy(tiny_gguf, tiny_model, running_engine, big_ggufs) -> None:
    alpha, beta = big_ggufs
    # default (<0.5 MiB) + one big model (3.3 MiB) fit in 5 MiB; two big ones do not
    settings = _settings(tiny_gguf, f"alpha={alpha},beta={beta}", KTULHU_MODELS_MEMORY_MB="5")
    async with running_engine(tiny_model, LLAMA_CLI_MODEL=str(tiny_gguf)) as default, trio.open_nursery() as nursery:
        pool = await nursery.start(ModelPool.serve, settings, default)
        with trio.fail_after(LIMIT_S):
            lease = await pool.acquire("alpha")
            with pytest.raises(ModelBudgetFull, match="model memory budget full"):
                await pool.acquire("beta")  # alpha is in use: it stays
            assert pool.state("alpha") == "loaded" and pool.state("beta") == "unloaded"
            lease.release()
            await _run(pool, "beta")  # alpha is idle now: unloaded to make room
            assert pool.state("alpha") == "unloaded" and pool.state("beta") == "loaded"
        nursery.cancel_scope.cancel()


async def test_a_failed_load_is_the_callers_error(tiny_gguf, tiny_model, running_engine, tmp_path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF not really")
    settings = _settings(tiny_gguf, f"broken={broken}")
    async with running_engine(tiny_model, LLAMA_CLI_MODEL=str(tiny_gguf)) as default, trio.open_nursery() as nursery:
        pool = await nursery.start(ModelPool.serve, settings, default)
        with trio.fail_after(LIMIT_S):
            with pytest.raises(ModelUnavailable, match="`broken` could not be loaded"):
                await pool.acquire("broken")
            assert pool.state("broken") == "unloaded"
            assert await _run(pool, None) is not None  # the pool still serves
        nursery.cancel_scope.cancel()


def test_settings_validation(tiny_gguf, tmp_path) -> None:
    with pytest.raises(SettingsError) as error:
        _settings(tiny_gguf, "a=x.gguf,a=y.gguf,bad name=z.gguf,tiny=w.gguf,c,d=e.gguf|ctx=1")
    problems = error.value.problems
    assert len(problems) == 5
    assert "'a' is used twice" in problems[0]
    assert "'bad name' is not 1-64 characters" in problems[1]
    assert "already the default model's name" in problems[2]
    assert "not NAME=PATH" in problems[3]
    assert "ctx must be a whole number" in problems[4]
    settings = _settings(tiny_gguf, f"gone={tmp_path / 'gone.gguf'}")
    with pytest.raises(SettingsError, match="the model 'gone' has no file at"):
        settings.check_runtime()
    assert _settings(tiny_gguf, "").model_specs == ()
