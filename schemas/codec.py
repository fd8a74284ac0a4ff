"""Typed msgpack messages: a dataclass's annotations are its schema.

    @message("plan", version=1)
    @dataclass
    class PlanMessage: ...

    data = encode(msg)                  # msgpack map: {"t": type, "v": version, field: value, ...}
    msg = decode(PlanMessage, data)     # checks type, version, every field's type and size; else SchemaError
    msg = decode(PlanMessage, data, limits)   # and its value ranges too (msg.validate, schemas/limits.py)

Field types: bool, int, float, str, bytes, None, X | None, unions, list[X], tuple[X, ...], dict[K, V] and nested
dataclasses. Sizes: strings, bytes, lists and maps are bounded (field(metadata={"max_len": n}) or the defaults),
so a malformed or hostile message fails with a message naming the field, never with a crash downstream.
No pickle: only plain msgpack values cross a wire.

Speed: every token of a small model's 30,000 a second is encoded by a detokenizer and decoded by a gateway, so
each message type gets, once, a reader and a writer made for its fields (_reader, _writer): the reader takes the
message's values when they are exactly what the schema says (no type reflection, no path strings per field), and
declines anything else to the full checker (_from_wire), which alone decides what is wrong and words the error.
"""
from __future__ import annotations

import dataclasses
import operator
import types
import typing
from functools import cache
from typing import Any, Callable, TypeVar

import msgpack

MAX_MESSAGE_BYTES = 64 << 20
MAX_STR = 1 << 22        # characters
MAX_LIST = 1 << 22       # items
MAX_MAP = 1 << 16        # keys

T = TypeVar("T")
_WIRE_SCALARS = {int, float, str, bytes, bool, type(None)}


class SchemaError(ValueError):
    """A message that is not what its schema says: wrong type, version, field type or size."""


def message(type_name: str, version: int = 1):
    """Class decorator: names a dataclass as a wire message type with a version."""
    def wrap(cls):
        cls.MESSAGE_TYPE, cls.MESSAGE_VERSION = type_name, version
        return cls
    return wrap


def encode(msg: Any) -> bytes:
    body = _to_wire(msg)
    body["t"], body["v"] = msg.MESSAGE_TYPE, msg.MESSAGE_VERSION
    return msgpack.packb(body, use_bin_type=True)


def decode(cls: type[T], data: bytes, limits: Any = None) -> T:
    """The message in data; with limits (schemas.limits.Limits), its values checked too (cls.validate)."""
    msg = _decode(cls, data)
    if limits is not None and hasattr(cls, "validate"):      # a message without one has no ranges to check
        msg.validate(limits)
    return msg


