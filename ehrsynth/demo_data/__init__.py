"""Bundled demo data: two OMOP tables of the Eunomia GiBleed set (Apache-2.0, see LICENSE.txt, NOTICE.md)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def demo_directory() -> Path:
    """The directory holding the bundled OMOP demo tables (person, condition_occurrence)."""
    return Path(str(resources.files(__package__)))
