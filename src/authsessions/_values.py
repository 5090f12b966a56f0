"""Session values: only plain JSON goes in, and typed reads come out strictly."""

from __future__ import annotations

import json
import math
from collections.abc import Hashable
from functools import lru_cache
from typing import Any, TypeVar, cast

from authsessions._errors import SessionDataError
from authsessions._records import dump_json, load_json

__all__ = ["MAX_NESTING", "plain_json_copy", "read_as", "require_text"]

T = TypeVar("T")

_PLAIN_TYPES: frozenset[type] = frozenset({str, int, float, bool, list, dict, type(None)})
# Exactly these classes, not subclasses: an IntEnum or a str subclass is checked the long way.
_IMMUTABLE_JSON_TYPES: frozenset[type] = frozenset({str, bool, type(None)})

MAX_NESTING = 100
"""The deepest a value's lists and dicts may nest. Deeper ones that ``json`` still wrote
(to about 900 levels) failed later, as a ``RecursionError``: copying one out of the
session (at about 500), or writing it from deeper in a store's stack."""


def plain_json_copy(value: Any, what: str, *, max_nesting: int = MAX_NESTING) -> Any:
    """A private copy of ``value`` after checking it is exactly representable as JSON.

    Rejects what ``json`` would silently change (tuples, non-string keys),
    NaN and infinities, anything JSON has no form for (sets, bytes,
    datetimes, objects), and lists and dicts nested more than ``max_nesting`` deep.

    Raises:
        SessionDataError: naming ``what`` and the reason.
    """
    if value.__class__ is str and not value.isascii():  # the usual string needs no call
        require_text(value, what)
    if (
        value.__class__ in _IMMUTABLE_JSON_TYPES
        or (value.__class__ is int and value.bit_length() < 64)
        or (value.__class__ is float and math.isfinite(value))
    ):
        # The usual value: nothing to copy, and JSON writes it exactly. A larger int goes
        # the long way: past 4300 digits Python will not write it out.
        return value
    try:
        encoded = dump_json(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise SessionDataError(
            f"{what} is not JSON-serialisable ({exc}); store plain dicts, lists, strings, "
            "numbers, booleans and None (e.g. a dataclass as dataclasses.asdict(obj))."
        ) from None
    copy = load_json(encoded)
    # dump_json writes characters past U+FFFF as an escaped surrogate pair: only then
    # can a lone surrogate be in there.
    if "\\ud" in encoded and not _is_text(copy):
        raise _lone_surrogate(what)
    # Each list or dict opens with a bracket: few of them, and it cannot nest deeply.
    if encoded.count("[") + encoded.count("{") > max_nesting and _nesting(copy) > max_nesting:
        raise SessionDataError(
            f"{what} nests lists and dicts more than {max_nesting} deep; store a flatter value."
        )
    if copy != value:  # json turned a tuple into a list or an int key into a string
        raise SessionDataError(
            f"{what} would not read back as written (a tuple, or a dict with non-string "
            "keys?); store lists and string-keyed dicts instead."
        )
    return copy


def require_text(text: str, what: str) -> None:
    """Refuse a string that holds a lone surrogate, as :func:`plain_json_copy` does.

    Raises:
        SessionDataError: naming ``what``.
    """
    if not (text.isascii() or _is_text(text)):
        raise _lone_surrogate(what)


def _is_text(value: Any) -> bool:
    """Whether the strings of plain JSON ``value`` hold only whole characters."""
    try:
        (value if value.__class__ is str else json.dumps(value, ensure_ascii=False)).encode()
    except UnicodeEncodeError:
        return False
    return True


def _lone_surrogate(what: str) -> SessionDataError:
    # Stored, it read back; but the typed get's strict JSON parser refused it.
    return SessionDataError(
        f"{what} holds a lone surrogate (half of a UTF-16 pair, as JavaScript's slice of "
        "an emoji leaves), which is not text; store whole characters."
    )


def _nesting(value: Any) -> int:
    """How deep the lists and dicts of plain JSON ``value`` nest, counted without
    recursion, up to one level past what any check allows.
    """
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if item.__class__ is list:
            children: Any = item
        elif item.__class__ is dict:
            children = item.values()
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_NESTING + 1:
            break
        pending.extend((child, depth + 1) for child in children)
    return deepest


def read_as(value: Any, type_: type[T], key: str) -> T:
    """``value`` (plain JSON) as a ``type_``, converted strictly: "1" never becomes 1.

    Plain JSON types are checked directly (an int is accepted for float);
    anything else (dataclasses, TypedDicts, pydantic models, ``list[int]``…)
    goes through pydantic in strict mode, which refuses an int too large for a
    float where a float is expected, but for a field of a model, dataclass or
    TypedDict, which reads it as its own config says (pydantic's default: inf).

    Raises:
        SessionDataError: the value does not fit ``type_``, or pydantic is
            needed for ``type_`` and not installed.
    """
    try:
        plain, hashable = type_ in _PLAIN_TYPES, True
    except TypeError:  # as Annotated[int, {"unit": "s"}]: pydantic reads it, uncached
        plain, hashable = False, False
    if plain:
        if type_ is float and type(value) is int:
            try:
                return float(value)  # type: ignore[return-value]
            except OverflowError:
                raise SessionDataError(
                    f"session key {key!r} holds an int too large for a float."
                ) from None
        if isinstance(value, type_) and not (type_ is int and isinstance(value, bool)):
            return value
        raise SessionDataError(
            f"session key {key!r} holds {type(value).__name__}, expected {type_.__name__}."
        )
    try:
        from pydantic import PydanticUserError, ValidationError
    except ImportError:
        raise SessionDataError(
            f"reading session key {key!r} as {type_!r} needs pydantic: "
            "pip install 'authsessions[pydantic]'."
        ) from None
    try:
        adapter = _adapter(cast(Hashable, type_)) if hashable else _new_adapter(type_)
    except PydanticUserError as exc:
        raise SessionDataError(f"pydantic cannot read {type_!r}: {exc.message}") from None
    try:
        result: T = adapter.validate_json(json.dumps(value), strict=True)
    except ValidationError as exc:
        raise SessionDataError(
            f"session key {key!r} cannot be read as {type_!r}: {exc.error_count()} error(s), "
            f"first: {exc.errors()[0]['msg']}."
        ) from None
    return result


def _new_adapter(type_: Any) -> Any:
    from pydantic import ConfigDict, PydanticUserError, TypeAdapter

    try:
        # Else pydantic reads an int too large for a float as inf, where a plain float
        # read refuses it.
        return TypeAdapter(type_, config=ConfigDict(allow_inf_nan=False))
    except PydanticUserError as exc:
        if exc.code != "type-adapter-config-unused":
            raise
        return TypeAdapter(type_)  # a model, dataclass or TypedDict: its own config rules


_adapter = lru_cache(maxsize=256)(_new_adapter)