def _decode(cls: type[T], data: bytes) -> T:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SchemaError(f"{cls.MESSAGE_TYPE}: expected bytes, got {type(data).__name__}")
    if len(data) > MAX_MESSAGE_BYTES:
        raise SchemaError(f"{cls.MESSAGE_TYPE}: message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as e:
        raise SchemaError(f"{cls.MESSAGE_TYPE}: not valid msgpack ({e})") from None
    if not isinstance(body, dict):
        raise SchemaError(f"{cls.MESSAGE_TYPE}: expected a map, got {type(body).__name__}")
    kind, version = body.pop("t", None), body.pop("v", None)
    if kind != cls.MESSAGE_TYPE:
        raise SchemaError(f"expected a {cls.MESSAGE_TYPE!r} message, got {kind!r}")
    if version != cls.MESSAGE_VERSION:
        raise SchemaError(f"{cls.MESSAGE_TYPE}: version {version!r}, this build speaks {cls.MESSAGE_VERSION}")
    try:
        return _reader(cls)(body)
    except _Declined:                  # something is wrong, or rare: the full checker decides and says what
        return _from_wire(body, cls, cls.MESSAGE_TYPE)


# ---- to the wire ---------------------------------------------------------------------------------------------
def _to_wire(value: Any) -> Any:
    if type(value) in _WIRE_SCALARS:   # most fields: asked first, as every token's reply walks here
        return value
    if dataclasses.is_dataclass(value):
        return _writer(type(value))(value)
    if type(value) is list and set(map(type, value)) <= _WIRE_SCALARS:
        return value                 # token ids, stamps, request ids: msgpack takes the list as it is
    if isinstance(value, (list, tuple)):
        return [_to_wire(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_wire(v) for k, v in value.items()}
    return value


@cache
def _writer(cls) -> Callable[[Any], dict]:
    """A dataclass's fields as a map: those of a scalar schema type (a union of them, a list of them) taken as
    they are, in one C-speed getter, the others (nested messages) walked."""
    hints = _hints(cls)
    plain = tuple(name for name, (tp, _, _) in hints.items() if _is_scalar(tp) or (
        typing.get_origin(tp) is list and _is_scalar((typing.get_args(tp) or (Any,))[0])))
    nested = tuple(name for name in hints if name not in plain)
    get_plain = operator.attrgetter(*plain) if len(plain) > 1 else lambda value: (getattr(value, plain[0]),)

    def write(value: Any) -> dict:
        body = dict(zip(plain, get_plain(value))) if plain else {}
        for name in nested:
            body[name] = _to_wire(getattr(value, name))
        return body
    return write


def _is_scalar(tp: Any) -> bool:
    return all(o in _WIRE_SCALARS for o in _options(tp))


def _options(tp: Any) -> tuple:
    """A union's types; any other type alone."""
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


# ---- from the wire, checked ----------------------------------------------------------------------------------
@cache
def _plain_types(tp: Any) -> frozenset | None:
    """The exact Python types a value of type tp may be on the wire, when they need no conversion: int, str,
    None and their unions (never bool: type(True) is bool). None for any other type."""
    options = _options(tp)
    return frozenset(options) if all(o in (int, str, type(None)) for o in options) else None


class _Declined(Exception):
    """A compiled reader met a value that is not exactly what its schema says (or a rare form it leaves alone)."""


def _decline(value: Any) -> Any:
    raise _Declined


@cache
def _reader(tp: Any, max_len: int | None = None) -> Callable[[Any], Any]:
    """A function that returns what _from_wire(value, tp, path, max_len) returns, for the values it takes, and
    raises _Declined for any other: it never accepts what the full checker would refuse, nor converts otherwise
    (tests/test_schemas.py holds the two to that)."""
    if dataclasses.is_dataclass(tp):
        fields = tuple((name, _reader(ftype, flen), required) for name, (ftype, flen, required) in _hints(tp).items())
        names = frozenset(name for name, _, _ in fields)

        def read_dataclass(value: Any) -> Any:
            if type(value) is not dict or not value.keys() <= names:
                raise _Declined
            kwargs = {}
            for name, read, required in fields:
                if name in value:
                    kwargs[name] = read(value[name])
                elif required:
                    raise _Declined
            try:
                return tp(**kwargs)
            except (TypeError, ValueError):             # its own validation: the full checker words it
                raise _Declined from None
        return read_dataclass

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    plain = _plain_types(tp)
    if plain is not None:                               # int, str, None and their unions: taken as they are
        limit = max_len or MAX_STR

        def read_plain(value: Any) -> Any:
            kind = type(value)
            if kind not in plain or (kind is str and len(value) > limit):
                raise _Declined
            return value
        return read_plain
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) != 1:
            return _decline                             # other unions (a float among them converts ints): rare
        inner = _reader(options[0], max_len)
        return lambda value: None if value is None else inner(value)
    if origin in (list, tuple):
        limit = max_len or MAX_LIST
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            parts = tuple(_reader(a) for a in args)

            def read_fixed_tuple(value: Any) -> tuple:
                if type(value) is not list or len(value) != len(parts):
                    raise _Declined
                return tuple(read(v) for read, v in zip(parts, value))
            return read_fixed_tuple
        item = args[0] if args else Any
        items_plain = _plain_types(item)
        read_item = _reader(item)

        def read_list(value: Any) -> Any:
            if type(value) is not list or len(value) > limit:
                raise _Declined
            if items_plain is not None:                 # token ids, request ids: one C-speed check
                kinds = set(map(type, value))
                if not kinds <= items_plain or (str in kinds and
                                                max(len(v) for v in value if type(v) is str) > MAX_STR):
                    raise _Declined
                return value if origin is list else tuple(value)
            if item is float and origin is list and set(map(type, value)) <= {float, int}:     # stamps
                return [float(v) for v in value]
            items = [read_item(v) for v in value]
            return items if origin is list else tuple(items)
        return read_list
    if origin is dict:
        limit = max_len or MAX_MAP
        read_key, read_value = (_reader(a) for a in args)

        def read_dict(value: Any) -> dict:
            if type(value) is not dict or len(value) > limit:
                raise _Declined
            return {read_key(k): read_value(v) for k, v in value.items()}
        return read_dict
    if tp is Any:
        return lambda value: value
    if tp is float:
        def read_float(value: Any) -> float:
            kind = type(value)
            if kind is float:
                return value
            if kind is int:
                return float(value)
            raise _Declined
        return read_float
    if tp in (bool, bytes):
        limit = max_len or MAX_STR

        def read_exact(value: Any) -> Any:
            if type(value) is not tp or (tp is bytes and len(value) > limit):
                raise _Declined
            return value
        return read_exact
    return _decline


@cache
def _hints(cls) -> dict[str, tuple[Any, int | None, bool]]:
    """field name -> (type, max_len, required) for a dataclass."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        out[f.name] = (hints[f.name], f.metadata.get("max_len"), required)
    return out


def _from_wire(value: Any, tp: Any, path: str, max_len: int | None = None) -> Any:
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SchemaError(f"{path}: expected a map, got {type(value).__name__}")
        fields = _hints(tp)
        unknown = set(value) - set(fields)
        if unknown:
            raise SchemaError(f"{path}: unknown field(s) {sorted(map(str, unknown))}")
        kwargs = {}
        for name, (ftype, flen, required) in fields.items():
            if name in value:
                kwargs[name] = _from_wire(value[name], ftype, f"{path}.{name}", flen)
            elif required:
                raise SchemaError(f"{path}: missing field {name!r}")
        try:
            return tp(**kwargs)
        except (TypeError, ValueError) as e:              # the dataclass's own validation (__post_init__)
            raise SchemaError(f"{path}: {e}") from None

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _from_wire(value, option, path, max_len)
            except SchemaError as e:
                errors.append(str(e))
        raise SchemaError(errors[0] if len(errors) == 1 else f"{path}: matches none of {args}")
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise SchemaError(f"{path}: expected a list, got {type(value).__name__}")
        _check_len(path, len(value), max_len or MAX_LIST)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise SchemaError(f"{path}: expected {len(args)} items, got {len(value)}")
            return tuple(_from_wire(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        if origin is list:
            # Lists of plain values (token ids, stamps, request ids, finish reasons): a C-speed check of the whole
            # list instead of a call per item (a prompt or a plan carries up to a million of them). Anything
            # else, a wrong item included, takes the path below and its error message.
            kinds = set(map(type, value))
            plain = _plain_types(item)
            if plain is not None and kinds <= plain and (
                    str not in kinds or max(len(v) for v in value if type(v) is str) <= MAX_STR):
                return value
            if item is float and kinds <= {int, float}:
                return [float(v) for v in value]
        items = [_from_wire(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise SchemaError(f"{path}: expected a map, got {type(value).__name__}")
        _check_len(path, len(value), max_len or MAX_MAP)
        kt, vt = args
        return {_from_wire(k, kt, f"{path} key"): _from_wire(v, vt, f"{path}[{k!r}]") for k, v in value.items()}
    return _scalar(value, tp, path, max_len)


def _scalar(value: Any, tp: Any, path: str, max_len: int | None) -> Any:
    if tp is Any:
        return value
    if tp is type(None):
        if value is not None:
            raise SchemaError(f"{path}: expected nothing, got {type(value).__name__}")
        return None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SchemaError(f"{path}: expected a number, got {type(value).__name__}")
        return float(value)
    if tp is int and isinstance(value, bool):
        raise SchemaError(f"{path}: expected an integer, got a boolean")
    if tp in (int, bool, str, bytes):
        if not isinstance(value, tp):
            raise SchemaError(f"{path}: expected {tp.__name__}, got {type(value).__name__}")
        if tp in (str, bytes):
            _check_len(path, len(value), max_len or MAX_STR)
        return value
    raise TypeError(f"{path}: unsupported schema type {tp!r}")


def _check_len(path: str, n: int, limit: int) -> None:
    if n > limit:
        raise SchemaError(f"{path}: {n} items exceed the limit of {limit}")
