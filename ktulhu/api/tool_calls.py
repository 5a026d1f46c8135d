"""OpenAI function calling for `/v1/chat/completions`, template-agnostic (llama-server's "generic" format).

Works on any model, whatever its chat template knows about tools:

- The declared tools (name, description, JSON-schema parameters) are described in the system
  prompt, with how to answer: one JSON object, `{"tool_call": {"name", "arguments"}}` or
  `{"response": "..."}`.
- The reply is constrained by a grammar made with `json_grammar` from a JSON schema: under
  `tool_choice` `auto` a `oneOf` of one `tool_call` branch per tool (the name a `const`, the
  arguments that tool's `parameters`) and the `response` branch; under `required` the tool
  branches only; naming a function, that function's branch only; `none` offers nothing and
  constrains nothing.
- History is rendered as text the model can follow: an assistant message's `tool_calls` become
  its content (the same JSON it would write), a `tool` message becomes a user turn
  "Tool result for call <id> (<name>): ...", consecutive results one turn.
- The reply's JSON becomes the OpenAI message: `tool_calls` (one call, `finish_reason`
  `tool_calls`) or `content`.

In remote mode the same schema goes to the worker as a `json_schema` `response_format` (llama-server
and vLLM build their own grammar from it), so the worker needs no tool support of its own.

Limits: at most one call per reply (`parallel_tool_calls` is accepted, and changes nothing); a
stream's tool call (or response) arrives whole at the end, since the JSON must be complete to be
read; a reply cut short (`max_tokens`, a `stop` string) before its JSON was complete keeps its
finish reason and returns what it can as `content` (the response's text so far, else the raw text).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from ..engine.prompt import ChatMessage
from ..engine.sampling import SCHEMA_MAX_CHARS, json_grammar
from .problems import Problem

__all__ = ["MAX_TOOLS", "Tool", "ToolPlan", "ToolReply", "assistant_calls", "parse_tools", "tool_result"]

MAX_TOOLS = 128
#: Most calls one assistant message of the history may hold.
MAX_HISTORY_CALLS = 128
MAX_CALL_ID_CHARS = 512
MAX_DESCRIPTION_CHARS = 8192
_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_TOOL_KEYS = frozenset({"type", "function"})
_FUNCTION_KEYS = frozenset({"name", "description", "parameters", "strict"})
_RESULT_KEYS = frozenset({"role", "content", "tool_call_id", "name"})
_CALL_KEYS = frozenset({"id", "type", "function", "index"})
_CALL_FUNCTION_KEYS = frozenset({"name", "arguments"})
#: A function declared without `parameters` takes none: its arguments are `{}`.
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
_RESPONSE = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"],
             "additionalProperties": False}
_RESPONSE_START = re.compile(r'\s*\{\s*"response"\s*:\s*"')
RESULT_PREFIX = "Tool result for call"


def _bad(param: str, message: str, code: str = "invalid_value") -> Problem:
    return Problem(400, code, f"`{param}`: {message}", param=param)


def _shown(name: str) -> str:
    return name if len(name) <= 64 else name[:64] + "..."


def _unknown_keys(value: Mapping[str, Any], allowed: frozenset[str], where: str, holds: str) -> None:
    for key in value:
        if key not in allowed:
            raise _bad(f"{where}.{_shown(key)}", f"unknown field; {holds}", "unknown_parameter")


@attrs.frozen
class Tool:
    """A declared function: its name, description and parameters' JSON schema."""

    name: str
    description: str | None
    parameters: dict[str, Any] | None

    def declared(self) -> dict[str, Any]:
        """How the system prompt shows it."""
        shown: dict[str, Any] = {"name": self.name}
        if self.description:
            shown["description"] = self.description
        shown["parameters"] = self.parameters if self.parameters is not None else _NO_PARAMETERS
        return shown


