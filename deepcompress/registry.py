"""Classes found by name: one registry each for criteria, allocations and schedules."""
from __future__ import annotations

import inspect
from typing import Generic, TypeVar

from deepcompress.errors import CompressError

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Name -> class; an unknown name is a CompressError listing the known names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[str, T] = {}

    def register(self, cls: T) -> T:
        """Add cls under cls.name (usable as a class decorator); a taken name is an error."""
        if cls.name in self._classes and self._classes[cls.name] is not cls:
            raise CompressError(f"{self.kind} {cls.name!r}: already registered")
        self._classes[cls.name] = cls
        return cls

    def unregister(self, name: str) -> None:
        """Remove name (no-op if absent)."""
        self._classes.pop(name, None)

    def get(self, name: str) -> T:
        """The class registered under name."""
        try:
            return self._classes[name]
        except (KeyError, TypeError):
            raise CompressError(f"{self.kind} {name!r}: unknown; use one of {', '.join(self.names())}") from None

    def make(self, name: str, **settings: object) -> object:
        """An instance of the class registered as name, given those settings its constructor takes."""
        cls = self.get(name)
        known = set(inspect.signature(cls).parameters)
        return cls(**{k: v for k, v in settings.items() if k in known})

    def names(self) -> tuple[str, ...]:
        """Registered names, in registration order."""
        return tuple(self._classes)
