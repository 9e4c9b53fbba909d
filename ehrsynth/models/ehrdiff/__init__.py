"""EHRDiff (Yuan, Zhou & Yu, TMLR 2024): EDM diffusion over patients' multi-hot code vectors.

Four pieces, as EDM: the raw network and the preconditioner and loss (:mod:`.network`), the sampler and
binarisation (:mod:`.sampling`), and the model tying them to the corpus (:mod:`.model`), with its settings
(:mod:`.config`) and the statistics of its columns (:mod:`.columns`).
"""

from ehrsynth.models.ehrdiff.columns import data_density, static_column_names
from ehrsynth.models.ehrdiff.config import EHRDiffConfig
from ehrsynth.models.ehrdiff.model import EHRDiffModel
from ehrsynth.models.ehrdiff.network import (
    EDMLoss,
    EDMPrecond,
    MLPDenoiser,
    ResidualDenoiser,
    edm_coefficients,
    edm_loss_weight,
)
from ehrsynth.models.ehrdiff.sampling import (
    EHRDiffSampling,
    binarize,
    calibrated_thresholds,
    edm_sigma_schedule,
    guided_denoiser,
    heun_sampler,
    per_sample_noise,
)

__all__ = [
    "EDMLoss", "EDMPrecond", "EHRDiffConfig", "EHRDiffModel", "EHRDiffSampling", "MLPDenoiser", "ResidualDenoiser",
    "binarize", "calibrated_thresholds", "data_density", "edm_coefficients", "edm_loss_weight", "edm_sigma_schedule", "guided_denoiser",
    "heun_sampler", "per_sample_noise", "static_column_names",
]