@attrs.frozen
class ToolReply:
    """A tool-using reply read back: a call (`content` None) or a text."""

    content: str | None
    call: dict[str, Any] | None
    finish_reason: str

    def message(self) -> dict[str, Any]:
        """The `choices[0].message` object."""
        if self.call is None:
            return {"role": "assistant", "content": self.content}
        return {"role": "assistant", "content": None, "tool_calls": [self.call]}

    def deltas(self) -> list[dict[str, Any]]:
        """The stream's deltas after the role chunk (the finish reason comes in the last chunk)."""
        if self.call is None:
            return [{"content": self.content}] if self.content else []
        function = self.call["function"]
        return [{"tool_calls": [{"index": 0, "id": self.call["id"], "type": "function",
                                 "function": {"name": function["name"], "arguments": ""}}]},
                {"tool_calls": [{"index": 0, "function": {"arguments": function["arguments"]}}]}]


@attrs.frozen
class ToolPlan:
    """What a request's `tools` and `tool_choice` ask for: the tools offered, the choice
    (`auto`, `required`, or a function's name), the grammar every reply follows and, for remote
    workers, the same constraint as a `response_format` object (JSON text)."""

    tools: tuple[Tool, ...]
    choice: str
    grammar: str
    response_format: str

    def system_block(self) -> str:
        listed = "\n".join(json.dumps(tool.declared(), ensure_ascii=False) for tool in self.tools)
        call = '{"tool_call": {"name": "<tool name>", "arguments": {<the arguments, as its parameters say>}}}'
        if self.choice == "auto":
            how = (f"Answer with one JSON object: either {call} to call a tool, or "
                   '{"response": "<your reply>"} to reply to the user directly.')
        elif self.choice == "required":
            how = f"Answer by calling one of these tools, with one JSON object: {call}"
        else:
            how = (f'Answer by calling the tool "{self.choice}", with one JSON object: '
                   f'{{"tool_call": {{"name": "{self.choice}", "arguments": {{...}}}}}}')
        return (f"You can call these tools (functions):\n{listed}\n\n{how}\n"
                f'A tool\'s result comes back in a message beginning "{RESULT_PREFIX}".')

    def apply(self, messages: Sequence[ChatMessage]) -> list[ChatMessage]:
        """`messages` with the tools described at the end of the system prompt (a new first
        message when there is none)."""
        block = self.system_block()
        if messages and messages[0].role == "system":
            first = messages[0].content
            return [ChatMessage("system", f"{first}\n\n{block}" if first else block), *messages[1:]]
        return [ChatMessage("system", block), *messages]

    def reply(self, text: str, finish_reason: str) -> ToolReply:
        """The model's constrained text read back. A complete call is a call, whatever ended the
        generation; anything else keeps `finish_reason` (`stop` or `length`)."""
        value: Any = None
        arguments: str | None = None
        try:
            value = json.loads(text)
            called = value.get("tool_call") if isinstance(value, dict) else None
            if isinstance(called, dict):
                arguments = json.dumps(called.get("arguments", {}), ensure_ascii=False, separators=(",", ":"))
        except (ValueError, RecursionError):  # incomplete, or (an argument schema allowing any JSON) too deep
            value = None
        if isinstance(value, dict):
            called = value.get("tool_call")
            if isinstance(called, dict) and called.get("name") in {t.name for t in self.tools} and arguments:
                call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                        "function": {"name": called["name"], "arguments": arguments}}
                return ToolReply(None, call, "tool_calls")
            if isinstance(value.get("response"), str):
                return ToolReply(value["response"], None, finish_reason)
        return ToolReply(_partial_response(text), None, finish_reason)


def _partial_response(text: str) -> str:
    """The text of an unfinished `{"response": "...` (a reply cut short), else `text` as it is."""
    start = _RESPONSE_START.match(text)
    if start is None:
        return text
    rest = text[start.end():]
    end, i = len(rest), 0
    while i < len(rest):
        if rest[i] == "\\":
            i += 2
            continue
        if rest[i] == '"':
            end = i
            break
        i += 1
    body = rest[:end]
    for cut in range(7):  # an escape cut in the middle (`\u00`) is dropped
        try:
            decoded = json.loads('"' + body[:len(body) - cut] + '"')
        except ValueError:
            continue
        if isinstance(decoded, str):
            return decoded
    return text


