"""HALO (Theodorou, Cao, Xiao & Sun, Nature Communications 2023): hierarchical autoregressive generation of
longitudinal records -- a coarse visit-level transformer and a fine code-level head (MADE, by default with
direct connections), with the record structure (one sex, one age bucket, a gap per later visit, no empty visit)
built into the factorisation.

Three pieces: the network (:mod:`.network`), the sampler (:mod:`.sampling`) and the likelihood
(:mod:`.likelihood`); :mod:`.encoding` turns records into rows and back, and :mod:`.model` ties them to the
corpus and the shared training loop.
"""

from ehrsynth.models.halo.config import HaloConfig
from ehrsynth.models.halo.encoding import ColumnLayout, bin_index, bin_values, decode_records, encode_records
from ehrsynth.models.halo.likelihood import LikelihoodResult, log_likelihood, row_log_likelihood
from ehrsynth.models.halo.model import HaloModel
from ehrsynth.models.halo.network import CoarseTransformer, FineHead, HaloNetwork, KVCache, fine_weights
from ehrsynth.models.halo.sampling import (
    Decoding, GenerationConfig, PassCounts, parse_conditions, sample, sample_batch, sample_stream,
)

__all__ = [
    "CoarseTransformer", "ColumnLayout", "Decoding", "FineHead", "GenerationConfig", "HaloConfig", "HaloModel",
    "HaloNetwork", "KVCache", "LikelihoodResult", "PassCounts", "bin_index", "bin_values", "decode_records",
    "encode_records", "fine_weights", "log_likelihood", "parse_conditions", "row_log_likelihood", "sample",
    "sample_batch", "sample_stream",
]
