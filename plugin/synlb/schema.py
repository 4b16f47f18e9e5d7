"""Typed option schemas: each section type (and each plugin) declares its
options next to its code; parsing reports ``FILE:SECTION:KEY: why``.

A cross-key check (a rule about several keys of one section) is written one
way: a function ``check(parsed: dict) -> [(key, why)]`` given to the
:class:`Schema`; :func:`parse_section` runs it on the values that parsed (a
key whose value did not parse is absent: the check skips what it needs and
that problem is already reported)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

Check = Callable[[dict], list[tuple[str, str]]]


class OptionError(ValueError):
    """A value that does not fit its option; the message says why."""


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Option:
    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str = ""


class Schema:
    def __init__(self, kind: str, options: Iterable[Option], checks: Iterable[Check] = ()):
        self.kind = kind
        self.options = {o.name: o for o in options}
        self.checks = tuple(checks)

    def __iter__(self):
        return iter(self.options.values())

    def extended(self, *more: "Schema | Iterable[Option]") -> "Schema":
        """A copy with more options and their checks (plugins add keys to
        core sections: a Schema of their own, or a list of Options)."""
        options, checks = list(self.options.values()), list(self.checks)
        for m in more:
            options += list(m)
            checks += list(getattr(m, "checks", ()))
        return Schema(self.kind, options, checks)


def parse_section(sch: Schema, section: str, values: dict[str, tuple[str, str]],
                  default_file: str, problems: list) -> dict[str, Any]:
    """Parse ``values`` ({key: (raw, file)}) against ``sch``.

    Appends (file, section, key, why) to ``problems``, those of the
    schema's cross-key checks included; returns the values that parsed (a
    key whose value is bad is absent), so that callers can still
    cross-check the rest and report every problem at once.
    """
    out: dict[str, Any] = {}
    section_file = next(iter(values.values()))[1] if values else default_file
    for key, (raw, path) in values.items():
        if key not in sch.options:
            known = ", ".join(sorted(sch.options))
            problems.append((path, section, key, f"unknown key (known: {known})"))
    for opt in sch:
        if opt.name in values:
            raw, path = values[opt.name]
            try:
                out[opt.name] = opt.parse(raw)
            except OptionError as e:
                problems.append((path, section, opt.name, str(e)))
        elif opt.default is REQUIRED:
            problems.append((section_file, section, opt.name, "required key is missing"))
        else:
            out[opt.name] = opt.default
    for check in sch.checks:
        for key, why in check(out):
            problems.append((values.get(key, (None, section_file))[1], section, key, why))
    return out


# ------------------------------------------------------------ value parsers
# Shared by every section's schema; each raises OptionError saying why.

def boolean(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "yes", "true", "on"):
        return True
    if t in ("0", "no", "false", "off"):
        return False
    raise OptionError(f"{text!r} is not a boolean (yes/no)")


def integer(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text.strip(), 0)
        except ValueError:
            raise OptionError(f"{text!r} is not an integer") from None
        if not lo <= v <= hi:
            raise OptionError(f"{v} is out of range {lo}..{hi}")
        return v
    return parse


def words(text: str) -> list[str]:
    """A list separated by commas and/or spaces."""
    return [p for p in re.split(r"[,\s]+", text.strip()) if p]


def choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        t = text.strip().lower()
        if t not in choices:
            raise OptionError(f"{text!r} is not one of {', '.join(choices)}")
        return t
    return parse


def seconds(lo: float, hi: float):
    """A duration in seconds within lo..hi: ``2``, ``0.5``, ``2s``, ``500ms``."""
    def parse(text: str) -> float:
        t = text.strip().lower()
        t = t[:-1] if t.endswith("s") and not t.endswith("ms") else t
        try:
            v = float(t[:-2]) / 1000 if t.endswith("ms") else float(t)
        except ValueError:
            raise OptionError(f"{text!r} is not a duration in seconds (e.g. 2, 0.5, 500ms)") from None
        if not lo <= v <= hi:
            raise OptionError(f"{text.strip()} is out of range {lo:g}..{hi:g} s")
        return v
    return parse


def nonempty(text: str) -> str:
    t = text.strip()
    if not t:
        raise OptionError("must not be empty")
    return t
