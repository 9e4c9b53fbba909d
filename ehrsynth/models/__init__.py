"""Model families. Each family is a sub-package whose model class subclasses
:class:`~ehrsynth.models.base.GenerativeModel`; this registry maps family names to those classes."""

from __future__ import annotations

import importlib

from ehrsynth.errors import ConfigError

FAMILIES = {
    "halo": ("ehrsynth.models.halo", "HaloModel"),
    "ehrdiff": ("ehrsynth.models.ehrdiff", "EHRDiffModel"),
    "timeline": ("ehrsynth.models.timeline", "TimelineModel"),
}


def model_class(family: str) -> type:
    """The model class of ``family`` (``'halo'``, ``'ehrdiff'`` or ``'timeline'``).

    Raises:
        ConfigError: for an unknown family.
    """
    if family not in FAMILIES:
        raise ConfigError(f"unknown model {family!r}; choose one of: {', '.join(FAMILIES)}")
    module, name = FAMILIES[family]
    return getattr(importlib.import_module(module), name)
