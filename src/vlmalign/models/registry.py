"""A tiny name -> object registry shared by vision towers, projectors, LLMs and recipes.

Lookups are exact: no substring or prefix dispatch. An unknown id raises `UnknownIdError`
naming the kind of thing looked up, the bad id and every known id.

    VISION_TOWERS = Registry("vision tower")

    @VISION_TOWERS.register("tiny")
    def build_tiny(cfg): ...

    VISION_TOWERS.get("tiny")(cfg)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownIdError(KeyError):
    """An id that is not registered; the message lists the known ids."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Maps exact string ids to objects (usually builder functions or classes)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers its target under `name` and returns it unchanged.

        Registering the same name twice raises `ValueError` (a silent overwrite would make
        the result depend on import order).
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} ids must be non-empty strings, got {name!r}")

        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(
                    f"{self.kind} id {name!r} is already registered (to {self._entries[name]!r})"
                )
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        """The object registered under `name`; `UnknownIdError` listing known ids if none."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            known = ", ".join(repr(n) for n in self.names()) or "(none registered)"
            raise UnknownIdError(
                f"unknown {self.kind} {name!r}; known {self.kind} ids: {known}"
            ) from None

    def names(self) -> list[str]:
        """The registered ids, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, ids={self.names()})"
