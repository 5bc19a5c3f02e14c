"""Configuration primitives: durations, sizes, addresses, and TOML sections that
name the file and the key in every error."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, overload

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

D = TypeVar("D", bound="DataclassInstance")


class ConfigError(Exception):
    """A configuration problem, worded for the person who wrote the file."""


_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*([0-9]+)\s*([kmg]?)b?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_duration(value: object, where: str) -> float:
    """Seconds from 1.5, "500ms", "2s", "1m" (a bare number is seconds, as in nginx)."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a duration like '500ms' or '2s', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ConfigError(f"{where}: expected a duration like '500ms' or '2s', got {value!r}")
    if seconds < 0:
        raise ConfigError(f"{where}: a duration cannot be negative")
    return seconds


def parse_size(value: object, where: str) -> int:
    """Bytes from 1024, "16k", "1m" (as nginx writes sizes)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and (m := _SIZE.match(value)):
        return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    raise ConfigError(f"{where}: expected a size like 16384, '16k' or '1m', got {value!r}")


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(value: object, where: str) -> Address:
    """HOST:PORT, [IPv6]:PORT, or :PORT for all interfaces."""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected 'HOST:PORT', got {value!r}")
    host, sep, port_text = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"{where}: expected 'HOST:PORT' with a port 1-65535, got {value!r}")
    return Address(host or "0.0.0.0", int(port_text))


class Section:
    """A table of a TOML file, read key by key; errors say `file: [table] key: problem`.

    ``done()`` refuses keys nobody read, so a typo is an error, not a silent default.
    """

    def __init__(
        self,
        data: Mapping[str, Any],
        path: str,
        source: str,
        text: str = "",
        line: int = 0,
        key_path: str = "",
    ) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: [{path}] must be a table")
        self._data = data
        self._path = path
        self._source = source
        self._read: set[str] = set()
        self._text = text  # the file, to find where an array's tables begin
        self.line = line  # the line of this table's header, when known
        self._key_path = key_path  # "pool.server" for [[pool.server]] (no indices)

    def where(self, key: str) -> str:
        table = f"[{self._path}] " if self._path else ""
        at = f"{self._source}:{self.line}" if self.line else self._source
        return f"{at}: {table}{key}"

    def _get(self, key: str) -> Any:
        self._read.add(key)
        return self._data.get(key)

    def has(self, key: str) -> bool:
        return key in self._data

    def raw(self, key: str, default: Any = None) -> Any:
        value = self._get(key)
        return default if value is None else value

    def string(self, key: str, default: str, choices: Iterable[str] | None = None) -> str:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise ConfigError(f"{self.where(key)}: expected a string, got {value!r}")
        if choices is not None and value not in (options := tuple(choices)):
            raise ConfigError(
                f"{self.where(key)}: expected one of {', '.join(options)}, got {value!r}"
            )
        return value

    def integer(self, key: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{self.where(key)}: expected a whole number, got {value!r}")
        if value < minimum or (maximum is not None and value > maximum):
            upper = "" if maximum is None else f" and at most {maximum}"
            raise ConfigError(f"{self.where(key)}: must be at least {minimum}{upper}, got {value}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(f"{self.where(key)}: expected true or false, got {value!r}")
        return value

    def number(self, key: str, default: float, minimum: float = 0.0) -> float:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
            raise ConfigError(f"{self.where(key)}: expected a number >= {minimum:g}, got {value!r}")
        return float(value)

    def duration(self, key: str, default: float) -> float:
        value = self._get(key)
        return default if value is None else parse_duration(value, self.where(key))

    def size(self, key: str, default: int) -> int:
        value = self._get(key)
        return default if value is None else parse_size(value, self.where(key))

    @overload
    def address(self, key: str, default: Address) -> Address: ...
    @overload
    def address(self, key: str, default: None) -> Address | None: ...
    def address(self, key: str, default: Address | None) -> Address | None:
        value = self._get(key)
        return default if value is None else parse_address(value, self.where(key))

    def durations(self, defaults: D) -> D:
        """A table whose every key is a duration: one per field of the frozen
        dataclass ``defaults``, each defaulting to its value there."""
        return dataclasses.replace(
            defaults,
            **{
                f.name: self.duration(f.name, getattr(defaults, f.name))
                for f in dataclasses.fields(defaults)
            },
        )

    def server_address(self) -> Address:
        """A [[server]] table's address, which it cannot go without."""
        address = self.address("address", None)
        if address is None:
            raise ConfigError(f"{self.where('address')}: every [[server]] needs an address")
        return address

    def distinct_names(self, key: str, names: list[str]) -> None:
        """The [[key]] tables read from here must be told apart by name."""
        if len(set(names)) != len(names):
            raise ConfigError(f"{self.where(key)}: {key} names must differ: {', '.join(names)}")

    def section(self, key: str) -> Section:
        value = self._get(key)
        path = f"{self._path}.{key}" if self._path else key
        key_path = f"{self._key_path}.{key}" if self._key_path else key
        # its own [key_path] header's line, when it has one (not an inline table)
        lines = self._header_lines(key_path, array=False)
        return Section(
            {} if value is None else value,
            path,
            self._source,
            self._text,
            lines[0] if lines else self.line,
            key_path,
        )

    def sections(self, key: str) -> list[Section]:
        """An array of tables, [[key]], each knowing the line of its header."""
        value = self._get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise ConfigError(f"{self.where(key)}: expected [[{key}]] tables")
        key_path = f"{self._key_path}.{key}" if self._key_path else key
        lines = self._header_lines(key_path)
        return [
            Section(
                item,
                f"{self._path}.{key}[{i}]" if self._path else f"{key}[{i}]",
                self._source,
                self._text,
                lines[i] if i < len(lines) else 0,
                key_path,
            )
            for i, item in enumerate(value)
        ]

    def _header_lines(self, key_path: str, array: bool = True) -> list[int]:
        """The lines of this table's [[key_path]] headers (``array``) or its
        [key_path] header: those after its own header and before the next header
        of its own kind."""
        if not self._text:
            return []
        pattern = (
            rf"\[\[\s*{re.escape(key_path)}\s*\]\]"
            if array
            else rf"\[\s*{re.escape(key_path)}\s*\]"
        )
        header = re.compile(rf"^\s*{pattern}")
        own = re.compile(rf"^\s*\[\[\s*{re.escape(self._key_path)}\s*\]\]")
        found = []
        for number, text in enumerate(self._text.splitlines(), start=1):
            if number <= self.line:
                continue
            if self.line and self._key_path and own.match(text):
                break  # the next table of this one's kind: its arrays are its own
            if header.match(text):
                found.append(number)
        return found

    def done(self) -> None:
        unknown = sorted(set(self._data) - self._read)
        if unknown:
            raise ConfigError(f"{self.where(unknown[0])}: unknown key")


def load_toml(path: Path) -> Section:
    try:
        text = path.read_text()
        data = tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return Section(data, "", str(path), text)
