"""Strict checks of JSON documents read from untrusted files (the shard manifest): every field present,
of its type and in its range. Each function returns the value or raises SchemaError naming the field."""
from __future__ import annotations

import re
from typing import Any

SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class SchemaError(ValueError):
    """A document that does not follow its schema; the message names the field."""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def field(d: dict, key: str, where: str) -> Any:
    """d[key], or SchemaError when `d` is not an object or lacks `key`."""
    if not isinstance(d, dict):
        raise SchemaError(f"{where or 'the document'} must be a JSON object, got {_short(d)}")
    if key not in d:
        raise SchemaError(f"{where + '.' if where else ''}{key} is missing")
    return d[key]


def _expect(ok: bool, value: Any, path: str, what: str) -> None:
    if not ok:
        raise SchemaError(f"{path} must be {what}, got {_short(value)}")


def _path(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def integer(d: dict, key: str, where: str = "", minimum: int = 0) -> int:
    value = field(d, key, where)
    _expect(isinstance(value, int) and not isinstance(value, bool) and value >= minimum, value,
            _path(where, key), f"an integer >= {minimum}")
    return value


def string(d: dict, key: str, where: str = "", pattern: re.Pattern | None = None, what: str = "a string") -> str:
    value = field(d, key, where)
    _expect(isinstance(value, str) and (pattern is None or bool(pattern.fullmatch(value))), value,
            _path(where, key), what)
    return value


def optional_string(d: dict, key: str, where: str = "") -> str | None:
    value = field(d, key, where)
    _expect(value is None or isinstance(value, str), value, _path(where, key), "a string or null")
    return value


def boolean(d: dict, key: str, where: str = "") -> bool:
    value = field(d, key, where)
    _expect(isinstance(value, bool), value, _path(where, key), "true or false")
    return value


def obj(d: dict, key: str, where: str = "") -> dict:
    value = field(d, key, where)
    _expect(isinstance(value, dict), value, _path(where, key), "a JSON object")
    return value


def array(d: dict, key: str, where: str = "") -> list:
    value = field(d, key, where)
    _expect(isinstance(value, list), value, _path(where, key), "a list")
    return value


def numbers(d: dict, key: str, where: str = "", length: int | None = None, positive: bool = False) -> list[float]:
    value = array(d, key, where)
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and (not positive or v > 0) for v in value)
    what = " ".join(w for w in ("a list of", str(length) if length is not None else "",
                                 "positive" if positive else "", "numbers") if w)
    _expect(ok and (length is None or len(value) == length), value, _path(where, key), what)
    return [float(v) for v in value]


def sha256(d: dict, key: str, where: str = "") -> str:
    return string(d, key, where, SHA256_HEX, "a sha256 (64 lowercase hex digits)")