# --- the request's tools --------------------------------------------------------------------------


def parse_tools(body: Mapping[str, Any]) -> ToolPlan | None:
    """The request's `tools` and `tool_choice` (already checked to be a list/str/dict or null):
    None when no tool is offered (none declared, or `tool_choice` `none`). Every declared tool is
    checked even then. Raises `Problem` (400) naming the field at fault."""
    tools = _tools(body.get("tools") or [])
    choice = _choice(body.get("tool_choice"), tools)
    if choice == "none" or not tools:
        return None
    for name in ("grammar", "response_format"):
        value = body.get(name)
        if value is not None and not (name == "response_format" and isinstance(value, dict)
                                      and value.get("type") == "text"):
            raise _bad(name, "a reply that may call tools follows the tools' own format; send either tools "
                             "(with a tool_choice other than none) or this field, not both")
    if body.get("logprobs") is True:
        raise _bad("logprobs", "log probabilities are not returned for a reply that may call tools",
                   "unsupported_parameter")
    offered = tools if choice in ("auto", "required") else tuple(t for t in tools if t.name == choice)
    try:
        schema = _reply_schema(offered, with_response=choice == "auto")
        grammar = json_grammar(schema)
    except RecursionError:
        raise _bad("tools", "the tools' parameter schemas are nested too deeply") from None
    except ValueError as exc:
        _blame_one(tools)
        raise _bad("tools", f"the tools' parameter schemas together cannot be turned into a grammar: {exc}") from None
    response_format = {"type": "json_schema", "json_schema": {"name": "tool_reply", "strict": True, "schema": schema}}
    return ToolPlan(tools, choice, grammar, json.dumps(response_format))


def _tools(raw: list[Any]) -> tuple[Tool, ...]:
    if len(raw) > MAX_TOOLS:
        raise _bad("tools", f"at most {MAX_TOOLS} tools may be declared, got {len(raw)}")
    tools: list[Tool] = []
    seen: set[str] = set()
    size = 0
    for i, item in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(item, dict):
            raise _bad(where, 'must be an object: {"type": "function", "function": {"name": ...}}', "invalid_type")
        _unknown_keys(item, _TOOL_KEYS, where, "a tool holds type and function")
        if item.get("type") != "function":
            raise _bad(f"{where}.type", "must be `function` (the only kind of tool)")
        function = item.get("function")
        if not isinstance(function, dict):
            raise _bad(f"{where}.function", "must be an object with the function's name", "invalid_type")
        where = f"{where}.function"
        _unknown_keys(function, _FUNCTION_KEYS, where, "a function holds name, description, parameters, strict")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise _bad(f"{where}.name", "must be 1 to 64 letters, digits, underscores or dashes")
        if name in seen:
            raise _bad(f"{where}.name", f"the name {name} is declared twice")
        seen.add(name)
        description = function.get("description")
        if description is not None and not (isinstance(description, str)
                                            and len(description) <= MAX_DESCRIPTION_CHARS):
            raise _bad(f"{where}.description", f"must be a string of at most {MAX_DESCRIPTION_CHARS} characters")
        strict = function.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise _bad(f"{where}.strict", "must be true or false (replies always follow the schema here)",
                       "invalid_type")
        parameters = function.get("parameters")
        if parameters is not None:
            if not isinstance(parameters, dict):
                raise _bad(f"{where}.parameters", "must be a JSON schema object", "invalid_type")
            try:
                size += len(json.dumps(parameters))
            except RecursionError:
                raise _bad(f"{where}.parameters", "the JSON schema is nested too deeply") from None
            except (TypeError, ValueError):  # cannot happen for parsed JSON; a caller's dict may hold anything
                raise _bad(f"{where}.parameters", "must be a JSON schema object") from None
            if size > SCHEMA_MAX_CHARS:
                raise _bad(f"{where}.parameters", f"the tools' parameter schemas together must be at most "
                                                  f"{SCHEMA_MAX_CHARS} characters as JSON")
            _check_refs(parameters, f"{where}.parameters")
        tools.append(Tool(name, description, parameters))
    return tuple(tools)


