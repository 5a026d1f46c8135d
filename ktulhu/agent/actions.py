"""The agent's actions: their JSON form, the GBNF grammar that forces it, and parsing.

Each model turn is exactly one JSON object with fixed keys in a fixed order, e.g.
`{"action": "run_cmd", "cmd": "ls -l"}`. Strings hold printable ASCII and the escapes
`\\"`, `\\\\`, `\\n`, `\\t`, with lengths bounded so that the whole object always fits the step's
token budget: every token the grammar lets through is at least one byte, so an object of at most
`max_tokens` bytes can never be cut off by the token limit, and every step parses.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import attrs

__all__ = ["ACTIONS", "Action", "ActionError", "action_grammar", "parse_action"]

#: name -> its string fields, in order, with the largest length each may have.
ACTIONS: dict[str, tuple[tuple[str, int], ...]] = {
    "list_dir": (("path", 256),),
    "read_file": (("path", 256),),
    "write_file": (("path", 256), ("content", 8192)),
    "run_cmd": (("cmd", 1024),),
    "final": (("answer", 2048),),
}
#: Fields that may be empty.
MAY_BE_EMPTY = frozenset({("write_file", "content")})
#: A write's path gets a third of its budget, at most this many characters (the rest is content).
WRITE_PATH_MAX = 96


class ActionError(ValueError):
    """The model's output is not a valid action; the message says why."""


@attrs.frozen(hash=False)
class Action:
    name: str
    #: The string fields, in the grammar's order.
    args: dict[str, str]

    def to_json(self) -> str:
        """The canonical form (the grammar's layout), used in the history shown to the model."""
        return json.dumps({"action": self.name, **self.args}, ensure_ascii=True)


def _skeleton(name: str) -> str:
    fields = ACTIONS[name]
    return json.dumps({"action": name, **{field: "" for field, _ in fields}})


def field_limits(name: str, max_tokens: int) -> dict[str, int] | None:
    """Longest value of each string field so the object fits `max_tokens` bytes; None if it cannot."""
    fields = ACTIONS[name]
    room = max_tokens - len(_skeleton(name)) - 1  # one token of margin
    # an escape is two bytes, so a string of n items takes at most 2n bytes
    items = room // 2
    if len(fields) == 1:
        (field, cap), = fields
        limit = min(cap, items)
        return {field: limit} if limit >= 1 else None
    (path, path_cap), (content, content_cap) = fields
    path_limit = min(path_cap, WRITE_PATH_MAX, max(1, items // 3))
    content_limit = min(content_cap, items - path_limit)
    if content_limit < 1:
        return None
    return {path: path_limit, content: content_limit}


def action_grammar(max_tokens: int, tools: Sequence[str] = tuple(ACTIONS)) -> str:
    """GBNF for one action of `tools` that always fits in `max_tokens` tokens."""
    rules = []
    alternatives = []
    for name in ACTIONS:
        if name not in tools:
            continue
        limits = field_limits(name, max_tokens)
        if limits is None:
            continue
        parts = [f'"{{\\"action\\": \\"{name}\\""']
        for field, limit in limits.items():
            low = 0 if (name, field) in MAY_BE_EMPTY else 1
            parts.append(f'", \\"{field}\\": \\"" char{{{low},{limit}}} "\\""')
        parts.append('"}"')
        rule = name.replace("_", "-")
        rules.append(f"{rule} ::= " + " ".join(parts))
        alternatives.append(rule)
    if not alternatives:
        raise ValueError(f"max tokens {max_tokens} is too small for any action; allow at least 64")
    return "\n".join([
        "root ::= " + " | ".join(alternatives),
        *rules,
        r'char ::= [ !#-\[\]-~] | "\\" ["\\nt]',
        "",
    ])


def parse_action(text: str, tools: Sequence[str] = tuple(ACTIONS)) -> Action:
    """The action in `text` (one JSON object); raises `ActionError` saying what is wrong."""
    try:
        value = json.loads(text.strip())
    except json.JSONDecodeError as error:
        raise ActionError(f"not one JSON object ({error.msg} at character {error.pos})") from None
    if not isinstance(value, dict):
        raise ActionError("not a JSON object")
    name = value.pop("action", None)
    if name not in ACTIONS or name not in tools:
        raise ActionError(f"unknown action {name!r}; use one of {', '.join(tools)}")
    expected = {field for field, _ in ACTIONS[name]}
    if set(value) != expected:
        raise ActionError(f"{name} takes exactly the fields {', '.join(sorted(expected))}")
    for field, cap in ACTIONS[name]:
        if not isinstance(value[field], str):
            raise ActionError(f"{name}: {field} must be a string")
        if not value[field] and (name, field) not in MAY_BE_EMPTY:
            raise ActionError(f"{name}: {field} must not be empty")
        if len(value[field]) > cap:
            raise ActionError(f"{name}: {field} is longer than {cap} characters")
    return Action(name, {field: value[field] for field, _ in ACTIONS[name]})
