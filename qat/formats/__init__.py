"""Numerics of every format: one ``quantize``/``dequantize`` pair each, shared by training and export."""
from __future__ import annotations

import difflib

from .base import AffineFormat, Format, QTensor, QuantError, check_finite
from .ggml import GGML_FORMATS, GGMLFormat
from .intx import IntFormat, parse_int_format

__all__ = ["Format", "AffineFormat", "GGMLFormat", "IntFormat", "QTensor", "QuantError", "check_finite",
           "get_format", "register_format", "known_formats"]

_REGISTRY: dict[str, Format] = dict(GGML_FORMATS)


def register_format(fmt: Format) -> Format:
    _REGISTRY[fmt.name] = fmt
    return fmt


def known_formats() -> list[str]:
    return sorted(_REGISTRY) + ["int<2-8>[_asym]_<tensor|channel|token|g<N>>"]


def get_format(name: str) -> Format:
    """Look a format up by name: GGUF names (``q4_0``, ``q4_k`` ...) or ``int4_g128``-style names."""
    key = name.lower()
    if key in _REGISTRY:
        return _REGISTRY[key]
    fmt = parse_int_format(key)
    if fmt is not None:
        return fmt
    close = difflib.get_close_matches(key, list(_REGISTRY), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise QuantError(f"unknown format {name!r}.{hint} Known: {', '.join(known_formats())}")


def _register_optional() -> None:
    # k-quants and NF4 live in their own modules; they register themselves on import.
    for mod in ("kquants", "nf4"):
        try:
            __import__(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:  # module not written yet
            if e.name != f"{__name__}.{mod}":
                raise


_register_optional()
