"""Several GGUFs behind one server: the default model's engine (always running) and the models of
KTULHU_MODELS, loaded on first use and unloaded once idle for KTULHU_MODEL_KEEP_ALIVE seconds.

    ModelPool.serve (engine service nursery)
    └── model:<name>   one per loaded model: Model.load on a worker thread, Engine.run in its own
                       nursery, then waits (keep-alive deadline, recomputed on every use) until the
                       model has been idle long enough or is evicted, stops the engine, frees the model

`acquire(name)` returns a `Lease` on the chosen model's engine: while any lease of a model is held
(a prompt being built, a generation running: `Lease.follow(generation)` releases it when the
generation ends) the model is never unloaded. Callers that ask for a model being loaded wait for
that one load. With KTULHU_MODELS_MEMORY_MB, a load first unloads idle models, least recently used
first, until the GGUF file sizes of what is loaded fit; when they cannot, `ModelBudgetFull`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import attrs
import trio

from ..settings import Settings
from .engine import Engine
from .model import Model
from .model_specs import ModelSpec
from .request import Generation

__all__ = ["Lease", "ModelBudgetFull", "ModelPool", "ModelUnavailable", "UnknownModel"]

log = logging.getLogger("ktulhu.engine.pool")


class UnknownModel(Exception):
    """A request named a model this server does not serve; the message lists those it does."""


class ModelBudgetFull(Exception):
    """The model cannot be loaded now: KTULHU_MODELS_MEMORY_MB is taken by models in use."""


class ModelUnavailable(Exception):
    """The model's load failed (the message says why)."""


@attrs.define(eq=False)
class _Entry:
    name: str
    #: None for the default model (always loaded, never unloaded).
    spec: ModelSpec | None
    settings: Settings
    size: int
    state: str = "unloaded"  # unloaded | loading | loaded | unloading
    engine: Engine | None = None
    #: Leases held (including callers waiting for the load).
    in_flight: int = 0
    last_used: float = 0.0
    evict: bool = False
    error: BaseException | None = None
    #: How many times the model was loaded (tests, metrics).
    loads: int = 0
    changed: trio.Event = attrs.field(factory=trio.Event)


@attrs.define(eq=False)
class Lease:
    """A model in use: `engine` stays running until `release()` (idempotent)."""

    pool: ModelPool
    entry: _Entry
    released: bool = False

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def engine(self) -> Engine:
        assert self.entry.engine is not None
        return self.entry.engine

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.pool._release(self.entry)

    def follow(self, generation: Generation) -> None:
        """Release when `generation` ends."""
        generation.when_finished(self.release)


