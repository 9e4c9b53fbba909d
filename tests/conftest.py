"""Shared fixtures: the real extracts in ../shared/data (override with EHRSYNTH_DATA)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_CANDIDATES = [Path(__file__).resolve().parents[1].parent / "shared" / "data", Path("/work/shared/data")]
DATA = Path(os.environ["EHRSYNTH_DATA"]) if "EHRSYNTH_DATA" in os.environ else next(
    (p for p in _CANDIDATES if p.is_dir()), _CANDIDATES[0])


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        raise FileNotFoundError(f"test data not found at {DATA}; set EHRSYNTH_DATA")
    return DATA


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of small-matrix tests: as fast as two, and it does not stall when another
    process holds the other core. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def mimic3_corpus(data_dir):
    from ehrsynth.data.readers.mimic3 import read_mimic3

    return read_mimic3(data_dir / "mimic-iii-demo")


ALL_TRAIN = (1.0, 0.0, 0.0)


def all_train(reader):
    """``reader`` with every patient in the training part unless a test asks for a split.

    Reader tests check counts against facts of the source files; split-first building (tested in
    test_split_first.py) drops codes only held-out patients have, which would hide those facts.
    """
    import dataclasses

    from ehrsynth.data.build import BuildOptions

    def read(path, *args, options=None, **kwargs):
        options = options or BuildOptions()
        if options.split == BuildOptions().split:
            options = dataclasses.replace(options, split=ALL_TRAIN)
        return reader(path, *args, options=options, **kwargs)

    return read
