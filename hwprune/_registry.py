"""Plug-ins registered once, where their class is defined.

A kind of plug-in (saliency methods, tasks, recovery methods) keeps one `Registry`; its base class
adds every concrete subclass that names itself (`name = "..."`) when the class is defined, so a new
plug-in is one file (plus its YAML), and everything that needs the list (config schemas, metric
directions, error messages) reads the registry. A test plug-in passes `register=False`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Classes of one kind of plug-in, by their `name` (listed in name order).

    Args:
        kind: What the plug-ins are, for error messages ("saliency method").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[str, type[T]] = {}

    def add(self, cls: type[T]) -> None:
        """Register `cls` under its `name`, unless it is abstract or names no plug-in.

        Raises:
            ValueError: Another class already has the name (redefining the same class, as a
                reloaded module does, is allowed).
        """
        name = cls.__dict__.get("name")
        if not isinstance(name, str) or inspect.isabstract(cls):
            return
        taken = self._classes.get(name)
        if taken is not None and taken.__qualname__ != cls.__qualname__:
            raise ValueError(f"{self.kind} name {name!r} is taken by {taken.__qualname__}")
        self._classes[name] = cls

    def discard(self, name: str) -> None:
        """Forget the plug-in `name` (one defined for a while, as a test's is)."""
        self._classes.pop(name, None)

    def __getitem__(self, name: str) -> type[T]:
        """The class named `name`.

        Raises:
            ValueError: An unknown name, listing the valid ones.
        """
        if name not in self._classes:
            raise ValueError(f"unknown {self.kind} {name!r}; valid choices: {self.names()}")
        return self._classes[name]

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __iter__(self) -> Iterator[type[T]]:
        return iter(self._classes[name] for name in self.names())

    def __len__(self) -> int:
        return len(self._classes)

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._classes)

    def items(self) -> list[tuple[str, type[T]]]:
        return [(name, self._classes[name]) for name in self.names()]
