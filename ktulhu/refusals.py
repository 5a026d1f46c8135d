"""Why the engine could not take a prompt, as each surface says it: one table for `/ws` and HTTP.

The wire formats differ (a `/ws` error frame's code, an HTTP status with its error code), so each
row carries both; the order matters (a subclass before its base).
"""

from __future__ import annotations

import attrs

from .api.problems import Problem
from .engine.pool import ModelBudgetFull, ModelUnavailable, UnknownModel
from .engine.prompt import ContextTooLong, PromptError
from .engine.request import Busy, EngineClosed, EngineError

__all__ = ["ENGINE_REFUSALS", "http_problem", "ws_code"]


@attrs.frozen
class _Row:
    kind: type[Exception]
    #: The `/ws` error code (frame `message`, `done` reason).
    ws: str
    status: int
    code: str
    retry_after: str | None = None
    #: The HTTP error names the request field that holds the prompt.
    names_prompt: bool = False


_ROWS = (
    _Row(UnknownModel, "model_error", 404, "model_not_found"),
    _Row(ModelBudgetFull, "server_busy", 503, "server_busy", retry_after="5"),
    _Row(ModelUnavailable, "model_error", 503, "model_unavailable", retry_after="5"),
    _Row(Busy, "server_busy", 503, "server_busy", retry_after="1"),
    _Row(ContextTooLong, "context_too_long", 413, "context_too_long", names_prompt=True),
    _Row(PromptError, "model_error", 400, "invalid_prompt", names_prompt=True),
    _Row(EngineClosed, "shutting_down", 503, "engine_unavailable", retry_after="5"),
    # remote mode: no inference worker could take the prompt, or it failed
    _Row(EngineError, "model_error", 502, "generation_failed"),
)
#: Every exception the table answers (for an `except` clause).
ENGINE_REFUSALS: tuple[type[Exception], ...] = tuple(row.kind for row in _ROWS)


def _row(error: Exception) -> _Row:
    return next(row for row in _ROWS if isinstance(error, row.kind))


def ws_code(error: Exception) -> str:
    """The `/ws` error code of `error` (one of `ENGINE_REFUSALS`)."""
    return _row(error).ws


def http_problem(error: Exception, prompt_field: str, *, task: str = "generation") -> Problem:
    """The HTTP answer to `error` (one of `ENGINE_REFUSALS`); `prompt_field` names where the prompt
    was, `task` what failed when nothing more specific did (`generation_failed`, `tokenizer_failed`...)."""
    row = _row(error)
    param = "model" if isinstance(error, UnknownModel) else prompt_field if row.names_prompt else None
    code = f"{task}_failed" if row.kind is EngineError else row.code
    return Problem(row.status, code, str(error) or f"the {task} failed", param=param,
                   headers={"Retry-After": row.retry_after} if row.retry_after else None)
