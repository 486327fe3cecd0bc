"""The field machinery of the request schema: one `FieldSpec` per field, the read-only
namespaces that hold them, and the check of one value against its spec.

`pipeline.schema` declares the actual fields with these; nothing here knows a field's name.
Plain Python (no torch), like the schema.
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import KW_ONLY, dataclass, replace
from typing import Any

from pipeline.errors import InvalidInput, shorten

REQUIRED = object()  # sentinel default of a required field
# Control characters are looked for in this many leading characters (the longest text field,
# a prompt, is 2000; a data: URI is bounded elsewhere and only its head is scanned).
CONTROL_SCAN_CHARS = 4000


@dataclass(frozen=True)
class FieldSpec:
    """One request field: its JSON type, default and limits. `name` is the attribute name in its
    namespace (`Inputs`, `OutputInputs`), filled in there."""

    kind: type  # str, int, float, bool, or list (of `items` objects)
    default: Any
    description: str
    _: KW_ONLY
    ge: float | None = None
    le: float | None = None
    multiple_of: int | None = None
    choices: tuple[str, ...] | None = None
    max_length: int | None = None
    min_length: int | None = None
    nullable: bool = False
    cog_name: str | None = None  # the Cog input name, when it differs (flattened `output.*`)
    runpod_only: bool = False  # no Cog input (Cog returns the file itself)
    cog_max_length: bool = True  # False: Cog is not told max_length (image_url: data: URIs)
    # True: the Cog input defaults to None, which stands for "omitted" (so the schema's own
    # default can depend on other fields, as `cfg` does on `preset`).
    cog_optional: bool = False
    # A last rule after the type and limits: (value, dotted name) -> the value kept.
    refine: Callable[[Any, str], Any] | None = None
    # kind list: the namespace of each entry's fields, and how many entries (at least one).
    items: Any = None
    max_items: int | None = None
    name: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def cog_default(self) -> Any:
        """The Cog input's default: a list travels as a JSON string, empty when omitted; an
        optional input (`cog_optional`) is None, standing for omitted."""
        if self.kind is list:
            return ""
        return None if self.cog_optional else self.default

    @property
    def cog_key(self) -> str:
        """The Cog input's name."""
        return self.cog_name or self.name

    def cog(self) -> dict[str, Any]:
        """Keyword arguments for `cog.Input(...)`: `Input(**Inputs.width.cog())`."""
        kwargs: dict[str, Any] = {"description": self.description}
        if self.kind is list:  # Cog: one string input holding the list as JSON
            return {**kwargs, "default": self.cog_default}
        if not self.required:
            kwargs["default"] = self.cog_default
        for key in ("ge", "le", "max_length"):
            value = getattr(self, key)
            if value is not None:
                kwargs[key] = value
        if self.choices is not None:
            kwargs["choices"] = list(self.choices)
        if not self.cog_max_length:
            kwargs.pop("max_length", None)
        return kwargs


class SpecNamespace(type):
    """Metaclass of the field namespaces: each `FieldSpec` attribute is named after itself, the
    class iterates over them in declaration order, and nothing can be set or deleted later."""

    def __new__(mcs, name: str, bases: tuple[type, ...], namespace: dict[str, Any]):
        specs = {key: replace(value, name=key) for key, value in namespace.items()
                 if isinstance(value, FieldSpec)}
        return super().__new__(mcs, name, bases,
                               {**namespace, **specs, "_specs": tuple(specs.values())})

    def __iter__(cls) -> Iterator[FieldSpec]:
        return iter(cls._specs)

    def __len__(cls) -> int:
        return len(cls._specs)

    def __setattr__(cls, key: str, value: Any) -> None:
        raise AttributeError(f"{cls.__name__} is read-only (the schema is declared once)")

    def __delattr__(cls, key: str) -> None:
        raise AttributeError(f"{cls.__name__} is read-only (the schema is declared once)")


def _check_number(spec: FieldSpec, name: str, value: Any) -> int | float:
    # bool is a subclass of int in Python; JSON true is never a number.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(name, f"must be {kind_name(spec)}, got {type_name(value)} "
                                 f"{shorten(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidInput(name, f"must be a finite number, got {value}")
    if spec.kind is int:
        if isinstance(value, float):
            if not value.is_integer():
                raise InvalidInput(name, f"must be an integer, got {shorten(value)}")
            value = int(value)
    else:
        value = float(value)
    if spec.ge is not None and value < spec.ge:
        raise InvalidInput(name, f"must be at least {_num(spec.ge)}, got {shorten(value)}")
    if spec.le is not None and value > spec.le:
        raise InvalidInput(name, f"must be at most {_num(spec.le)}, got {shorten(value)}")
    if spec.multiple_of and value % spec.multiple_of:
        raise InvalidInput(name, f"must be a multiple of {spec.multiple_of}, got {value}")
    return value


