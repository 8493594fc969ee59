"""
Declaring a plugin's configuration keys: C{Key(parse, default, doc)} and the parsers pymaild's
own configuration uses.  A parser takes the TOML value and returns the setting, or raises
C{ValueError} with a message that ends up after C{[plugins.NAME] key:} in the error.
"""

from __future__ import annotations

from typing import Any, Callable

from pymaild import config as _config
from pymaild.config import Key

__all__ = ["Key", "string", "integer", "seconds", "duration", "boolean", "choice", "listOf", "network",
           "domain", "size", "table"]

string = _config._string
integer = _config._integer  # integer(low, high)
seconds = _config._seconds
duration = _config._duration  # 30, "30s", "5m", "2h", "1d"
boolean = _config._boolean
choice = _config._choice  # choice("a", "b")
network = _config._network  # "192.0.2.0/24" -> an ipaddress network
domain = _config._domain
size = _config._size  # 1024, "10M"


def listOf(item: Callable[[Any], Any], what: str = "values") -> Callable[[Any], tuple]:
    """A TOML array whose every element C{item} parses (a tuple)."""
    return _config._list_of(item, what)


def table(fields: dict[str, Key]) -> Callable[[Any], dict]:
    """
    A TOML inline table (or an array element that is a table) with these keys, each parsed and
    defaulted like a plugin's own keys.
    """

    def parse(value: Any) -> dict:
        if not isinstance(value, dict):
            raise ValueError(f"expected a table like {{{', '.join(f'{k} = ...' for k in fields)}}}")
        unknown = set(value) - set(fields)
        if unknown:
            raise ValueError(f"unknown key {sorted(unknown)[0]!r} (known: {', '.join(fields)})")
        out = {}
        for name, spec in fields.items():
            if name in value:
                try:
                    out[name] = spec.parse(value[name])
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
            else:
                out[name] = spec.default
        return out

    return parse
