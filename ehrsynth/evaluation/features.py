"""Shared pieces of every metric: vocabulary alignment, sparse code matrices, Hamming nearest neighbours,
seeded subsampling and the result base class.

Real and synthetic corpora may carry different vocabularies (a synthetic corpus read back from CSV orders its
codes by its own counts), so every metric first maps both onto the sorted union of their typed code strings.
Everything stays sparse: code-code statistics are sparse products ``X.T @ X`` and only the non-zero pairs of
either corpus are ever compared. Nothing here prints or logs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, NamedTuple

import numpy as np
import scipy.sparse as sp

from ehrsynth.data.corpus import PatientCorpus
from ehrsynth.errors import ConfigError

# Hamming products hold at most this many float32 cells at once (64 MiB), whatever the corpus size.
CHUNK_CELLS = 1 << 24
# The this-many heaviest code columns of a Hamming product go through dense BLAS, the rest through a sparse
# product: frequent codes make a sparse product slow, rare codes make a dense one wasteful.
DENSE_COLUMNS = 256


# ---- results -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MetricResult:
    """Base of every metric result: a frozen dataclass with a definition key (see docs/metrics.md).

    ``as_dict()`` gives JSON-ready values: the ``metric`` key first, numpy scalars as Python numbers, tuples as
    lists, nested results as dicts and undefined values (NaN) as ``None``.
    """

    metric: ClassVar[str] = ""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"metric": self.metric}
        for f in fields(self):
            out[f.name] = jsonable(getattr(self, f.name))
        return out


def jsonable(value: Any) -> Any:
    """``value`` with numpy types as Python ones, tuples as lists, dataclasses as dicts and NaN/inf as None."""
    if isinstance(value, MetricResult):
        return value.as_dict()
    if hasattr(value, "__dataclass_fields__"):
        return {k: jsonable(v) for k, v in asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [jsonable(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---- alignment -----------------------------------------------------------------------------------------------
def align_vocabularies(*corpora: PatientCorpus) -> tuple[tuple[str, ...], tuple[np.ndarray, ...]]:
    """The sorted union of the corpora's typed codes, and for each corpus the map old id -> union id.

    Sorting makes the union independent of the order of the arguments and of each corpus's own id order.

    Returns:
        ``(codes, remaps)``: ``codes[remaps[i][j]] == corpora[i].vocab.codes[j]``.

    Example:
        >>> codes, (ra, rb) = align_vocabularies(real, synthetic)  # doctest: +SKIP
    """
    if not corpora:
        raise ConfigError("align_vocabularies needs at least one corpus, got none")
    pooled = np.concatenate([np.asarray(c.vocab.codes, dtype=object) for c in corpora]).astype(str)
    union, inverse = np.unique(pooled, return_inverse=True)
    bounds = np.cumsum([0] + [c.vocab_size for c in corpora])
    remaps = tuple(inverse[bounds[i]:bounds[i + 1]].astype(np.int64) for i in range(len(corpora)))
    return tuple(union.tolist()), remaps


@dataclass(frozen=True, eq=False)
class AlignedCodes:
    """Binary code matrices of several corpora over one shared code list.

    Attributes:
        codes: the shared, sorted typed codes; column j of every matrix is ``codes[j]``.
        patients: per corpus, a (patients, codes) int32 CSR 0/1 matrix: every code the patient ever had.
        visits: per corpus, a (visits, codes) int32 CSR 0/1 matrix: the codes of each visit.
    """

    codes: tuple[str, ...]
    patients: tuple[sp.csr_matrix, ...]
    visits: tuple[sp.csr_matrix, ...]


def aligned_code_matrices(*corpora: PatientCorpus) -> AlignedCodes:
    """Patient x code and visit x code 0/1 CSR matrices of each corpus over the union of their codes.

    Example:
        >>> aligned = aligned_code_matrices(real, synthetic)  # doctest: +SKIP
        >>> real_prevalence = aligned.patients[0].mean(axis=0)  # doctest: +SKIP
    """
    codes, remaps = align_vocabularies(*corpora)
    n_codes = len(codes)
    patients, visits = [], []
    for corpus, remap in zip(corpora, remaps):
        columns = remap[np.asarray(corpus.codes, dtype=np.int64)]
        visit_rows = corpus.code_visit()
        visits.append(_binary_csr(visit_rows, columns, (corpus.n_visits, n_codes)))
        patient_rows = corpus.visit_patient()[visit_rows]
        patients.append(_binary_csr(patient_rows, columns, (corpus.n_patients, n_codes)))
    return AlignedCodes(codes=codes, patients=tuple(patients), visits=tuple(visits))


def _binary_csr(rows: np.ndarray, columns: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    matrix = sp.csr_matrix((np.ones(len(rows), dtype=np.int32), (rows, columns)), shape=shape)
    matrix.sum_duplicates()  # a code in several visits of one patient counts once
    matrix.data[:] = 1
    return matrix


def binarize(matrix: sp.spmatrix) -> sp.csr_matrix:
    """A 0/1 int32 CSR copy of a sparse matrix (non-zero -> 1)."""
    out = sp.csr_matrix(matrix, dtype=np.int32, copy=True)
    out.eliminate_zeros()
    out.data[:] = 1
    return out


def column_counts(matrix: sp.spmatrix) -> np.ndarray:
    """(columns,) float64 number of non-zero rows per column of a 0/1 matrix."""
    return np.asarray(matrix.sum(axis=0), dtype=np.float64).ravel()


def row_counts(matrix: sp.spmatrix) -> np.ndarray:
    """(rows,) float64 row sums of a 0/1 matrix (the size of each row's code set)."""
    return np.asarray(matrix.sum(axis=1), dtype=np.float64).ravel()


# ---- Hamming distances ---------------------------------------------------------------------------------------
class Nearest(NamedTuple):
    """Nearest-neighbour Hamming distances between the rows of A and of B.

    Attributes:
        distance: (rows of A,) distance of each A row to its nearest B row.
        index: (rows of A,) index of that B row (the lowest index among ties).
        reverse_distance: (rows of B,) distance of each B row to its nearest A row.
    """

    distance: np.ndarray
    index: np.ndarray
    reverse_distance: np.ndarray


def nearest_hamming(a: sp.spmatrix, b: sp.spmatrix, *, exclude_self: bool = False,
                    chunk_cells: int = CHUNK_CELLS) -> Nearest:
    """Nearest-neighbour Hamming distances between the rows of two 0/1 matrices, in bounded memory.

    The Hamming distance of 0/1 rows x and y is ``|x| + |y| - 2 x.y``; the dot products come in row chunks of
    at most ``chunk_cells`` cells, so nothing is ever (rows x rows) at once: memory is one chunk plus a dense
    (DENSE_COLUMNS, rows of b) float32 block. 10,000 x 10,000 patients take about a second on 2 cores.

    Example:
        >>> aligned = aligned_code_matrices(train, synthetic)  # doctest: +SKIP
        >>> dcr = nearest_hamming(aligned.patients[1], aligned.patients[0]).distance  # doctest: +SKIP

    Args:
        a, b: 0/1 sparse matrices with the same columns (e.g. from :func:`aligned_code_matrices`).
        exclude_self: leave-self-out, for ``a`` and ``b`` the same set of rows: row i of ``a`` is not compared
            with row i of ``b`` (duplicates at other indices still count).
        chunk_cells: memory bound of one chunk, in float32 cells.

    Returns:
        :class:`Nearest` with int64 distances.

    Raises:
        ConfigError: when the column counts differ, a side is empty, or ``exclude_self`` is asked of
            matrices of different shape or with a single row.
    """
    n_a, n_b = a.shape[0], b.shape[0]
    if a.shape[1] != b.shape[1]:
        raise ConfigError(f"matrices must share their columns, got {a.shape[1]} and {b.shape[1]}")
    if n_a == 0 or n_b == 0:
        raise ConfigError(f"nearest_hamming needs non-empty sets, got {n_a} and {n_b} rows")
    if exclude_self and (a.shape != b.shape or n_a < 2):
        raise ConfigError(f"exclude_self needs one set of at least 2 rows, got shapes {a.shape} and {b.shape}")
    distance = np.empty(n_a, dtype=np.int64)
    index = np.empty(n_a, dtype=np.int64)
    reverse = np.full(n_b, np.inf, dtype=np.float32)
    for start, stop, dist in _hamming_chunks(a, b, chunk_cells):
        if exclude_self:
            rows = np.arange(stop - start)
            dist[rows, start + rows] = np.inf
        np.minimum(reverse, dist.min(axis=0), out=reverse)
        best = dist.argmin(axis=1)
        index[start:stop] = best
        distance[start:stop] = np.rint(dist[np.arange(stop - start), best])
    return Nearest(distance=distance, index=index, reverse_distance=np.rint(reverse).astype(np.int64))


def pairwise_hamming(a: sp.spmatrix, b: sp.spmatrix) -> np.ndarray:
    """(rows of a, rows of b) float32 Hamming distances. Dense output: only for subsamples."""
    out = np.empty((a.shape[0], b.shape[0]), dtype=np.float32)
    for start, stop, dist in _hamming_chunks(a, b, CHUNK_CELLS):
        out[start:stop] = dist
    return out


def _hamming_chunks(a: sp.spmatrix, b: sp.spmatrix, chunk_cells: int):
    """Yield ``(start, stop, D)`` with D the float32 Hamming distances of rows start:stop of ``a`` to all of ``b``.

    D is ``|x| + |y| - 2 x.y``, with the dot products split by column: the DENSE_COLUMNS columns with the most
    co-occurring work (count in a times count in b) through BLAS, the rest through a sparse product.
    """
    a = sp.csr_matrix(a, dtype=np.float32)
    b = sp.csr_matrix(b, dtype=np.float32)
    a_norm, b_norm = row_counts(a).astype(np.float32), row_counts(b).astype(np.float32)
    work = column_counts(a) * column_counts(b)
    order = np.argsort(-work, kind="stable")
    shared = order[work[order] > 0]  # columns present on one side only add nothing to x.y
    heavy, light = shared[:DENSE_COLUMNS], shared[DENSE_COLUMNS:]
    a_heavy = a[:, heavy].tocsr()                                   # (n_a, h), made dense per chunk
    b_heavy_t = np.ascontiguousarray(b[:, heavy].toarray().T)       # (h, n_b)
    a_light = a[:, light].tocsr() if len(light) else None
    b_light_t = b[:, light].T.tocsr() if len(light) else None
    step = max(1, chunk_cells // max(1, b.shape[0]))
    for start in range(0, a.shape[0], step):
        stop = min(a.shape[0], start + step)
        dots = a_heavy[start:stop].toarray() @ b_heavy_t            # (chunk, n_b)
        if a_light is not None:
            extra = (a_light[start:stop] @ b_light_t).tocoo()
            dots[extra.row, extra.col] += extra.data
        dots *= -2.0
        dots += b_norm[None, :]
        dots += a_norm[start:stop, None]
        yield start, stop, dots


# ---- sampling ------------------------------------------------------------------------------------------------
def sample_rows(n_total: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``n`` of ``n_total`` rows drawn without replacement (all rows when n >= n_total)."""
    if n >= n_total:
        return np.arange(n_total)
    return np.sort(rng.choice(n_total, size=n, replace=False))


def check_size(name: str, value: int | None, *, minimum: int = 1) -> None:
    """Raise ConfigError unless ``value`` is None or an int >= ``minimum``."""
    if value is not None and (not isinstance(value, (int, np.integer)) or value < minimum):
        raise ConfigError(f"{name} must be an integer >= {minimum} or None, got {value!r}")


def check_corpus(name: str, corpus: PatientCorpus, *, minimum: int = 1) -> None:
    """Raise ConfigError when a corpus argument has fewer than ``minimum`` patients."""
    if not isinstance(corpus, PatientCorpus):
        raise ConfigError(f"{name} must be a PatientCorpus, got {type(corpus).__name__}")
    if corpus.n_patients < minimum:
        raise ConfigError(f"{name} needs at least {minimum} patient(s), got {corpus.n_patients}")
