"""A documented config key: `field`, and the check of one value against its type, choices and bounds."""

from __future__ import annotations

import dataclasses

from lesionkeras.errors import ConfigError


def field(default, help, choices=None, minimum=None, maximum=None, flag=None, check=None):
    """A documented config key.

    Args:
        default: its value when absent; its type is the key's type.
        help: str. One sentence for the docs and the CLI.
        choices: tuple or None. The closed set of values.
        minimum, maximum: number or None. Inclusive bounds.
        flag: None, True or str. Also a `lesionkeras fit` option: True derives
            `--key-name` (`--x/--no-x` for booleans); a str gives the declaration.
        check: callable(value, where, origin) -> value, or None. Own validation
            (e.g. an array of tables).
    """
    return dataclasses.field(
        default=default,
        metadata={"help": help, "choices": choices, "minimum": minimum, "maximum": maximum,
                  "flag": flag, "check": check},
    )


def _check_value(cls, f: dataclasses.Field, value, where: str):
    expected = type(f.default) if f.default is not dataclasses.MISSING else None
    name = f"`{where}`"
    if expected is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false. Received: {value!r}")
    elif expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer. Received: {value!r}")
    elif expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number. Received: {value!r}")
        value = float(value)
    elif expected is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string. Received: {value!r}")
    elif expected is tuple:
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            raise ConfigError(f"{name} must be a list of numbers. Received: {value!r}")
        value = tuple(float(v) for v in value)
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(
            f"{name} must be one of {', '.join(map(str, choices))}. Received: {value!r}"
        )
    minimum = f.metadata.get("minimum")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}. Received: {value!r}")
    maximum = f.metadata.get("maximum")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be <= {maximum}. Received: {value!r}")
    return value
