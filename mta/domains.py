"""Domain patterns: which of many entries applies to a domain name.

A pattern is a domain (``example.com``), a wildcard for every name below
a parent (``*.example.com``: ``a.example.com`` and ``b.a.example.com``, not
``example.com`` itself) or ``*`` for any name.  The most specific entry
wins: the exact name, then the wildcard of the nearest parent, then ``*``.
Names and patterns compare in one form (``normalise``): IDNA with UTS #46
mapping, so that full-width letters, mixed case, a trailing dot (also an
ideographic one) and the Unicode or ``xn--`` spelling of a name are all the
same name.  Routes, shaping rules and DKIM signing domains all choose by it.

A leaf: it imports nothing of the project.

Failure: none; a name no pattern covers gives ``None``.  Patterns are
validated by the config, not here: anything that is neither ``*`` nor
``*.parent`` is taken as an exact name.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, TypeVar

import idna

Value = TypeVar("Value")


def normalise(name: str) -> str:
    """The form names are compared in: ``Example.COM.`` -> ``example.com``,
    ``Bücher.example`` in full-width letters -> ``xn--bcher-kva.example``;
    ``*.`` patterns keep their star."""
    if name.isascii():
        return name.lower().rstrip(".")  # the common case, and address literals
    if name.startswith("*."):
        return "*." + normalise(name[2:])
    mapped = idna.uts46_remap(name, std3_rules=False, transitional=False).rstrip(".")
    try:
        return idna.encode(mapped).decode("ascii")
    except idna.IDNAError:
        return mapped  # not a valid IDN: compared as mapped, and no DNS name will match it


class DomainMap(Generic[Value]):
    """Values looked up by domain name through domain patterns."""

    def __init__(self, entries: Iterable[tuple[str, Value]] = ()) -> None:
        self._exact: dict[str, Value] = {}
        self._below: dict[str, Value] = {}  # "*.example.com" is kept as "example.com"
        self._any: list[Value] = []  # the "*" entry, when there is one
        for pattern, value in entries:
            self.add(pattern, value)

    def add(self, pattern: str, value: Value) -> None:
        """Map ``pattern`` to ``value``; the first entry for a pattern stays."""
        pattern = normalise(pattern)
        if pattern == "*":
            if not self._any:
                self._any.append(value)
        elif pattern.startswith("*."):
            self._below.setdefault(pattern[2:], value)
        else:
            self._exact.setdefault(pattern, value)

    def lookup(self, name: str) -> Value | None:
        """The value of the most specific pattern covering ``name``, else ``None``."""
        name = normalise(name)
        if name in self._exact:
            return self._exact[name]
        labels = name.split(".")
        for start in range(1, len(labels)):
            parent = ".".join(labels[start:])
            if parent in self._below:
                return self._below[parent]
        return self._any[0] if self._any else None
