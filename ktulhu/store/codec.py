"""The JSON codec of the records (`records.py`), byte-compatible with the original server.

`encode(record)` writes compact JSON (like serde_json: no spaces, non-ASCII kept as UTF-8); optional
fields of the original are written as ``null``, never omitted. Fields Ktulhu added (``seq``) are
written only when set, so a record written by the original decodes and re-encodes to the same bytes.
Unknown fields are kept in ``extra`` and written back, so nothing a newer or older writer stored is
lost on a read-modify-write.

`decode(cls, raw)` accepts what the original wrote (fields with serde defaults may be missing) and
raises `CorruptRecord` for anything else: bad JSON, a missing required field, a wrong type.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

import attrs

from .errors import CorruptRecord

try:  # orjson is 3-5x faster; the stdlib writes the same JSON (compact, UTF-8) when it is absent
    import orjson

    def _dumps(data: Any) -> bytes:
        return orjson.dumps(data)

    _loads = orjson.loads
except ImportError:  # pragma: no cover - exercised where orjson is not installed

    def _dumps(data: Any) -> bytes:
        return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()

    _loads = json.loads

__all__ = ["decode", "encode", "from_dict", "to_dict"]

_NOTHING = attrs.NOTHING
R = TypeVar("R")


@attrs.frozen
class _Spec:
    name: str
    types: tuple[type, ...] | None
    optional: bool
    new: bool
    nested: type | None
    required: bool
    default: Any  # a zero-argument callable giving the default, None when required


_SPECS: dict[type, tuple[_Spec, ...]] = {}


def _specs(cls: type) -> tuple[_Spec, ...]:
    try:
        return _SPECS[cls]
    except KeyError:
        pass
    specs = tuple(
        _Spec(
            name=a.name,
            types=a.metadata["types"],
            optional=a.metadata["optional"],
            new=a.metadata["new"],
            nested=a.metadata["nested"],
            required=a.default is _NOTHING,
            default=_default_maker(a.default),
        )
        for a in attrs.fields(cls)
        if not a.metadata.get("extra")
    )
    _SPECS[cls] = specs
    return specs


def _default_maker(default: Any) -> Any:
    if default is _NOTHING:
        return None
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        return default.factory
    return lambda: default


def to_dict(record: Any) -> dict[str, Any]:
    """The record as a JSON-ready dict in the original's field order (``extra`` fields last)."""
    out: dict[str, Any] = {}
    for spec in _specs(type(record)):
        value = getattr(record, spec.name)
        if spec.new and value is None:
            continue
        if spec.nested is not None:
            value = [to_dict(item) for item in value]
        out[spec.name] = value
    for name, value in record.extra.items():
        out.setdefault(name, value)
    return out


def encode(record: Any) -> bytes:
    """Compact UTF-8 JSON of `record`."""
    return _dumps(to_dict(record))


_MISSING = object()
# Per class: (name, exact JSON types or None for any, optional, required, default maker, nested class)
_Step = tuple[str, "frozenset[type] | None", bool, bool, Any, "type | None"]
_PLANS: dict[type, tuple[tuple[_Step, ...], frozenset[str]]] = {}


def _plan(cls: type) -> Any:
    try:
        return _PLANS[cls]
    except KeyError:
        pass
    steps = tuple(
        (s.name, None if s.types is None else frozenset(s.types), s.optional, s.required, s.default, s.nested)
        for s in _specs(cls)
    )
    plan = _PLANS[cls] = (steps, frozenset(s.name for s in _specs(cls)))
    return plan


def from_dict(cls: type[R], data: Any) -> R:
    """Build `cls` from a decoded JSON object; raise `CorruptRecord` when it does not fit.

    Types are checked exactly as JSON produces them (so ``true`` is not an int). The record is
    filled in directly (the records have no validators), which is several times faster than
    calling the generated ``__init__`` with keywords; reading long histories is dominated by this.
    """
    if type(data) is not dict:
        raise CorruptRecord(f"{cls.__name__} is not a JSON object")
    steps, names = _plan(cls)
    record = object.__new__(cls)
    known = 0
    for name, types, optional, required, default, nested in steps:
        value = data.get(name, _MISSING)
        if value is _MISSING or value is None:
            if value is None:
                known += 1
                if optional:
                    setattr(record, name, None)
                    continue
            if required:
                raise CorruptRecord(f"{cls.__name__}.{name} is {'null' if value is None else 'missing'}")
            setattr(record, name, default())  # a missing field, or a null where a default exists
            continue
        known += 1
        if types is not None and type(value) not in types:
            raise CorruptRecord(f"{cls.__name__}.{name} has type {type(value).__name__}")
        if nested is not None:
            value = [from_dict(nested, item) for item in value]
        setattr(record, name, value)
    extra = {k: v for k, v in data.items() if k not in names} if known != len(data) else {}
    record.extra = extra  # type: ignore[attr-defined]
    return record


def decode(cls: type[R], raw: bytes) -> R:
    """Decode stored bytes into `cls`; raise `CorruptRecord` on anything that is not such a record."""
    try:
        data = _loads(raw)
    except (ValueError, UnicodeDecodeError, TypeError) as error:
        raise CorruptRecord(f"{cls.__name__}: not JSON ({error})") from None
    return from_dict(cls, data)
