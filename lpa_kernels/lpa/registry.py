"""``Registry``: named choices (training methods, direction policies, radius policies) with their help text.

The library registers each choice once, where it is defined; ``LPAConfig`` validates against the
registries and ``lpa-train`` / ``lpa-bench`` build their option choices and help text from them, so a new
policy or method is one function plus one registration::

    @DIRECTIONS.register("descent", "-1 for every class")
    def descent(inputs): ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator


@dataclass(frozen=True)
class Entry:
    """One registered choice: ``value`` (a function or builder), one-line ``help`` and free-form ``meta``
    (what the registry's users need to know about it, e.g. which inputs a policy reads)."""

    name: str
    value: Callable
    help: str
    meta: dict = field(default_factory=dict)


class Registry:
    """An ordered ``name -> Entry`` map for one ``kind`` of choice ("method", "direction", "radius")."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def add(self, name: str, value: Callable, help: str, **meta) -> Callable:
        if not name or name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered already (or empty)")
        self._entries[name] = Entry(name, value, help, meta)
        return value

    def register(self, name: str, help: str, **meta) -> Callable[[Callable], Callable]:
        """Decorator form of ``add``."""
        return lambda value: self.add(name, value, help, **meta)

    def remove(self, name: str) -> None:
        """Unregister ``name`` (e.g. a policy a test or plugin added for a while)."""
        self._entries.pop(self[name].name)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        """The names, in registration order (so a registry serves as argparse ``choices``)."""
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> tuple[Entry, ...]:
        return tuple(self._entries.values())

    def __getitem__(self, name: str) -> Entry:
        """The entry ``name``; a ValueError naming the kind and every choice otherwise."""
        if name not in self:
            raise ValueError(f"{self.kind} must be one of {', '.join(map(repr, self._entries))}; got {name!r}")
        return self._entries[name]

    def help_text(self) -> str:
        """``name: help; name: help; ...``, for a command-line option's help."""
        return "; ".join(f"{e.name}: {e.help}" for e in self.entries())


# The training methods; ``lpa_kernels.lpa.methods`` registers them (here, below every other module of the
# package, so that ``LPAConfig`` can read a method's settings without importing the methods).
METHODS = Registry("method")