def _choice(raw: Any, tools: tuple[Tool, ...]) -> str:
    if raw is None:
        return "auto" if tools else "none"
    if isinstance(raw, str):
        if raw not in ("none", "auto", "required"):
            raise _bad("tool_choice", 'must be none, auto, required or {"type": "function", "function": '
                                      '{"name": ...}}')
        if raw == "required" and not tools:
            raise _bad("tool_choice", "`required` needs at least one tool in `tools`")
        return raw
    if not isinstance(raw, dict):
        raise _bad("tool_choice", "must be a string or an object", "invalid_type")
    _unknown_keys(raw, frozenset({"type", "function"}), "tool_choice", "it holds type and function")
    if raw.get("type") != "function":
        raise _bad("tool_choice.type", "must be `function`")
    function = raw.get("function")
    if not isinstance(function, dict):
        raise _bad("tool_choice.function", 'must be an object: {"name": ...}', "invalid_type")
    _unknown_keys(function, frozenset({"name"}), "tool_choice.function", "it holds the function's name")
    name = function.get("name")
    if not isinstance(name, str) or name not in {tool.name for tool in tools}:
        shown = _shown(name) if isinstance(name, str) else repr(name)[:64]
        raise _bad("tool_choice.function.name", f"names no declared tool ({shown}); it must be one of the names "
                                                "in `tools`")
    return name


def _check_refs(schema: Any, where: str) -> None:
    """Only references into the schema's own `$defs`/`definitions` can be moved into the combined
    reply schema; any other `$ref` is refused."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if ref is not None and not (isinstance(ref, str) and ref.startswith(("#/$defs/", "#/definitions/"))):
                raise _bad(where, "a `$ref` must point into the schema's own `$defs` or `definitions` "
                                  f"(#/$defs/...), got {str(ref)[:80]!r}")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _relocated(schema: dict[str, Any], index: int, defs: dict[str, Any]) -> dict[str, Any]:
    """A copy of tool `index`'s parameters whose `$defs`/`definitions` move to the combined
    schema's `$defs` (into `defs`) under names of their own, and whose `$ref`s follow them."""
    prefixes = {"$defs": f"t{index}-", "definitions": f"t{index}d-"}

    def move(node: Any) -> Any:
        if isinstance(node, list):
            return [move(x) for x in node]
        if not isinstance(node, dict):
            return node
        copy = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                kind, _, rest = value[2:].partition("/")
                copy[key] = f"#/$defs/{prefixes[kind]}{rest}"
            else:
                copy[key] = move(value)
        return copy

    moved = move(schema)
    for kind, prefix in prefixes.items():
        found = moved.pop(kind, None)
        if isinstance(found, dict):
            for name, sub in found.items():
                defs[f"{prefix}{name}"] = sub
    return moved


def _reply_schema(tools: Sequence[Tool], *, with_response: bool) -> dict[str, Any]:
    defs: dict[str, Any] = {}
    branches: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        parameters = _NO_PARAMETERS if tool.parameters is None else _relocated(tool.parameters, i, defs)
        call = {"type": "object", "properties": {"name": {"const": tool.name}, "arguments": parameters},
                "required": ["name", "arguments"], "additionalProperties": False}
        branches.append({"type": "object", "properties": {"tool_call": call}, "required": ["tool_call"],
                         "additionalProperties": False})
    if with_response:
        branches.append(_RESPONSE)
    schema: dict[str, Any] = {"oneOf": branches}
    if defs:
        schema["$defs"] = defs
    return schema