def _check_text(spec: FieldSpec, name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidInput(name, f"must be a string, got {type_name(value)} {shorten(value)}")
    if spec.max_length is not None and len(value) > spec.max_length:
        raise InvalidInput(name, f"must be at most {spec.max_length} characters, "
                                 f"got {len(value)}")
    if "\x00" in value or any(unicodedata.category(ch) == "Cc" and ch not in "\n\r\t"
                              for ch in value[:CONTROL_SCAN_CHARS]):
        raise InvalidInput(name, f"must not contain control characters, got {shorten(value)}")
    if spec.min_length and len(value.strip()) < spec.min_length:
        raise InvalidInput(name, f"must not be empty, got {shorten(value)}")
    if spec.choices is not None and value.lower() not in spec.choices:
        raise InvalidInput(name, f"must be one of {', '.join(spec.choices)}, "
                                 f"got {shorten(value)}")
    return value.lower() if spec.choices is not None else value


def _reject_unknown(value: dict, specs: tuple[FieldSpec, ...], prefix: str,
                    also_known: tuple[str, ...] = ()) -> None:
    known = {spec.name for spec in specs} | set(also_known)
    unknown = [key for key in value if key not in known]
    if unknown:
        name = prefix + (str(unknown[0]) or repr(unknown[0]))
        raise InvalidInput(name, f"is not a known field (known: {', '.join(sorted(known))})")


def check_object(value: dict, specs: tuple[FieldSpec, ...], prefix: str,
                 also_known: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every spec's value from the object `value` (its default when omitted), checked; names
    in errors are `prefix` + the field's name."""
    _reject_unknown(value, specs, prefix, also_known)
    values: dict[str, Any] = {}
    for spec in specs:
        if spec.name in value:
            values[spec.name] = check_field(spec, value[spec.name], prefix + spec.name)
        elif spec.required:
            raise InvalidInput(prefix + spec.name, "is required")
        else:
            values[spec.name] = spec.default
    return values


def _check_list(spec: FieldSpec, name: str, value: Any) -> list[Any] | None:
    """A list of objects, each checked against the namespace `spec.items`, or of values, each
    checked against the one spec `spec.items`; a string is the list as JSON (Cog has no such
    input), the empty string meaning omitted."""
    of = "strings" if isinstance(spec.items, FieldSpec) else "objects"
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except ValueError as error:
            raise InvalidInput(name, f"must be a JSON array of {of}, got {shorten(value)} "
                                     f"({error.msg} at character {error.pos})") from None
    if not isinstance(value, list):
        raise InvalidInput(name, f"must be an array of {of}, got {type_name(value)} "
                                 f"{shorten(value)}")
    if not value:
        raise InvalidInput(name, "must hold at least one entry, got an empty array")
    if spec.max_items is not None and len(value) > spec.max_items:
        raise InvalidInput(name, f"must hold at most {spec.max_items} entries, got {len(value)}")
    if isinstance(spec.items, FieldSpec):
        return [check_field(spec.items, entry, f"{name}[{position}]")
                for position, entry in enumerate(value)]
    entries = []
    for position, entry in enumerate(value):
        where = f"{name}[{position}]"
        if not isinstance(entry, dict):
            raise InvalidInput(where, f"must be an object, got {type_name(entry)} "
                                      f"{shorten(entry)}")
        entries.append(check_object(entry, tuple(spec.items), where + "."))
    return entries


def check_field(spec: FieldSpec, value: Any, name: str | None = None) -> Any:
    """Validate one value against its spec; `name` is the dotted name used in errors."""
    name = name or spec.name
    if value is None:
        if spec.nullable:
            return None
        raise InvalidInput(name, f"must be {kind_name(spec)}, got null")
    if spec.kind is bool:
        if not isinstance(value, bool):
            raise InvalidInput(name, f"must be true or false, got {type_name(value)} "
                                     f"{shorten(value)}")
    elif spec.kind is list:
        value = _check_list(spec, name, value)
        if value is None:
            return None
    elif spec.kind in (int, float):
        value = _check_number(spec, name, value)
    else:
        value = _check_text(spec, name, value)
    return value if spec.refine is None else spec.refine(value, name)


def kind_name(spec: FieldSpec) -> str:
    if spec.kind is list and isinstance(spec.items, FieldSpec):
        return "an array of strings"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            list: "an array of objects"}[spec.kind]


def type_name(value: Any) -> str:
    return {type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string",
            list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
