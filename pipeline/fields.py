"""The field machinery of the request schema: one `FieldSpec` per field, the read-only
namespaces that hold them, and the check of one value against its spec.

`pipeline.schema` declares the actual fields with these; nothing here knows a field's name.
Plain Python (no torch), like the schema.
"""

from __future__ import annotations

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

    kind: type  # str, int, float or bool
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
    # A last rule after the type and limits: (value, dotted name) -> the value kept.
    refine: Callable[[Any, str], Any] | None = None
    name: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def cog_key(self) -> str:
        """The Cog input's name."""
        return self.cog_name or self.name

    def cog(self) -> dict[str, Any]:
        """Keyword arguments for `cog.Input(...)`: `Input(**Inputs.width.cog())`."""
        kwargs: dict[str, Any] = {"description": self.description}
        if not self.required:
            kwargs["default"] = self.default
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
    elif spec.kind in (int, float):
        value = _check_number(spec, name, value)
    else:
        value = _check_text(spec, name, value)
    return value if spec.refine is None else spec.refine(value, name)


def kind_name(spec: FieldSpec) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}[spec.kind]


def type_name(value: Any) -> str:
    return {type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string",
            list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