def _blame_one(tools: Sequence[Tool]) -> None:
    """Raise a `Problem` naming the first tool whose parameters alone cannot become a grammar."""
    for i, tool in enumerate(tools):
        if tool.parameters is None:
            continue
        try:
            json_grammar(tool.parameters)
        except ValueError as exc:
            raise _bad(f"tools[{i}].function.parameters", str(exc)) from None
        except RecursionError:
            raise _bad(f"tools[{i}].function.parameters", "the JSON schema is nested too deeply") from None


# --- the history ----------------------------------------------------------------------------------


def assistant_calls(raw: Any, where: str, content: str, calls: dict[str, str]) -> str:
    """An assistant message's `tool_calls` as the text the model would have written (after its
    `content`, if any); records each call's id -> name in `calls`. Raises `Problem`."""
    param = f"{where}.tool_calls"
    if not isinstance(raw, list):
        raise _bad(param, "must be an array of tool calls", "invalid_type")
    if len(raw) > MAX_HISTORY_CALLS:
        raise _bad(param, f"may hold at most {MAX_HISTORY_CALLS} calls")
    lines = [content] if content else []
    for i, call in enumerate(raw):
        at = f"{param}[{i}]"
        if not isinstance(call, dict):
            raise _bad(at, 'must be an object: {"id", "type": "function", "function": {"name", "arguments"}}',
                       "invalid_type")
        _unknown_keys(call, _CALL_KEYS, at, "a tool call holds id, type and function")
        call_id = call.get("id")
        if not isinstance(call_id, str) or not 0 < len(call_id) <= MAX_CALL_ID_CHARS:
            raise _bad(f"{at}.id", f"must be a string of 1 to {MAX_CALL_ID_CHARS} characters")
        if call.get("type", "function") != "function":
            raise _bad(f"{at}.type", "must be `function`")
        index = call.get("index")
        if index is not None and (isinstance(index, bool) or not isinstance(index, int)):
            raise _bad(f"{at}.index", "must be a whole number", "invalid_type")
        function = call.get("function")
        if not isinstance(function, dict):
            raise _bad(f"{at}.function", "must be an object with name and arguments", "invalid_type")
        _unknown_keys(function, _CALL_FUNCTION_KEYS, f"{at}.function", "it holds name and arguments")
        name = function.get("name")
        if not isinstance(name, str) or not 0 < len(name) <= 64:
            raise _bad(f"{at}.function.name", "must be a string of 1 to 64 characters")
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, str):
            raise _bad(f"{at}.function.arguments", "must be a string (the arguments as JSON)", "invalid_type")
        try:
            shown: Any = json.loads(arguments) if arguments.strip() else {}
            line = json.dumps({"tool_call": {"name": name, "arguments": shown}}, ensure_ascii=False)
        except (ValueError, RecursionError):  # a model's malformed (or absurdly deep) arguments: kept as text
            line = json.dumps({"tool_call": {"name": name, "arguments": arguments}}, ensure_ascii=False)
        calls[call_id] = name
        lines.append(line)
    return "\n".join(lines)


def tool_result(item: Mapping[str, Any], where: str, content: str, calls: Mapping[str, str]) -> str:
    """A `tool` message (its `content` already read as text) as a user turn's text. Raises `Problem`."""
    _unknown_keys(item, _RESULT_KEYS, where, "a tool message holds role, content and tool_call_id")
    call_id = item.get("tool_call_id")
    if not isinstance(call_id, str) or not 0 < len(call_id) <= MAX_CALL_ID_CHARS:
        raise _bad(f"{where}.tool_call_id", f"must be the id of the call answered (a string of 1 to "
                                            f"{MAX_CALL_ID_CHARS} characters)")
    name = item.get("name")
    if name is not None and not (isinstance(name, str) and 0 < len(name) <= 64):
        raise _bad(f"{where}.name", "must be the function's name (1 to 64 characters)")
    name = calls.get(call_id) or name
    named = f" ({name})" if name else ""
    return f"{RESULT_PREFIX} {call_id}{named}:\n{content}"
