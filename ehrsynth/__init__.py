"""ehrsynth: synthetic longitudinal EHR generation (HALO, EHRDiff) with fidelity, utility and privacy evaluation."""

from ehrsynth.data.build import BuildOptions, build_corpus
from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.data.vocab import Vocabulary
from ehrsynth.errors import EhrsynthError, InputError

__version__ = "0.1.0"
__all__ = ["BuildOptions", "EhrsynthError", "InputError", "PatientCorpus", "Vocabulary", "build_corpus"]
