"""Field types for frozen pydantic dataclasses whose every refusal is one line: `<key> = <value>:
accepts <what>`, `unknown key ... (valid: ...)`, `missing key ...`, `<key>: expected ...`."""

import dataclasses
import functools
from typing import Annotated

import pydantic
from pydantic import AfterValidator, BeforeValidator, Strict
from pydantic_core import PydanticCustomError

from transfer_study.core.stage import ParamsError, shown


def require(ok, key, value, accepts):
    """Unless `ok`: the error that reads `<key> = <value>: accepts <accepts>`; `key` names the
    field of a check across fields, below the dataclass it checks. Tuples show as lists."""
    if not ok:
        value = list(value) if isinstance(value, tuple) else value
        context = {"shown": shown(value), "accepts": accepts, "key": key}
        raise PydanticCustomError("accepts", "accepts {accepts}", context)


def _accepted(accepts, ok, value):
    require(ok(value), "", value, accepts)
    return value


def _yaml_number(value):
    # PyYAML follows YAML 1.1, which reads `1e-4` (no dot) as the string '1e-4'.
    if isinstance(value, int | str) and not isinstance(value, bool):
        try:
            return float(value)
        except (ValueError, OverflowError):
            pass
    return value


Integer = Annotated[int, Strict()]  # not a bool, a float or a string
Number = Annotated[float, BeforeValidator(_yaml_number), Strict()]  # ints and '1e-4' too
Flag = Annotated[bool, Strict()]
Text = Annotated[str, Strict()]


def checked(kind, accepts, ok):
    """`kind`, where a value `ok` refuses stops with what the key accepts."""
    return Annotated[kind, AfterValidator(functools.partial(_accepted, accepts, ok))]


def one_of(valid):
    return checked(Text, "one of " + ", ".join(valid), lambda value: value in valid)


def at_least(low):
    return checked(Integer, f"an integer >= {low}", lambda value: value >= low)


def from_to(low, high):
    return checked(Integer, f"an integer from {low} to {high}", lambda n: low <= n <= high)


EXPECTED = {  # pydantic's type errors -> what the key expects
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "tuple_type": "a list",
    "dataclass_type": "a mapping",
}


def validated(cls, raw, where):
    """`raw` validated into `cls`; the first problem as one line, its key under `where`."""
    try:
        return pydantic.TypeAdapter(cls).validate_python(raw)
    except pydantic.ValidationError as error:
        raise ParamsError(_one_line(cls, where, error.errors())) from None


def _one_line(cls, where, problems):
    # An unknown key first: a misspelt key is also a missing one, and the misspelling is the news.
    problem = next((p for p in problems if p["type"] == "unexpected_keyword_argument"), problems[0])
    key, kind = where, problem["type"]
    for part in problem["loc"]:
        key += f"[{part}]" if isinstance(part, int) else f".{part}" if key else part
    if kind == "unexpected_keyword_argument":
        for part in problem["loc"][:-1]:  # down to the dataclass that lacks the key
            cls = {field.name: field.type for field in dataclasses.fields(cls)}[part]
        valid = ", ".join(field.name for field in dataclasses.fields(cls))
        return f"unknown key {shown(key)} (valid: {valid})"
    if kind == "missing":
        return f"missing key '{key}'"
    if kind == "accepts":
        context = problem["ctx"]
        key = ".".join(part for part in (key, context["key"]) if part)
        return f"{key} = {context['shown']}: accepts {context['accepts']}"
    if kind in EXPECTED:
        return f"{key}: expected {EXPECTED[kind]}, got {shown(problem['input'])}"
    return f"{key}: {problem['msg']}"


Widths = checked(
    Annotated[
        tuple[Integer, ...],
        BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else v),
        Strict(),  # a list, not a set or a mapping
    ],
    "a list of integers >= 1",
    lambda widths: all(width >= 1 for width in widths),
)
Fraction = checked(Number, "a number in [0, 1)", lambda value: 0 <= value < 1)
Factor = checked(Number, "a number in (0, 1]", lambda value: 0 < value <= 1)
NonNegative = checked(Number, "a number >= 0", lambda value: value >= 0)

params_section = functools.partial(
    pydantic.dataclasses.dataclass, frozen=True, config=pydantic.ConfigDict(extra="forbid")
)
