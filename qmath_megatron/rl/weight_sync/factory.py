"""The registry of weight transports, keyed by the weight-transfer backend's name
(``rl.weight_transfer`` once resolved, the engines' ``weight_transfer``): each transport
registers itself (:func:`register_transport`), the trainer builds one by name
(:func:`build_transport`) and never branches on it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from qmath_megatron.rl.weight_sync.base import WeightTransport

T = TypeVar("T", bound=type[WeightTransport])

TRANSPORTS: dict[str, type[WeightTransport]] = {}


def register_transport(name: str) -> Callable[[T], T]:
    """Class decorator: register a :class:`WeightTransport` under the backend ``name``."""

    def register(cls: T) -> T:
        if name in TRANSPORTS:
            raise ValueError(f"weight transport {name!r} is registered twice")
        cls.name = name
        TRANSPORTS[name] = cls
        return cls

    return register


def build_transport(name: str, *args: Any, **kwargs: Any) -> WeightTransport:
    """The transport registered as ``name``, built with the
    :class:`~qmath_megatron.rl.weight_sync.base.WeightTransport` arguments."""
    cls = TRANSPORTS.get(name)
    if cls is None:
        raise ValueError(
            f"unknown weight-transfer backend {name!r} (known: {', '.join(sorted(TRANSPORTS))})"
        )
    return cls(*args, **kwargs)