class ModelPool:
    """The models this server serves. Start it with `nursery.start(ModelPool.serve, settings, engine)`."""

    def __init__(self, settings: Settings, default: Engine, nursery: trio.Nursery,
                 sizes: dict[str, int]) -> None:
        self.settings = settings
        self._nursery = nursery
        #: The other models report to whatever the default engine reports to.
        self._events = default.events
        #: The process's requests on their way: every model's idle worker may wait for them (bounded).
        self._arrivals = default.arrivals
        self.default_name = settings.model_name
        self._aliases = {settings.model_file.name, settings.model_path}
        default_entry = _Entry(self.default_name, None, settings, sizes[self.default_name], state="loaded",
                               engine=default, loads=1)
        self._entries: dict[str, _Entry] = {self.default_name: default_entry}
        for spec in settings.model_specs:
            own = attrs.evolve(settings, model_path=str(settings.path(spec.path)),
                               ctx=spec.ctx or settings.ctx, slots=spec.slots or settings.n_slots)
            self._entries[spec.name] = _Entry(spec.name, spec, own, sizes[spec.name])
        self._changed = trio.Event()

    @classmethod
    async def serve(cls, settings: Settings, default: Engine, *,
                    task_status: trio.TaskStatus[ModelPool] = trio.TASK_STATUS_IGNORED) -> None:
        def sizes() -> dict[str, int]:
            found = {settings.model_name: _file_size(settings.model_file)}
            for spec in settings.model_specs:
                found[spec.name] = _file_size(settings.path(spec.path))
            return found

        measured = await trio.to_thread.run_sync(sizes)
        async with trio.open_nursery() as nursery:
            task_status.started(cls(settings, default, nursery, measured))
            await trio.sleep_forever()  # the models' tasks run here until the engine service stops

    # --- what requests use -----------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def resolve(self, name: str | None, *, strict: bool = True) -> str:
        """The configured model `name` picks. No name, the default's name or file name -> the default.
        Without KTULHU_MODELS any name is the default (as before several models existed); with it an
        unknown name raises `UnknownModel` when `strict`, and is the default otherwise (the web
        client's legacy names)."""
        if not name or name in self._aliases:
            return self.default_name
        if name in self._entries:
            return name
        if strict and len(self._entries) > 1:
            raise UnknownModel(f"the model `{name[:100]}` does not exist; this server serves "
                               + ", ".join(f"`{n}`" for n in self._entries))
        return self.default_name

    async def acquire(self, name: str | None, *, strict: bool = True) -> Lease:
        """A lease on the model `name` picks (`resolve`), loading it first when needed. Raises
        `UnknownModel`, `ModelBudgetFull` or `ModelUnavailable`."""
        entry = self._entries[self.resolve(name, strict=strict)]
        entry.in_flight += 1  # from now on the model is in use: never evicted, never reaped
        self._touch(entry)
        try:
            while entry.state != "loaded":
                if entry.state == "unloaded":
                    await self._make_room(entry)
                    if entry.state != "unloaded":  # another caller started it meanwhile
                        continue
                    entry.state, entry.error = "loading", None
                    self._notify(entry)
                    self._nursery.start_soon(self._serve_model, entry, name=f"model:{entry.name}")
                changed = entry.changed
                await changed.wait()
                if entry.state == "unloaded" and entry.error is not None:
                    raise ModelUnavailable(f"the model `{entry.name}` could not be loaded: {entry.error}")
        except BaseException:
            self._release(entry)
            raise
        return Lease(self, entry)

    async def engine_for(self, name: str | None, *, strict: bool = True) -> Engine:
        """The engine of the model `name` picks, loaded if needed (no lease is kept: the model may
        unload once idle; request paths use `acquire`)."""
        lease = await self.acquire(name, strict=strict)
        try:
            return lease.engine
        finally:
            lease.release()

    def describe(self) -> list[dict[str, Any]]:
        """One record per model, the default first: name, engine (None unless loaded), loaded,
        state, settings, loads, in_flight."""
        return [{"name": e.name, "engine": e.engine if e.state == "loaded" else None, "loaded": e.state == "loaded",
                 "state": e.state, "settings": e.settings, "loads": e.loads, "in_flight": e.in_flight,
                 "default": e.spec is None}
                for e in self._entries.values()]

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once `predicate()` holds; it is checked on every change of any model's state or use."""
        while not predicate():
            await self._changed.wait()

    def state(self, name: str) -> str:
        return self._entries[name].state

    def loads(self, name: str) -> int:
        return self._entries[name].loads

    # --- internals -------------------------------------------------------------------------------

    def _notify(self, entry: _Entry) -> None:
        entry.changed.set()
        entry.changed = trio.Event()
        self._changed.set()
        self._changed = trio.Event()

    def _touch(self, entry: _Entry) -> None:
        entry.last_used = trio.current_time()
        self._notify(entry)  # the reaper recomputes its deadline

    def _release(self, entry: _Entry) -> None:
        entry.in_flight -= 1
        self._touch(entry)

    async def _make_room(self, entry: _Entry) -> None:
        budget = self.settings.models_memory_mb << 20
        if not budget:
            return
        while True:
            used = sum(e.size for e in self._entries.values() if e.state != "unloaded" and e is not entry)
            if used + entry.size <= budget:
                return
            unloading = [e for e in self._entries.values() if e.state == "unloading"]
            if unloading:  # its memory comes back soon
                await unloading[0].changed.wait()
                continue
            idle = sorted((e for e in self._entries.values()
                           if e.spec is not None and e.state == "loaded" and e.in_flight == 0),
                          key=lambda e: e.last_used)
            if not idle:
                raise ModelBudgetFull(f"model memory budget full: `{entry.name}` needs {_mib(entry.size)} MiB, "
                                      f"{_mib(used)} of KTULHU_MODELS_MEMORY_MB={self.settings.models_memory_mb} "
                                      "are held by models in use; try again shortly")
            victim = idle[0]
            log.info("unloading model %s to make room for %s", victim.name, entry.name)
            victim.state, victim.evict = "unloading", True
            self._notify(victim)

    async def _serve_model(self, entry: _Entry) -> None:
        """Load, run until idle past keep-alive (or evicted), stop, free. Failures are the entry's
        `error` (the waiting callers raise it), never the pool's."""
        model: Model | None = None
        try:
            model = await trio.to_thread.run_sync(Model.load, entry.settings, abandon_on_cancel=True)
            engine = Engine(model, entry.settings, events=self._events, arrivals=self._arrivals)
            async with trio.open_nursery() as nursery:
                await nursery.start(engine.run)
                entry.engine, entry.state, entry.loads = engine, "loaded", entry.loads + 1
                entry.last_used = trio.current_time()
                log.info("model %s loaded", entry.name)
                self._notify(entry)
                await self._until_idle(entry)
                entry.state = "unloading"
                self._notify(entry)
                nursery.cancel_scope.cancel()
        except Exception as exc:  # noqa: BLE001 - one model's failure must not stop the others
            log.warning("model %s failed: %s", entry.name, exc)
            entry.error = exc
        finally:
            entry.engine = None
            if model is not None:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(model.close)
            entry.state, entry.evict = "unloaded", False
            log.info("model %s unloaded", entry.name)
            self._notify(entry)

    async def _until_idle(self, entry: _Entry) -> None:
        keep_alive = self.settings.model_keep_alive
        while not entry.evict:
            changed = entry.changed
            if entry.in_flight:
                await changed.wait()
                continue
            with trio.move_on_at(entry.last_used + keep_alive) as waited:
                await changed.wait()
            if waited.cancelled_caught and entry.in_flight == 0:
                return


def _file_size(path: Any) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _mib(size: int) -> int:
    return (size + (1 << 20) - 1) >> 20
