"""Runs → one tidy long table of spectral metrics (and raw spectra on the side).

Every row is one number::

    run, method, step, tokens, layer, component, kind, metric, value

``layer`` is the layer index (``-1`` for model-level matrices such as ``embed``);
``component`` is the canonical name without its ``layers.{i}.`` prefix
(``attn.q``, ``mlp.down``, ``resid_post``, ``attn.ov.h3`` for head 3's OV
circuit, ``embed``, ``lm_head``, ``model`` for run-level numbers). ``kind``:

==================== =====================================================================
``weight``           the (effective) weight matrix at the checkpoint
``grad``             ``dL/dW`` on the run's fixed gradient batch (from the capture files)
``act``              activations on the fixed probe batch (``tokens × features``, centred);
                     also ``anisotropy``, ``cka_prev`` and ``cka_final`` rows, and ``svcca_prev``,
                     ``pwcca_prev``, ``svcca_final``, ``pwcca_final`` where the probe has at least
                     ``cca_min_tokens_per_feature`` (5) tokens per feature (:mod:`dynamics.similarity`)
``update``           ``W_t − W_prev`` between consecutive checkpoints
``update_cumulative`` ``W_t − W_first``
``update_merge``     ReLoRA: ``W`` at merge ``k`` minus ``W`` at merge ``k−1`` (rank ≤ r for a wrapped
                     matrix); ``update_restart`` is its old name (accepted in ``kinds``; old tables are
                     read with it renamed)
``lora``             ReLoRA: the live adapter's update ``s·B·A`` (the wrapped matrices only)
``train``            ``loss``, ``val_loss``, ``lr``, ``pair_acc`` from ``metrics.jsonl``, every step
``cross_run``        ReLoRA vs full-rank at the same step, under the ReLoRA run: cumulative-update
                     subspace overlap, debiased CKA, SVCCA/PWCCA (:mod:`dynamics.cross_run`)
``run``              one ``seed`` row per run (always on, like ``train``)
==================== =====================================================================

Weights and gradients also get heavy-tail (``alpha``…, ``alpha_status``) and
Marchenko–Pastur (``mp_edge``, ``signal_rank``, ``signal_energy``) rows,
weights ``intruders`` rows and ReLoRA cycles ``overlap_prev`` rows: see
:mod:`dynamics.analyze_rows`; ``AnalysisOptions.basic()`` (``--basic``) turns
these and the cross-run rows off. Which matrices a ReLoRA run wraps, and at
which rank, is read from its stored config (:attr:`dynamics.io.Run.wrapped`);
a ReLoRA run whose config does not say is an error, never a default.

Spectral metrics (one SVD per matrix, see :meth:`dynamics.Spectrum.metrics`)
are named as in :func:`dynamics.spectrum_metrics` (among them the norms
``spectral_norm``, ``frobenius_norm``, ``nuclear_norm``). Weights, gradients and
the three update kinds also get ``gini``, ``hoyer_sparsity`` and
``induced_inf_norm`` of their entries (:mod:`dynamics.sparsity`; one sort and one
pass over the entries; not for the factored circuits or ``lora``). Update matrices use the rank
tolerance of :func:`update_tolerance` (float32 rounding noise of the weights is
not rank). Work is split into units
(one run × one checkpoint); each unit's rows are cached under
``<out>.cache/`` keyed by the sha256 of every input file, so re-running skips
what is done and a crash loses at most the unit in progress (``shard=(K, N)``:
one deterministic 1/N of the units, see :func:`shard_units`; shards may run at
once and a final call without a shard assembles the table). With
``keep_going`` a unit whose input is bad or holds no data (the project's
errors: :class:`~dynamics.validation.DynamicsError`,
:class:`~trainer.errors.TrainerError`) is listed and skipped; any other
exception is a bug and stops the analysis.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from dynamics._kernels import decomposition_cost
from dynamics._malloc import child_tunables, hold_for_process, reuse_freed_memory
from dynamics.io import DynamicsIOError, Run
from dynamics.similarity import MIN_TOKENS_PER_FEATURE
from dynamics.spectra import Spectrum
from dynamics.validation import DynamicsError, NonFiniteError, check_finite
from trainer.envvars import environ_set
from trainer.errors import TrainerError
from trainer.names import ATTN_PROJS
from trainer.run_format import (
    ADAPTERS_FILE,
    MANIFEST,
    METRICS,
    MODEL_FILE,
    RESULTS_COLUMNS,
    Wrapped,
    checkpoint_file_problems,
    step_dirname,
)
from trainer.run_format import SPECTRA_COLUMNS as _SPECTRA_COLUMNS

if TYPE_CHECKING:
    from dynamics.cluster import DaskUnits

#: Version of the rows a unit computes; part of every cache key (2: wrapped matrices from the run's config, update_merge;
#: 3: norms among the spectral metrics, entry sparsity, SVCCA/PWCCA).
ANALYSIS_VERSION = 3
#: Columns of the results table (:data:`trainer.run_format.RESULTS_COLUMNS`).
COLUMNS: list[str] = list(RESULTS_COLUMNS)
#: Columns of the spectra table (:data:`trainer.run_format.SPECTRA_COLUMNS`).
SPECTRA_COLUMNS: list[str] = list(_SPECTRA_COLUMNS)
#: Kinds :class:`AnalysisOptions` computes (``train`` and ``run`` rows are always on).
ANALYSIS_KINDS: tuple[str, ...] = ("weight", "grad", "act", "update", "update_cumulative", "update_merge", "lora")
#: Old kind names still accepted in ``AnalysisOptions.kinds`` / ``--kinds`` and renamed in saved tables.
KIND_ALIASES: dict[str, str] = {"update_restart": "update_merge"}
#: ``AnalysisOptions.device`` / ``--device`` values (``None``, the default, is the numpy reference path on CPU).
DEVICES: tuple[str, ...] = ("cpu", "cuda", "auto")
#: What ``--keep-going`` skips: a bad or empty input. Anything else is a bug and surfaces.
INPUT_ERRORS: tuple[type[Exception], ...] = (DynamicsError, TrainerError)
TRAIN_METRICS = ("loss", "val_loss", "lr", "grad_norm", "pair_acc")
#: Parquet files carry a CRC per page, checked on read: a damaged table is an error, not wrong numbers.
PARQUET_WRITE: dict[str, Any] = {"write_page_checksum": True}
PARQUET_READ: dict[str, Any] = {"page_checksum_verification": True}

#: Activation sites analysed by default: the residual stream, attention output, SwiGLU hidden.
DEFAULT_ACT_SITES = (
    "act:layers.*.resid_pre",
    "act:layers.*.resid_post",
    "act:layers.*.attn.o",
    "act_in:layers.*.mlp.down",
)


class AnalysisError(DynamicsError):
    """An analysis unit could not be computed (its message names the run and the file)."""


class NonFiniteCheckpointError(AnalysisError):
    """A checkpoint whose weights hold NaN or Inf (a diverged run). Its unit is skipped and named, with or without
    ``keep_going``; other units never compare against it."""


@dataclass(frozen=True)
class AnalysisOptions:
    """What :func:`analyze_runs` computes. ``kinds`` is any subset of :data:`ANALYSIS_KINDS` (``train`` is always on).

    Old kind names (:data:`KIND_ALIASES`: ``update_restart``) are accepted and stored under the new name.
    """

    kinds: tuple[str, ...] = ANALYSIS_KINDS
    act_sites: tuple[str, ...] = DEFAULT_ACT_SITES
    circuits: bool = True  # per-head OV and QK circuits of weights
    keep_spectra: bool = True
    # analyses beyond spectral metrics (dynamics/analyze_rows.py, dynamics/cross_run.py)
    heavy_tails: bool = True  # power-law alpha of weight/grad ESDs
    spikes: bool = True  # Marchenko–Pastur edge, signal rank and energy of weights/grads
    subspaces: bool = True  # intruder dimensions; ReLoRA cycle-update overlaps
    cross_run: bool = True  # ReLoRA vs full-rank at the same step: update overlap, debiased CKA
    intruder_k: int = 10
    intruder_threshold: float = 0.5
    sparsity: bool = True  # Gini, Hoyer sparsity, induced ∞-norm of weight/grad/update entries (dynamics.sparsity)
    cca: bool = True  # SVCCA and PWCCA beside CKA, within a run and across runs (dynamics.similarity)
    cca_min_tokens_per_feature: float = MIN_TOKENS_PER_FEATURE  # their rows only where tokens >= this × features
    include_interrupts: bool = False  # also checkpoints saved on SIGINT/SIGTERM (off the grid; Run.interrupt_steps)
    # None: the numpy reference path (CPU); "cpu" / "cuda" / "auto": the torch device path (resolve_device); not in key()
    device: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", normalize_kinds(self.kinds))
        if self.device is not None and self.device not in DEVICES:
            raise AnalysisError(f"analysis device must be one of {', '.join(DEVICES)}, got {self.device!r}")

    @classmethod
    def basic(cls, **kw: Any) -> AnalysisOptions:
        """Spectral metrics and CKA only: issue 9's analyses (heavy tails, spikes, subspaces, cross-run), entry
        sparsity and SVCCA/PWCCA off; ``kw`` sets any field, one of those included."""
        off = dict(heavy_tails=False, spikes=False, subspaces=False, cross_run=False, sparsity=False, cca=False)
        return cls(**{**off, **kw})

    def key(self) -> str:
        """Hash of these options and :data:`ANALYSIS_VERSION`: part of every cache key.

        ``device`` is left out: every device computes the same rows (values within the tolerance stated in
        :func:`resolve_device`), so a table cached on one device is reused on another.
        """
        fields = {k: v for k, v in asdict(self).items() if k != "device"}
        payload = json.dumps({"v": ANALYSIS_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def normalize_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    """``kinds`` with old names mapped to new ones (:data:`KIND_ALIASES`), order kept, duplicates dropped.

    Raises :class:`AnalysisError` naming any kind outside :data:`ANALYSIS_KINDS` (and its aliases).
    """
    if isinstance(kinds, str):
        raise AnalysisError(f"analysis kinds must be a list of names, got the string {kinds!r}")
    out: list[str] = []
    for kind in kinds:
        kind = KIND_ALIASES.get(kind, kind)
        if kind not in out:
            out.append(kind)
    unknown = [k for k in out if k not in ANALYSIS_KINDS]
    if unknown:
        raise AnalysisError(
            f"unknown analysis kinds {unknown}; choose from {','.join(ANALYSIS_KINDS)} "
            f"(old names accepted: {', '.join(KIND_ALIASES)})"
        )
    return tuple(out)


def resolve_device(device: str | None) -> str | None:
    """The device a unit's spectra and metrics run on: ``None`` (the numpy reference path), ``'cpu'`` or ``'cuda'``.

    ``'auto'`` is ``'cuda'`` when torch sees a CUDA device, else ``'cpu'``; ``'cuda'`` without one is an
    :class:`AnalysisError` (one line, exit 2 from the CLI). On the device path (``'cpu'`` or ``'cuda'``) each
    matrix is moved to the device as a **float64** torch tensor before its singular values, entry sparsity,
    anisotropy and CKA are computed, so ranks, condition numbers and update spectra are computed in the same
    precision as the CPU float64 reference (float32 is never used); each :class:`~dynamics.Spectrum` keeps the
    stored dtype's name, so default rank tolerances (``eps`` of the stored dtype) are unchanged. Results come back
    as Python floats in rows of the same structure.

    Agreement with the reference: ``'cpu'`` runs the same float64 LAPACK routes on the same numbers (tested equal
    to ``rtol=1e-9``; in practice bit-identical). On CUDA the ``'auto'`` route is always the direct SVD
    (cuSOLVER), whereas on CPU strongly rectangular matrices use the float64 Gram route (:mod:`dynamics.spectra`),
    whose relative error on ``s_i`` is about ``eps64 · (s_1/s_i)²`` (at most ~1e-8, since that route is kept only
    for condition numbers ≤ 1e4): values agree to ~1e-12 relative for ``s_1``, norms and rank/entropy summaries,
    and to ~1e-8 for ``sigma_min`` and condition numbers (tested to ``rtol=1e-6``). Still on CPU under
    ``'cuda'``: reading and hashing files, heavy-tail and Marchenko–Pastur fits (on the singular values),
    intruder / cycle-overlap subspaces, SVCCA/PWCCA, the cross-run units and building the pandas rows.
    """
    if device is None:
        return None
    if device not in DEVICES:
        raise AnalysisError(f"analysis device must be one of {', '.join(DEVICES)}, got {device!r}")
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise AnalysisError(
            f"analyze: --device cuda, but torch {torch.__version__} sees no CUDA device "
            f"(built with CUDA {torch.version.cuda}); use --device cpu or --device auto"
        )
    return device


def _on_device(a: Any, device: str, *, float64: bool = True) -> Any:
    """``a`` (numpy or torch) as a torch tensor on ``device``, float64 unless ``float64=False`` (dtype kept)."""
    import torch

    from dynamics.validation import as_tensor

    t = as_tensor(a, name="matrix", caller="analyze")
    return t.to(device, torch.float64) if float64 else t.to(device)


def _device_spectrum(fn: Callable[..., Spectrum], *arrays: Any, device: str | None, **kw: Any) -> Spectrum:
    """``fn(*arrays, **kw)``; with a ``device``, on float64 tensors there, labelled with the arrays' stored dtype.

    The label keeps ``Spectrum.dtype`` (and so the default rank tolerance ``eps(dtype)``) that of the stored
    matrices, as on the reference path, although the computation ran in float64.
    """
    if device is None:
        return fn(*arrays, **kw)
    import torch

    from dynamics.validation import as_tensor, dtype_name

    tensors = [as_tensor(a, name="matrix", caller="analyze") for a in arrays]
    stored = functools.reduce(torch.promote_types, [t.dtype for t in tensors])
    spec = fn(*(t.to(device, torch.float64) for t in tensors), **kw)
    return Spectrum(spec.values, spec.shape, dtype_name(stored), spec.method)


# ----------------------------------------------------------------------------------------------
# one unit: one run at one checkpoint


def _split(name: str) -> tuple[int, str]:
    if name.startswith("layers."):
        _, layer, rest = name.split(".", 2)
        return int(layer), rest
    return -1, name


class _Rows:
    """Accumulates table rows and spectra for one unit."""

    def __init__(self, run: str, method: str, step: int, tokens: int | None, keep_spectra: bool) -> None:
        self.base: dict[str, Any] = {"run": run, "method": method, "step": step, "tokens": tokens}
        self.rows: list[dict[str, Any]] = []
        self.spectra: list[dict[str, Any]] = []
        self.keep_spectra = keep_spectra

    def add(self, name: str, kind: str, metrics: Mapping[str, Any]) -> None:
        layer, component = _split(name)
        for metric, value in metrics.items():
            self.rows.append(
                {
                    **self.base,
                    "layer": layer,
                    "component": component,
                    "kind": kind,
                    "metric": metric,
                    "value": float(value),
                }
            )

    def add_spectrum(
        self,
        name: str,
        kind: str,
        spec: Spectrum,
        *,
        tol: float | None = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> None:
        """Rows of ``spec.metrics(tol=tol)`` (or of ``metrics``, the same already computed: :func:`_each`)."""
        self.add(name, kind, spec.metrics(tol=tol) if metrics is None else metrics)
        if self.keep_spectra:
            layer, component = _split(name)
            self.spectra.append(
                {
                    "run": self.base["run"],
                    "method": self.base["method"],
                    "step": self.base["step"],
                    "layer": layer,
                    "component": component,
                    "kind": kind,
                    "shape": list(spec.shape),
                    "values": spec.values.astype(np.float64).tolist(),
                }
            )


def update_tolerance(w_new: np.ndarray, w_old: np.ndarray) -> float:
    """Rank tolerance for ``w_new − w_old``: ``max(m, n) · eps(stored dtype) · max(‖W_new‖_F, ‖W_old‖_F)``.

    Weights stored in float32 (or bf16) carry rounding noise of that size, so
    their difference has tiny but non-zero singular values in every direction;
    the default tolerance, relative to ``σ₁(ΔW)``, would count that noise as
    rank (e.g. a ReLoRA cycle's update, rank ≤ r, would look full-rank).
    """
    return _tolerance(w_new.shape, w_new.dtype, w_old.dtype, frobenius64(w_new), frobenius64(w_old))


#: Entries per float64 piece of :func:`frobenius64` (512 KiB of float64: the piece stays in cache).
_NORM_PIECE = 1 << 16


def frobenius64(a: np.ndarray) -> float:
    """Frobenius norm of ``a`` (any shape, real) summed in float64, without a float64 copy of the whole array.

    The entries are converted to float64 a piece of :data:`_NORM_PIECE` at a time and each piece's sum of squares
    is one BLAS dot: the float64 sum of exact float64 squares (float32/bf16 entries convert exactly), so no
    overflow for any float32 input (``n · (3.4e38)² < 1.8e308``) and a relative error of about ``n_pieces · eps64``
    against the exactly rounded norm. NaN or Inf entries give NaN or Inf.
    """
    flat = np.ravel(a)
    if flat.dtype == np.float64 and flat.size <= _NORM_PIECE:
        return float(np.sqrt(flat @ flat))
    total = 0.0
    for lo in range(0, flat.size, _NORM_PIECE):
        piece = flat[lo : lo + _NORM_PIECE].astype(np.float64)
        total += float(piece @ piece)
    return float(np.sqrt(total))


#: Matrices of at least this many entries (the embedding, LM head, ``small``'s MLP projections and wide activation
#: sites) are decomposed with :func:`large_matrix_threads` torch threads; smaller ones with the unit's own count
#: (default 1), since more threads slow batched LAPACK calls on small matrices down (measured on 2 cores: 2 threads
#: make a float64 ``svdvals`` of one 50304x384 matrix 2.0x and of twelve 512x1536 ones 1.7x faster, of twelve 96x384
#: ones 1.7x slower).
LARGE_MATRIX_ENTRIES = 1 << 18
#: Environment variable with the torch thread count for large matrices (:func:`large_matrix_threads`).
LARGE_THREADS_ENV = "DYNAMICS_LARGE_MATRIX_THREADS"


def large_matrix_threads() -> int:
    """Torch threads a unit uses for matrices of at least :data:`LARGE_MATRIX_ENTRIES` entries.

    ``$DYNAMICS_LARGE_MATRIX_THREADS`` when set (:func:`analyze_runs` sets it to the usable cores divided by its
    local workers, unless the user did); otherwise the unit's own thread count (a Dask worker: its own setting).
    """
    import torch

    try:
        n = int(os.environ.get(LARGE_THREADS_ENV, "0"))
    except ValueError:
        n = 0
    return n if n > 0 else torch.get_num_threads()


@contextmanager
def _threads_for(entries: int, pool: Executor | None = None) -> Iterator[None]:
    """Run the block with :func:`large_matrix_threads` torch threads when its matrices have ``entries`` entries or
    more (:data:`LARGE_MATRIX_ENTRIES`); the thread count is restored afterwards. Inside a unit's thread ``pool``
    (:func:`unit_threads`) the count stays as it is (one torch thread per task: the cores go to the tasks)."""
    import torch

    before = torch.get_num_threads()
    n = large_matrix_threads() if entries >= LARGE_MATRIX_ENTRIES and pool is None else before
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def unit_threads(device: str | None) -> int:
    """Threads a unit runs its parts on (its weight components and its capture parts, each a task with one torch
    thread, ordered by :func:`_pool_order` and :func:`_capture_parts`; 1: one after another, with
    :func:`large_matrix_threads` for the large matrices).

    On the CPU paths (``device`` ``None`` or ``'cpu'``) the unit's cores, :func:`large_matrix_threads`
    (:func:`analyze_runs` sets them to the usable cores divided by its local workers); on CUDA 1. The parts release
    the GIL in LAPACK, BLAS and numpy's sorts and sums, so two tasks use two cores: measured on 2 cores, ``small``
    checkpoints took 11.8 s (full-rank), 13.8 s (ReLoRA) and 16.6 s (ReLoRA merge) against 14.7, 20.2 and 26.8 s
    one part after another with two threads for the large matrices. The rows are the same, in the same order, bit
    for bit: each part computes what it computes alone with one torch thread (memory: the parts in flight; the
    embedding and the LM head are one task, never in flight together).
    """
    return large_matrix_threads() if device in (None, "cpu") else 1


@contextmanager
def _numpy_blas_one_thread() -> Iterator[None]:
    """numpy's and scipy's BLAS (OpenBLAS in their wheels) at one thread for the block, restored after
    (``threadpoolctl``; without it, where the package is missing, as they are).

    A unit's own BLAS calls through numpy (the Gini rank weights, the float64 norms, the intruders' cosines) are
    small, and each of its tasks already has a core: numpy's default of one BLAS thread per core made such a call
    wait for the other task's core. Measured on 2 cores, the ReLoRA merge step of the ``small`` pair: 10.4 → 9.5 s.
    One thread also makes those sums the same on any machine, whatever its core count.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@contextmanager
def _unit_pool(threads: int) -> Iterator[Executor | None]:
    """A pool of ``threads`` threads (``None`` for one) with torch at one thread meanwhile (restored after), and
    numpy's BLAS at one thread throughout (:func:`_numpy_blas_one_thread`)."""
    with _numpy_blas_one_thread():
        if threads <= 1:
            yield None
            return
        with _thread_pool(threads) as pool:
            yield pool


@contextmanager
def _thread_pool(threads: int) -> Iterator[Executor]:
    """:func:`_unit_pool`'s pool of ``threads`` (> 1) threads, torch at one thread meanwhile."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dynamics-unit")
    try:
        yield pool
    except BaseException:  # a failed part fails the unit: the waiting tasks are dropped, the running ones finish
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)
        torch.set_num_threads(before)


#: Matrices of at most this many entries are computed in batches of one shape (one batched torch.linalg call per
#: shape and kind: all layers' ``attn.q`` at once); larger ones (embedding, LM head) one at a time, where a batch
#: saves no per-call overhead and would hold several of them at once.
BATCH_MAX_ENTRIES = 1 << 20


def _shape_groups(ws: Mapping[str, np.ndarray]) -> list[list[str]]:
    """Names of the 2-D matrices of ``ws`` in groups of one shape and dtype (in first-seen order); a matrix of more
    than :data:`BATCH_MAX_ENTRIES` entries is a group of its own."""
    keyed: dict[tuple[Any, ...], list[str]] = {}
    groups: list[list[str]] = []
    for name, w in ws.items():
        if w.ndim != 2:
            continue
        if w.size > BATCH_MAX_ENTRIES:
            groups.append([name])
            continue
        key = (w.shape, w.dtype.str)
        if key not in keyed:
            keyed[key] = []
            groups.append(keyed[key])
        keyed[key].append(name)
    return groups


def _stack(arrays: Mapping[str, np.ndarray], names: list[str]) -> np.ndarray:
    """``arrays[names]`` as one ``(B, m, n)`` array (a view for one name)."""
    return arrays[names[0]][None] if len(names) == 1 else np.stack([arrays[n] for n in names])


def _each(spec: Spectrum, tol: np.ndarray | None = None) -> list[tuple[Spectrum, dict[str, Any]]]:
    """Each matrix of the batched ``spec`` (batch shape ``(B,)``) with its metrics, computed for the whole batch at once
    (``spec.metrics(tol=tol)``, ``tol`` one per matrix or ``None``): the spectrum kernels reduce along the last axis
    only, so each matrix's numbers are those of its own ``metrics()`` (to the last bit, or one ulp where numpy sums a
    batch's rows in another order: 2e-16 relative at most on the micro and tiny tables)."""
    metrics = spec.metrics(tol=tol)
    return [(spec[i], {k: np.asarray(v)[i] for k, v in metrics.items()}) for i in range(spec.batch_shape[0])]


def _entry_rows(M: Any, device: str | None, *, float64: bool) -> list[dict[str, float]]:
    """:func:`dynamics.sparsity.entry_metrics` of each matrix of the batch ``M`` (B, m, n), one dict per matrix."""
    from dynamics.sparsity import entry_metrics

    if device is not None:
        M = _on_device(M, device, float64=float64)
    values = entry_metrics(M)
    return [{k: float(np.asarray(v).reshape(-1)[i]) for k, v in values.items()} for i in range(M.shape[0])]


def _tolerance(shape: tuple[int, ...], new: np.dtype, old: np.dtype, norm_new: float, norm_old: float) -> float:
    """:func:`update_tolerance` from the two matrices' shape, dtypes and float64 Frobenius norms (:func:`frobenius64`):
    the batched path computes each norm once and calls this directly."""
    eps = max(
        np.finfo(new).eps if np.issubdtype(new, np.floating) else 0.0,
        np.finfo(old).eps if np.issubdtype(old, np.floating) else 0.0,
    )
    return float(max(shape) * eps * max(norm_new, norm_old))


class _Versions:
    """One group's matrices at other checkpoints, read once each and dropped after their last use (memory: the
    group at a few checkpoints, never the whole of another checkpoint)."""

    def __init__(self, run: _RunView, names: list[str], uses: list[int]) -> None:
        self._run, self._names, self._uses = run, names, list(uses)
        self._held: dict[int, dict[str, np.ndarray]] = {}

    def get(self, step: int) -> dict[str, np.ndarray]:
        if step not in self._held:
            self._held[step] = self._run.weights(step, self._names)
        return self._held[step]

    def done(self, step: int) -> None:
        """One use of ``step`` is over; its matrices are dropped when no later use remains."""
        if step in self._uses:
            self._uses.remove(step)
        if step not in self._uses:
            self._held.pop(step, None)


def _weight_group(
    found: dict[tuple[str, str], Any],
    run: _RunView,
    step: int,
    ws: Mapping[str, np.ndarray],
    group: list[str],
    others: Mapping[str, int | None],
    first: int,
    merge_prev: int | None,
    merge_prev2: int | None,
    opts: AnalysisOptions,
) -> None:
    """Results of one group of same-shaped matrices (see :func:`_weight_rows`), batched, into ``found[(name, slot)]``."""
    from dynamics import spectrum
    from dynamics.analyze_rows import analysed_for_subspaces, spectrum_extra
    from dynamics.spectra import spectrum_from_gram
    from dynamics.subspaces import intruder_counts, update_overlaps

    dev = opts.device
    stack = _stack(ws, group)
    sub = [n for n in group if opts.subspaces and analysed_for_subspaces(run, n)]
    eig = _shared_gram(stack) if "weight" in opts.kinds and dev is None and sub == group else None
    if "weight" in opts.kinds:
        spec = _device_spectrum(spectrum, stack, device=dev) if eig is None else spectrum_from_gram(stack, eig)
        each = _each(spec)
        entries = _entry_rows(stack, dev, float64=False) if opts.sparsity else None
        for i, name in enumerate(group):
            one, metrics = each[i]
            found[(name, "weight")] = (one, metrics, spectrum_extra(one, opts), None if entries is None else entries[i])
    updates = [(kind, other) for kind, other in others.items() if kind in opts.kinds and other is not None]
    rank = run.wrapped.rank if sub and merge_prev is not None and merge_prev2 is not None else None
    overlap = rank is not None and "update_merge" in opts.kinds
    uses: list[int | None] = list(dict.fromkeys(other for _, other in updates))  # one use per differenced step
    uses += ([first] if sub else []) + ([merge_prev, merge_prev2] if overlap else [])
    versions = _Versions(run, group, [s for s in uses if s is not None])
    # float64 copies only where needed and one matrix at a time (memory: the largest matrix is the embedding)
    norms = [run.norm64(step, name, ws[name]) for name in group] if updates else []
    # kinds that difference against the same checkpoint (the second checkpoint's update and cumulative update, a
    # merge step one checkpoint after the previous merge) share one difference and its numbers
    by_step: dict[int, list[str]] = {}
    for kind, other in updates:
        assert other is not None
        by_step.setdefault(other, []).append(kind)
    cycle: np.ndarray | None = None  # W − W(merge_prev) of the subspace matrices, kept for the cycle overlap
    for other, kinds in by_step.items():
        olds = versions.get(other)
        tols = [
            _tolerance(stack.shape[1:], stack.dtype, olds[name].dtype, norms[i], run.norm64(other, name, olds[name]))
            for i, name in enumerate(group)
        ]
        # the exact float64 difference (each float32/bf16 entry converts exactly, then one IEEE subtraction), written
        # matrix by matrix into the batch (no stacked copy of the old matrices)
        if dev is None:
            delta = np.empty(stack.shape, dtype=np.float64)
            for i, name in enumerate(group):
                np.subtract(stack[i], olds[name], out=delta[i], dtype=np.float64)
        else:
            delta = _on_device(stack, dev) - _on_device(_stack(olds, group), dev)
        del olds
        versions.done(other)
        if overlap and other == merge_prev and dev is None:
            cycle = delta[[group.index(n) for n in sub]]
        each = _each(spectrum(delta), np.asarray(tols))
        entries = _entry_rows(delta, None, float64=True) if opts.sparsity else None
        del delta
        for kind in kinds:
            for i, name in enumerate(group):
                found[(name, kind)] = (*each[i], None if entries is None else entries[i])
    if sub:
        idx = [group.index(n) for n in sub]
        w_sub = stack[idx]  # intruder_counts and the differences below convert to float64 (exactly)
        digest = run.entry(first).get("sha256", {}).get(MODEL_FILE)  # verified: names the reference's entries
        counts = intruder_counts(
            w_sub,
            _stack(versions.get(first), sub),
            k=opts.intruder_k,
            threshold=opts.intruder_threshold,
            gram=eig,
            reference_names=None if digest is None else [(digest, name) for name in sub],
        )
        del eig
        versions.done(first)
        for name, count in zip(sub, counts):
            found[(name, "intruders")] = count
        if overlap and rank is not None and merge_prev is not None and merge_prev2 is not None:
            w_prev = _stack(versions.get(merge_prev), sub)
            if cycle is None:
                cycle = np.subtract(w_sub, w_prev, dtype=np.float64)
            previous = np.subtract(w_prev, _stack(versions.get(merge_prev2), sub), dtype=np.float64)
            for name, ov in zip(sub, update_overlaps(cycle, previous, rank)):
                if ov is not None:  # a zero cycle update has no subspace: no row
                    found[(name, "overlap")] = ov.metrics("overlap_prev")


def _shared_gram(stack: np.ndarray) -> tuple[Any, Any] | None:
    """:func:`dynamics._kernels.gram_eigh` of a group of weights whose every matrix gets intruder rows, where the
    weights' spectra take the Gram route (rectangular, CPU): the spectra (:func:`dynamics.spectra.spectrum_from_gram`)
    and the intruders' top singular vectors then come from one Gram product and one eigendecomposition instead of
    two of each (measured in one process, one core, the full-rank step 6 of the ``small`` pair: 12.55 → 11.75 s a
    unit; the weights' values move by at most 1.3e-13 relative). ``None`` elsewhere: each computes its own."""
    import torch

    from dynamics._kernels import gram_eigh, gram_first

    x = torch.from_numpy(stack)
    return gram_eigh(x) if gram_first(x) else None


def _pool_order(components: list[list[str]], shapes: Mapping[str, tuple[int, ...]]) -> list[list[list[str]]]:
    """The weight components of a unit (lists of matrix names) as the tasks of its thread pool, in the order to
    submit them: each task a list of components computed one after another.

    The vocabulary-sized components (no layer index and at least half the entries of the largest such component:
    the embedding and the LM head) are one task, most costly first, so the two never run at once (memory: each
    holds its matrix at a few checkpoints in float32 and float64). Every other component follows as a task of its
    own, most costly first: longest processing time first, so the tasks left at the end are short and the threads
    finish together (measured on 2 cores: the LM head, submitted last in the model's order, ran alone for its last
    3.4 s of a 12.3 s ReLoRA merge unit). Cost: :func:`dynamics._kernels.decomposition_cost` summed over a component's matrices
    (``shapes``: from the checkpoint's header; a name without a shape costs 0). Ties keep the model's order, so
    without shapes the order is the model's.
    """

    def cost(component: list[str]) -> int:
        return sum(decomposition_cost(shapes.get(n, ())) for n in component)

    def entries(component: list[str]) -> int:
        return sum(math.prod(shapes.get(n, (0,))) for n in component)

    unlayered = [c for c in components if all(_split(n)[0] < 0 for n in c)]
    largest = max((entries(c) for c in unlayered), default=0)
    vocabulary = [c for c in unlayered if largest > 0 and 2 * entries(c) >= largest]
    others = [c for c in components if not any(c is v for v in vocabulary)]
    chain = sorted(vocabulary, key=cost, reverse=True)
    return ([chain] if chain else []) + [[c] for c in sorted(others, key=cost, reverse=True)]


def _weight_rows(
    out: _Rows,
    run: _RunView,
    step: int,
    prev: int | None,
    first: int,
    merges: list[int],
    opts: AnalysisOptions,
    pool: Executor | None = None,
) -> None:
    """Rows of the checkpoint's weights, their updates, circuits and adapters.

    ``prev``/``first`` are the previous and the first checkpoint (``None``: none
    usable); ``merges`` the ReLoRA merge checkpoints before ``step`` when
    ``step`` is itself a merge (most recent first; see :meth:`_RunView.merge_chain`).

    The checkpoint is read once, one component at a time (all layers' ``attn.q``, then ``attn.k``, ...: memory holds
    one component at a few checkpoints, plus the attention projections for the circuits); same-shaped matrices are
    computed as one batch (:func:`_weight_group`: one batched ``svdvals``/sort/SVD per shape and kind, the other
    checkpoints read per group) and their rows are added in the order of the matrices, as one at a time would.
    """
    from dynamics import lora_update_spectrum, ov_circuit_spectra, qk_circuit_spectra

    merge_prev = merges[0] if merges else None
    merge_prev2 = merges[1] if len(merges) > 1 else None
    model = run.config["model"]
    dev = opts.device  # resolved (analyze_unit): None, "cpu" or "cuda"
    names = run.weights_names(step)
    components: dict[str, list[str]] = {}
    for name in names:
        components.setdefault(_split(name)[1], []).append(name)
    others = {"update": prev, "update_cumulative": first if first != step else None, "update_merge": merge_prev}
    found: dict[tuple[str, str], Any] = {}  # each task writes its own keys

    def component_task(component: list[str]) -> tuple[set[str], dict[str, np.ndarray]]:
        """One component's results into ``found``; its matrix names and attention projections (for the circuits)."""
        part = run.weights(step, component)
        for group in _shape_groups(part):
            with _threads_for(part[group[0]].size, pool):
                _weight_group(found, run, step, part, group, others, first, merge_prev, merge_prev2, opts)
        attn = {n: w for n, w in part.items() if opts.circuits and n.split(".")[-1] in ATTN_PROJS and w.ndim == 2}
        return {n for n, w in part.items() if w.ndim == 2}, attn

    def chain_task(chain: list[list[str]]) -> list[tuple[set[str], dict[str, np.ndarray]]]:
        return [component_task(c) for c in chain]

    if pool is None:  # in the model's order
        done = [component_task(c) for c in components.values()]
    else:
        chains = _pool_order(list(components.values()), run.weight_shapes(step))
        done = [d for f in [pool.submit(chain_task, c) for c in chains] for d in f.result()]
    matrices: set[str] = set()
    ws: dict[str, np.ndarray] = {}  # the attention projections, kept for the circuits
    for names_i, attn_i in done:
        matrices |= names_i
        ws.update(attn_i)
    del done
    for name in names:
        if name not in matrices:
            continue
        if (name, "weight") in found:
            spec, metrics, extra, entries = found[(name, "weight")]
            out.add_spectrum(name, "weight", spec, metrics=metrics)
            out.add(name, "weight", extra)
            if entries is not None:
                out.add(name, "weight", entries)
        if (name, "intruders") in found:
            out.add(name, "weight", {"intruders": found[(name, "intruders")]})
        if (name, "overlap") in found:
            out.add(name, "update_merge", found[(name, "overlap")])
        for kind in others:
            if (name, kind) in found:
                spec, metrics, entries = found[(name, kind)]
                out.add_spectrum(name, kind, spec, metrics=metrics)
                if entries is not None:
                    out.add(name, kind, entries)
    found.clear()
    if opts.circuits and "weight" in opts.kinds and "n_heads" in model:  # imports without config.json: no head split
        heads = dict(n_heads=model["n_heads"], n_kv_heads=model["n_kv_heads"])
        for i in range(model["n_layers"]):
            proj = {p: ws.get(f"layers.{i}.attn.{p}") for p in ATTN_PROJS}
            q, k, v, o = proj["q"], proj["k"], proj["v"], proj["o"]
            if o is not None and v is not None:
                ov = _device_spectrum(ov_circuit_spectra, o, v, device=dev, **heads)
                for h, (head, metrics) in enumerate(_each(ov)):  # every head's metrics in one batched call
                    out.add_spectrum(f"layers.{i}.attn.ov.h{h}", "weight", head, metrics=metrics)
            if q is not None and k is not None:
                qk = _device_spectrum(qk_circuit_spectra, q, k, device=dev, **heads)
                for h, (head, metrics) in enumerate(_each(qk)):
                    out.add_spectrum(f"layers.{i}.attn.qk.h{h}", "weight", head, metrics=metrics)
    factors = run.lora_factors(step) if "lora" in opts.kinds and run.method == "relora" else {}
    if factors:  # a checkpoint with live adapters: their scale must be stated (Run.lora_scale raises otherwise)
        scale = run.lora_scale
        assert scale is not None  # a ReLoRA run states its rank, so its scale is known or the read raised
        for key in [k for k in factors if k.endswith(".lora_a")]:
            name = key[: -len(".lora_a")]
            if not run.wrapped.wraps(name):
                mpath = Path(run.path) / MANIFEST
                raise DynamicsIOError(
                    f"{run.checkpoint_path(step) / ADAPTERS_FILE} holds adapters of {name}, which "
                    f"{mpath} does not list in relora.targets {list(run.wrapped.targets)}",
                    mpath,
                )
            lora = _device_spectrum(
                lora_update_spectrum, factors[f"{name}.lora_b"], factors[key], device=dev, scale=scale
            )
            out.add_spectrum(name, "lora", lora)


def _capture_parts(opts: AnalysisOptions) -> list[str | None]:
    """The parts of a step's capture rows, in row order: ``None`` for the gradients (when asked), then each
    activation site of ``opts.act_sites`` (when asked). Each is one call of :func:`_capture_rows` (one pool task)."""
    grads: list[str | None] = [None] if "grad" in opts.kinds else []
    return grads + (list(opts.act_sites) if "act" in opts.kinds else [])


def _capture_rows(
    out: _Rows,
    run: _RunView,
    step: int,
    site: str | None,
    prev: int | None,
    final: int | None,
    opts: AnalysisOptions,
    pool: Executor | None = None,
) -> None:
    """Rows of one part of the step's captures (:func:`_capture_parts`): the gradients (``site`` None) or one
    activation site (``kind:pattern``; a site the run did not capture gives none). Same-shaped matrices as one batch
    (one batched ``svdvals``, sort, CKA per shape), rows added in the order of the matrices."""
    if site is None:
        _grad_rows(out, run, step, opts, pool)
    else:
        _act_site_rows(out, run, step, site, prev, final, opts, pool)


def _act_site_rows(
    out: _Rows,
    run: _RunView,
    step: int,
    site: str,
    prev: int | None,
    final: int | None,
    opts: AnalysisOptions,
    pool: Executor | None,
) -> None:
    """Rows of one activation site (:func:`_capture_rows`): spectra, anisotropy, CKA (and SVCCA/PWCCA) against the
    previous and the final capture."""
    from dynamics import anisotropy
    from dynamics.activations import activation_spectrum
    from dynamics.analyze_rows import similarity_rows

    dev = opts.device  # resolved (analyze_unit): None, "cpu" or "cuda"
    kind, _, pattern = site.partition(":")
    try:
        acts = run.activations(kind, step, pattern)
    except DynamicsError:
        return  # site not captured in this run
    acts = {name: x.reshape(-1, x.shape[-1]) for name, x in acts.items()}
    others = {  # the same site at the previous / final capture: one read each (a damaged file: no such rows)
        metric: run.activations(kind, other, pattern, errors="skip")
        for metric, other in (("cka_prev", prev), ("cka_final", final))
        if other is not None
    }
    rows: dict[str, tuple[Spectrum, dict[str, Any], dict[str, float]]] = {}
    for group in _shape_groups(acts):
        with _threads_for(acts[group[0]].size, pool):
            x = np.stack([acts[n] for n in group], dtype=np.float64)  # (B, tokens, features), one float64 copy
            xd = x if dev is None else _on_device(x, dev)  # float64 already; SVCCA/PWCCA below stay on numpy
            each = _each(activation_spectrum(xd, center=True))
            aniso = np.asarray(anisotropy(xd)).reshape(-1)
            extras: list[dict[str, float]] = [{"anisotropy": float(a)} for a in aniso]
            compared = []  # (metric, the layers it has, their activations there)
            for metric, ys in others.items():
                have = [j for j, name in enumerate(group) if ys.get(name) is not None]
                if have:
                    y = np.stack([ys[group[j]].reshape(-1, ys[group[j]].shape[-1]) for j in have], dtype=np.float64)
                    compared.append((metric, have, y))
            ckas = _cka_rows_of(x, compared, dev)
            for (metric, have, y), cka in zip(compared, ckas):
                for c, j in zip(cka, have):
                    extras[j][metric] = float(c)
                    if opts.cca:  # SVCCA/PWCCA (view 1: this step) where tokens >> features
                        extras[j].update(
                            similarity_rows(
                                x[j],
                                y[have.index(j)],
                                min_tokens_per_feature=opts.cca_min_tokens_per_feature,
                                suffix=metric[3:],
                            )
                        )
            for j, name in enumerate(group):
                rows[name] = (*each[j], extras[j])
    for name in acts:
        if name in rows:
            label = name if kind == "act" else f"{name}.in"
            out.add_spectrum(label, "act", rows[name][0], metrics=rows[name][1])
            out.add(label, "act", rows[name][2])


def _cka_rows_of(x: np.ndarray, compared: list[tuple[str, list[int], np.ndarray]], dev: str | None) -> list[np.ndarray]:
    """Linear CKA (float64, one per compared layer) of the float64 activations ``x`` (B, tokens, features) against
    each ``(metric, layers, y)`` of ``compared``: against every one at once, with ``x`` centred once
    (:func:`dynamics.activations.linear_cka_against`), where each has every layer; else one call each."""
    from dynamics import linear_cka
    from dynamics.activations import linear_cka_against

    on = (lambda a: a) if dev is None else (lambda a: _on_device(a, dev))
    if all(len(have) == len(x) for _, have, _ in compared):
        return [np.asarray(c).reshape(-1) for c in linear_cka_against(on(x), [on(y) for _, _, y in compared])]
    return [
        np.asarray(linear_cka(on(x if len(have) == len(x) else x[have]), on(y))).reshape(-1) for _, have, y in compared
    ]


def _grad_rows(out: _Rows, run: _RunView, step: int, opts: AnalysisOptions, pool: Executor | None) -> None:
    """Rows of the step's captured gradients (:func:`_capture_rows` with no site)."""
    from dynamics import spectrum
    from dynamics.analyze_rows import spectrum_extra

    dev = opts.device  # resolved (analyze_unit): None, "cpu" or "cuda"
    grads = run.get("grad", step)
    found: dict[str, tuple[Spectrum, dict[str, Any], dict[str, float], dict[str, float] | None]] = {}
    for group in _shape_groups(grads):
        with _threads_for(grads[group[0]].size, pool):
            stack = _stack(grads, group)
            each = _each(_device_spectrum(spectrum, stack, device=dev))
            entries = _entry_rows(stack, dev, float64=False) if opts.sparsity else None
            for i, name in enumerate(group):
                one, metrics = each[i]
                found[name] = (one, metrics, spectrum_extra(one, opts), None if entries is None else entries[i])
    for name in grads:
        if name in found:
            spec_i, metrics_i, extra_i, entries_i = found[name]
            out.add_spectrum(name, "grad", spec_i, metrics=metrics_i)
            out.add(name, "grad", extra_i)
            if entries_i is not None:
                out.add(name, "grad", entries_i)


def analyze_unit(run_path: str, step: int, opts: AnalysisOptions) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows and spectra of one run at one checkpoint (see the module docstring); on ``opts.device`` (:func:`resolve_device`)."""
    from dataclasses import replace

    from dynamics.io import open_run

    opts = replace(opts, device=resolve_device(opts.device))  # "auto" → "cpu"/"cuda"; "cuda" without one → error
    run = _RunView(open_run(run_path, include_interrupts=opts.include_interrupts))
    steps = run.steps
    i = steps.index(step)
    entry = run.entry(step)
    out = _Rows(run.label, run.method, step, entry.get("tokens_seen"), opts.keep_spectra)
    run.verify(step, capture=step in run.capture_steps)  # the unit's own files: a damaged one fails the unit
    run.require_finite(step)  # a diverged checkpoint: skipped and named (NonFiniteCheckpointError)
    # files it only compares against: a damaged one loses those rows (with a warning), not the unit
    prev = steps[i - 1] if i > 0 and run.intact(steps[i - 1]) else None
    first = steps[0] if run.intact(steps[0]) else step
    merges = []
    for s in run.merge_chain(step):
        if not run.intact(s):
            break
        merges.append(s)
    captures = step in run.capture_steps and bool({"grad", "act"} & set(opts.kinds))
    cap_prev = cap_final = None
    if captures:
        cap = run.capture_steps
        j = cap.index(step)
        cap_prev, cap_final = (
            s if s is None or run.intact(s, capture=True) else None
            for s in (cap[j - 1] if j > 0 else None, cap[-1] if cap[-1] != step else None)
        )
    parts = _capture_parts(opts) if captures else []
    cap_outs = [_Rows(run.label, run.method, step, entry.get("tokens_seen"), opts.keep_spectra) for _ in parts]
    with reuse_freed_memory(), _unit_pool(unit_threads(opts.device)) as pool:  # the unit's allocator and cores
        if pool is None:
            _weight_rows(out, run, step, prev, first, merges, opts)
            for site, cap_out in zip(parts, cap_outs):
                _capture_rows(cap_out, run, step, site, cap_prev, cap_final, opts)
        else:  # the capture parts: a task each, started first, beside the weight components (the other tasks)
            cap_tasks = [
                pool.submit(_capture_rows, cap_out, run, step, site, cap_prev, cap_final, opts, pool)
                for site, cap_out in zip(parts, cap_outs)
            ]
            _weight_rows(out, run, step, prev, first, merges, opts, pool)
            for task in cap_tasks:
                task.result()
    for cap_out in cap_outs:  # the capture rows after the weight rows, as one part after another gives them
        out.rows += cap_out.rows
        out.spectra += cap_out.spectra
    return out.rows, out.spectra


class _RunView:
    """The few facts about a run the analysis needs, on top of :class:`dynamics.io.Run`."""

    def __init__(self, run: Run) -> None:
        self._run = run
        self.path = run.path
        self.config = run.config
        self.label = Path(run.path).name
        self.method = run.method
        self.steps = run.steps
        self.capture_steps = run.capture_steps
        self.get, self.weights, self.lora_factors = run.get, run.weights, run.lora_factors
        self.weight_shapes = run.weight_shapes
        self._entries = {c["step"]: c for c in run.manifest["checkpoints"]}
        self.checkpoint_path = run.checkpoint_path

    @property
    def wrapped(self) -> Wrapped:
        """What the run wraps, from its stored config (:attr:`dynamics.io.Run.wrapped`; raises when a ReLoRA run's is missing)."""
        return self._run.wrapped

    @property
    def lora_scale(self) -> float | None:
        return self._run.lora_scale

    def activations(self, kind: str, step: int, pattern: str, *, errors: str = "raise") -> dict[str, np.ndarray]:
        """Read-only ``{name: (..., features)}`` of one activation site (:func:`dynamics.io.cached_activations`: each
        capture is decoded once per process, although units compare it with the next and the final capture)."""
        from dynamics.io import cached_activations

        return cached_activations(self._run, kind, step, pattern, errors=errors)

    def entry(self, step: int) -> dict[str, Any]:
        entry: dict[str, Any] = self._entries[step]
        return entry

    def norm64(self, step: int, name: str, w: np.ndarray) -> float:
        """:func:`frobenius64` of ``w``, the dense matrix ``name`` of the checkpoint at ``step``, remembered in this
        process by the sha256 the manifest gives its ``model.safetensors`` (the file its values are read from, verified
        before): a checkpoint is the previous, first or merge checkpoint of several units, and each difference's
        rank tolerance needs both norms. Without a digest it is computed each time."""
        digest = self.entry(step).get("sha256", {}).get(MODEL_FILE)
        if digest is None:
            return frobenius64(w)
        key = (digest, name, w.shape, w.dtype.str)
        norm = _NORMS.get(key)
        if norm is None:
            if len(_NORMS) >= 1 << 16:
                _NORMS.clear()
            norm = _NORMS[key] = frobenius64(w)
        return norm

    def verify(self, step: int, *, capture: bool = False) -> None:
        """Check the files analysis reads at ``step`` against the manifest's sha256; ``DynamicsIOError`` names a bad one.

        The weights (``model.safetensors``, ``adapters.safetensors``) and, with
        ``capture``, the capture file: a flipped byte anywhere (header, data,
        HDF5 attributes) is an error, never a silently wrong number. The check is
        :func:`trainer.run_format.checkpoint_file_problems`.
        """
        entry = self.entry(step)
        key = _verified_key(self.path, entry, capture)
        if key in _VERIFIED:
            return
        problems = checkpoint_file_problems(self.path, entry, files=(MODEL_FILE, ADAPTERS_FILE), capture=capture)
        if problems:
            path, problem = problems[0]
            raise DynamicsIOError(problem, path)
        if len(_VERIFIED) >= 4096:
            _VERIFIED.clear()
        _VERIFIED.add(key)
        if capture:  # the weights passed too: a later check without the capture file needs no hashing
            _VERIFIED.add(_verified_key(self.path, entry, False))

    def require_finite(self, step: int) -> None:
        """Raise :class:`NonFiniteCheckpointError` naming the checkpoint when its weights hold NaN or Inf."""
        path = self.checkpoint_path(step) / MODEL_FILE
        bad = _nonfinite_tensor(str(path), str(self.entry(step).get("sha256", {}).get(MODEL_FILE)))
        if bad is not None:
            raise NonFiniteCheckpointError(
                f"{path}: {bad} holds NaN or Inf (the run diverged); step {step} is skipped, and no other "
                "checkpoint is compared with it"
            )

    def intact(self, step: int, *, capture: bool = False) -> bool:
        """:meth:`verify` and :meth:`require_finite` as a bool, warning (naming the file) when a file is damaged."""
        try:
            self.verify(step, capture=capture)
            self.require_finite(step)
        except DynamicsError as e:
            warnings.warn(f"{self.label} step {step} is skipped as a comparison: {e}", stacklevel=2)
            return False
        return True

    def weights_names(self, step: int) -> list[str]:
        """Names of the dense matrices of a checkpoint (norm vectors and LoRA factors left out), from its header."""
        return [n for n in self._run.names("weight", step) if not n.endswith(("norm", ".lora_a", ".lora_b"))]

    def merge_chain(self, step: int) -> list[int]:
        """See :func:`merge_chain`."""
        return merge_chain(self._run, step)


#: :meth:`_RunView.norm64` of the matrices seen in this process, by (file digest, name, shape, dtype): a float each.
_NORMS: dict[tuple[str, str, tuple[int, ...], str], float] = {}

#: Checks :meth:`_RunView.verify` passed in this process, by the files' identity (:func:`_verified_key`): a unit
#: compares its checkpoint with up to four others, so an analysis would otherwise hash each file several times.
_VERIFIED: set[tuple[Any, ...]] = set()


def _verified_key(run_dir: Path, entry: Mapping[str, Any], capture: bool) -> tuple[Any, ...]:
    """What a passed :meth:`_RunView.verify` depends on: the entry's digests and paths, and each file's path, inode,
    size and modification time (a file rewritten or replaced since is hashed again)."""
    ckpt = Path(run_dir) / str(entry["path"])
    paths = [ckpt / MODEL_FILE, ckpt / ADAPTERS_FILE]
    record = entry.get("dynamics")
    if capture and record:
        paths.append(Path(run_dir) / str(record["path"]))
    ids: list[tuple[Any, ...]] = []
    for p in paths:
        try:
            st = p.stat()
            ids.append((str(p), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        except OSError:
            ids.append((str(p), None))
    digests = json.dumps([entry.get("sha256", {}), record if capture else None], sort_keys=True)
    return (str(Path(run_dir).resolve()), digests, capture, tuple(ids))


@functools.lru_cache(maxsize=64)
def _nonfinite_tensor(path: str, sha256: str) -> str | None:
    """The first tensor of a safetensors file holding NaN or Inf, else ``None`` (cached per file and content hash)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                try:  # one cheap sum; the entry-wise check only when that sum is not finite
                    check_finite(t, name=key, caller="analyze")
                except NonFiniteError:
                    return str(key)
    except Exception as e:  # noqa: BLE001 - SafetensorError and friends: a damaged file (verify() names it first)
        raise DynamicsIOError(f"{path} is truncated or corrupted: {type(e).__name__}: {e}", path) from None
    return None


def merge_chain(run: Run, step: int) -> list[int]:
    """For a ReLoRA run and a merge step: the checkpoints of the previous two merges (those that exist), latest first.

    Empty for a full-rank run or a step that is not a merge (``step % relora.merge_every``).
    A chain stops at the first merge without a checkpoint.
    """
    period = run.merge_every
    out: list[int] = []
    if period is None:
        return out
    s = step
    while len(out) < 2 and s > 0 and s % period == 0 and s - period in run.steps:
        s -= period
        out.append(s)
    return out


# ----------------------------------------------------------------------------------------------
# many runs, cached and parallel


def _unit_key(run: Run, step: int, opts: AnalysisOptions) -> str:
    """Hash of everything a unit reads: its checkpoint, the ones it differences against, its capture files."""
    h = hashlib.sha256(opts.key().encode())
    entries = {c["step"]: c for c in run.manifest["checkpoints"]}
    steps = run.steps
    i = steps.index(step)
    merges = merge_chain(run, step)  # ReLoRA: the two previous merge checkpoints (cycle updates and their overlap)
    for s in {step, steps[0], steps[i - 1] if i else step, steps[-1], *merges}:
        h.update(json.dumps(entries[s].get("sha256", {}), sort_keys=True).encode())
        h.update(json.dumps(entries[s].get("dynamics", {}), sort_keys=True).encode())
    h.update(json.dumps(run.config.get("relora") if run.method == "relora" else None, sort_keys=True).encode())
    return h.hexdigest()


def _cross_key(relora: Run, full: Run, step: int, opts: AnalysisOptions) -> str:
    """Hash of what a cross-run unit reads: both runs' checkpoints (and captures) at ``step`` and at their first step."""
    h = hashlib.sha256((opts.key() + "cross").encode())
    for run in (relora, full):
        entries = {c["step"]: c for c in run.manifest["checkpoints"]}
        for s in (step, run.steps[0]):
            h.update(
                json.dumps([entries[s].get("sha256", {}), entries[s].get("dynamics", {})], sort_keys=True).encode()
            )
    h.update(json.dumps(relora.config.get("relora"), sort_keys=True).encode())  # what it wraps, at which rank
    return h.hexdigest()


def _run_cross_cached(
    relora_path: str,
    full_path: str,
    relora_label: str,
    label: str,
    step: int,
    key: str,
    opts: AnalysisOptions,
    cache: str,
    *,
    write_lock: str | None = None,
) -> tuple[int, str]:
    """Worker: one cross-run unit (ReLoRA run vs full-rank run at ``step``), cached under ``<cache>/<label>/``.

    ``write_lock``: a shard's lock command (:func:`_shard_write_lock`); ``None`` when the caller holds the cache's lock.
    """
    from dynamics.cross_run import cross_run_rows
    from dynamics.io import open_run
    from trainer.atomic import atomic_write

    for path in (relora_path, full_path):  # a diverged checkpoint on either side: the unit is skipped and named
        _RunView(open_run(path)).require_finite(step)
    with reuse_freed_memory(), _unit_pool(unit_threads(opts.device)) as pool:  # overlaps beside the CKA/CCA rows
        rows = cross_run_rows(
            relora_path,
            full_path,
            step,
            act_sites=opts.act_sites,
            label=relora_label,
            updates="update_cumulative" in opts.kinds,
            cka="act" in opts.kinds,
            cca_min_tokens_per_feature=opts.cca_min_tokens_per_feature if opts.cca else None,
            pool=pool,
        )
    d = Path(cache) / label
    frame = pd.DataFrame(rows, columns=COLUMNS)
    with _shard_write_lock(Path(cache), write_lock):
        d.mkdir(parents=True, exist_ok=True)
        atomic_write(d / f"{step_dirname(step)}.parquet", partial(_write_parquet, frame))
        atomic_write(d / f"{step_dirname(step)}.key", partial(_write_text, key))
    return step, label


def _train_rows(run_path: Path, label: str, method: str) -> list[dict[str, Any]]:
    path = run_path / METRICS
    rows: list[dict[str, Any]] = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        for metric in TRAIN_METRICS:
            if rec.get(metric) is not None:
                rows.append(
                    {
                        "run": label,
                        "method": method,
                        "step": rec["step"],
                        "tokens": rec.get("tokens_seen"),
                        "layer": -1,
                        "component": "model",
                        "kind": "train",
                        "metric": metric,
                        "value": float(rec[metric]),
                    }
                )
    return rows


#: The list columns of a spectra table and their item dtypes (:data:`SPECTRA_COLUMNS`).
_LIST_COLUMNS: dict[str, type] = {"shape": np.int64, "values": np.float64}
#: At most this many values in one piece of a list column: an arrow list array has int32 offsets.
_LIST_PIECE_VALUES = 2**31 - 1


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    """``frame`` as parquet at ``path`` (no index, page checksums; a temporary file of ``atomic_write``).

    A spectra table's list columns (``shape``, ``values``: a list or numpy array per row) are built as one flat
    array and its offsets, not by pyarrow's conversion of pandas objects, whose first call in a process costs about
    0.4 s (4652 spectra of a ``tiny`` pair: 0.43 s the first time, 0.06 s after; this way 0.07 s each time). The
    file is the same (``list<int64>``, ``list<double>``).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    lists = [c for c in frame.columns if c in _LIST_COLUMNS and frame[c].dtype == object]
    table = pa.Table.from_pandas(frame.drop(columns=lists), preserve_index=False)
    for column in lists:
        items: list[np.ndarray] = [np.asarray(v, dtype=_LIST_COLUMNS[column]).reshape(-1) for v in frame[column]]
        table = table.append_column(column, _list_column(items, _LIST_COLUMNS[column]))
    pq.write_table(table.select(list(frame.columns)), path, **PARQUET_WRITE)


def _list_column(items: list[np.ndarray], dtype: type) -> Any:
    """An arrow list column (``pyarrow.ChunkedArray``) of the 1-D ``items``, one row each: pieces of consecutive
    rows holding at most :data:`_LIST_PIECE_VALUES` values, each one flat array and its int32 offsets."""
    import pyarrow as pa

    sizes = np.array([a.size for a in items], dtype=np.int64)
    pieces: list[Any] = []
    start = 0
    while start < len(items) or not pieces:
        ends = np.cumsum(sizes[start:])
        stop = start + max(1, int(np.searchsorted(ends, _LIST_PIECE_VALUES, side="right")))
        stop = min(stop, len(items))
        offsets = np.zeros(stop - start + 1, dtype=np.int32)
        np.cumsum(sizes[start:stop], out=offsets[1:])
        flat = np.concatenate(items[start:stop]) if stop > start else np.empty(0, dtype=dtype)
        pieces.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)))
        start = stop
    return pa.chunked_array(pieces)


def _write_text(text: str, path: Path) -> None:
    """``text`` at ``path`` (a temporary file of ``atomic_write``)."""
    path.write_text(text)


def _cache_dir(out: Path) -> Path:
    return out.with_name(out.name + ".cache")


#: The lock command of a ``--shard`` process (``dynamics analyze --shard K/N``): shards wait for each other's writes.
SHARD_COMMAND = "dynamics analyze --shard"
#: The lock command of a cluster run's units (``--executor dask``, :mod:`dynamics.cluster`): they wait like shards.
CLUSTER_COMMAND = "dynamics analyze --executor dask"
#: ``analyze_runs(executor=...)`` / ``--executor``: the local process pool, or a Dask cluster.
EXECUTORS: tuple[str, ...] = ("local", "dask")


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` → ``(K, N)`` (``--shard``); :class:`AnalysisError` unless both are integers with 1 ≤ K ≤ N."""
    k, sep, n = str(text).partition("/")
    try:
        shard = (int(k), int(n)) if sep else None
    except ValueError:
        shard = None
    if shard is None or not 1 <= shard[0] <= shard[1]:
        raise AnalysisError(f"--shard must be K/N with integers 1 <= K <= N (e.g. 2/8), got {text!r}")
    return shard


def check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    """``shard`` as ``(K, N)`` when 1 ≤ K ≤ N (integers), else :class:`AnalysisError`."""
    try:
        k, n = shard
    except (TypeError, ValueError):
        raise AnalysisError(f"shard must be (K, N) with 1 <= K <= N, got {shard!r}") from None
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (k, n)) or not 1 <= k <= n:
        raise AnalysisError(f"shard must be K/N with integers 1 <= K <= N (e.g. 2/8), got {k}/{n}")
    return k, n


def shard_units(units: Iterable[tuple[str, int]], shard: tuple[int, int]) -> list[tuple[str, int]]:
    """The units ``(label, step)`` that shard ``K`` of ``N`` analyses: sorted by ``(label, step)``, the ``i``-th
    (from 0) goes to shard ``i % N + 1``. Deterministic for a given set of runs and options (round robin over
    sorted units, so each run's checkpoints spread over all shards); every unit belongs to exactly one shard."""
    k, n = check_shard(shard)
    return [u for i, u in enumerate(sorted(units)) if i % n == k - 1]


@contextmanager
def _shard_write_lock(cache: Path, command: str | None, poll_s: float = 0.05) -> Iterator[None]:
    """A shard's writes into ``cache``: the cache's lock (:mod:`trainer.lock`) held only around them.

    ``command`` ``None``: nothing (the caller already holds the lock for the whole analysis). Otherwise the
    lock is taken, waiting (polling every ``poll_s`` s) while another shard holds it for its own short write:
    concurrent shards compute in parallel and write one at a time, so a reader holding the lock never sees
    a unit's files half replaced. A plain ``dynamics analyze`` holds the lock for its whole run; a shard
    meeting it stops with :class:`trainer.lock.DirectoryLockedError` naming it (exit status 2).
    """
    if command is None:
        yield
        return
    from trainer.lock import DirectoryLock, DirectoryLockedError, lock_holder

    lock = DirectoryLock(cache, command=command)
    while True:
        try:
            lock.acquire()
            break
        except DirectoryLockedError:
            holder = lock_holder(cache)  # None: the holder has not written its name yet, or just left
            if holder is not None and not str(holder.get("command", "")).startswith((SHARD_COMMAND, CLUSTER_COMMAND)):
                raise
            time.sleep(poll_s)
    try:
        yield
    finally:
        lock.release()


def _run_unit_cached(
    run_path: str, label: str, step: int, key: str, opts: AnalysisOptions, cache: str, *, write_lock: str | None = None
) -> tuple[int, str]:
    """Worker: compute one unit and store it atomically in the cache; returns (step, label).

    ``write_lock``: a shard's lock command (:func:`_shard_write_lock`); ``None`` when the caller holds the cache's lock.
    """
    import torch

    from trainer.atomic import atomic_write

    torch.set_num_threads(max(1, int(os.environ.get("DYNAMICS_WORKER_THREADS", "1"))))
    rows, spectra = analyze_unit(run_path, step, opts)
    d = Path(cache) / label
    frame = pd.DataFrame(rows, columns=COLUMNS)
    with _shard_write_lock(Path(cache), write_lock):
        d.mkdir(parents=True, exist_ok=True)
        atomic_write(
            d / f"{step_dirname(step)}.spectra.parquet",
            partial(_write_parquet, pd.DataFrame(spectra, columns=SPECTRA_COLUMNS)),
        )
        atomic_write(d / f"{step_dirname(step)}.parquet", partial(_write_parquet, frame))
        atomic_write(d / f"{step_dirname(step)}.key", partial(_write_text, key))
    return step, label


def analyze_runs(
    runs: Iterable[str | Path],
    out: str | Path,
    *,
    options: AnalysisOptions | None = None,
    workers: int = 1,
    keep_going: bool = False,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
    executor: str = "local",
    scheduler: str | None = None,
    scheduler_file: str | Path | None = None,
) -> tuple[pd.DataFrame, list[str]]:
    """Analyse every checkpoint of every run; write ``out`` (parquet, or csv by suffix) and ``<out>.spectra.parquet``.

    Returns the table and a list of error messages (units that failed; only
    non-empty with ``keep_going``, otherwise the first failure raises
    :class:`AnalysisError`; a checkpoint with non-finite weights is always
    skipped and listed, :class:`NonFiniteCheckpointError`). Units whose inputs are unchanged since the last
    call with the same ``out`` are read from ``<out>.cache/`` instead of recomputed.
    One analysis at a time writes a given ``out``: the cache directory's lock
    (:mod:`trainer.lock`) refuses a second one (:class:`trainer.lock.DirectoryLockedError`).

    ``shard=(K, N)`` (``--shard K/N``, for schedulers without a cluster engine): only the units of shard ``K``
    (:func:`shard_units`) are computed into ``<out>.cache/``; ``out`` is not written. The returned table holds
    those units' rows (no ``train``/``run`` rows), and ``table.attrs["shard"]`` counts them (``shard``, ``units``
    of all shards, ``assigned``, ``computed``, ``cached``, ``failed``). Shards of one ``out`` may run at the same
    time (on one host or several sharing the directory): each takes the cache's lock only around its own writes
    (:func:`_shard_write_lock`). A final call without ``shard`` assembles the table from the cache,
    recomputing only units no shard finished.

    ``executor="dask"`` (``--executor dask``, :mod:`dynamics.cluster`): the units run as tasks on a Dask cluster,
    at ``scheduler`` (``tcp://host:8786``) or the one ``scheduler_file`` names, else on a LocalCluster of
    ``workers`` processes. They write the same cache as local units (each taking the cache's lock only around its
    writes, like a shard's; paths are made absolute for the workers) and the table is assembled as here, so it
    equals a one-process analysis row for row. ``table.attrs["units"]`` counts the units (``units``, ``computed``,
    ``cached``, ``failed``) on every path.
    """
    from trainer.lock import DirectoryLock

    if executor not in EXECUTORS:
        raise AnalysisError(f"analyze: executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if executor == "dask":  # connects before any work: a missing dask or a wrong address is one line
        from dynamics.cluster import DaskUnits

        runs = [Path(r).absolute() for r in runs]  # workers elsewhere see the same shared paths, not our cwd
        with DaskUnits(scheduler=scheduler, scheduler_file=scheduler_file, workers=workers) as cluster:
            return _analyze_runs(
                runs,
                Path(out).absolute(),
                options=options,
                workers=workers,
                keep_going=keep_going,
                progress=progress,
                shard=shard,
                cluster=cluster,
            )
    if scheduler is not None or scheduler_file is not None:
        raise AnalysisError("analyze: --scheduler/--scheduler-file need --executor dask")
    with _large_threads_env(workers):
        if shard is not None:
            return _analyze_runs(
                runs, out, options=options, workers=workers, keep_going=keep_going, progress=progress, shard=shard
            )
        with DirectoryLock(_cache_dir(Path(out)), command="dynamics analyze"):
            return _analyze_runs(runs, out, options=options, workers=workers, keep_going=keep_going, progress=progress)


def default_large_threads(workers: int) -> int:
    """The large-matrix thread count :func:`analyze_runs` sets (unless the user set one): the cores this process may
    use divided among its ``workers`` local units, at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, workers))


@contextmanager
def _large_threads_env(workers: int) -> Iterator[None]:
    """Set :data:`LARGE_THREADS_ENV` for this process and the workers it starts, unless the user set it: the usable
    cores divided among the ``workers`` local units (at least 1), so a lone unit decomposes its large matrices on
    every core and parallel units do not oversubscribe them."""
    chosen = {} if os.environ.get(LARGE_THREADS_ENV) else {LARGE_THREADS_ENV: str(default_large_threads(workers))}
    with environ_set(chosen):
        yield


def _analyze_runs(
    runs: Iterable[str | Path],
    out: str | Path,
    *,
    options: AnalysisOptions | None,
    workers: int,
    keep_going: bool,
    progress: bool,
    shard: tuple[int, int] | None = None,
    cluster: DaskUnits | None = None,
) -> tuple[pd.DataFrame, list[str]]:
    """:func:`analyze_runs` under the cache directory's lock (a shard, or ``cluster``'s units: the lock only around
    their writes)."""
    from tqdm.auto import tqdm

    from dynamics.external import as_run_directory
    from dynamics.io import open_run
    from trainer.atomic import atomic_write

    opts = options or AnalysisOptions()
    if opts.device is not None:  # resolved once, before any unit: "cuda" without a CUDA device is one clear error
        from dataclasses import replace

        opts = replace(opts, device=resolve_device(opts.device))
    out = Path(out)
    if out.suffix not in (".parquet", ".csv"):
        raise AnalysisError(f"analyze: --out must end in .parquet or .csv, got {str(out)!r}")
    cache = _cache_dir(out)
    shard = None if shard is None else check_shard(shard)
    write_lock = None if shard is None else f"{SHARD_COMMAND} {shard[0]}/{shard[1]}"  # None: we hold the lock
    if cluster is not None and shard is None:
        write_lock = CLUSTER_COMMAND
    # checkpoints from elsewhere (safetensors / HF directories / weights_only torch files) become run directories
    import_errors, resolved = [], []
    with _shard_write_lock(cache, write_lock):  # a shard: refused here at once while a plain analyze runs
        for r in runs:
            try:
                resolved.append(as_run_directory(r, cache / "imported", progress=progress))
            except DynamicsError as e:
                if not keep_going:
                    raise
                warnings.warn(str(e), stacklevel=2)
                import_errors.append(str(e))
    runs = resolved
    labels = [r.resolve().name for r in runs]
    if len(set(labels)) != len(labels):
        raise AnalysisError(f"analyze: runs must have distinct directory names, got {labels}")

    from dynamics.analyze_rows import run_rows
    from dynamics.cross_run import pair_runs

    # (label, step) -> (worker, its arguments); a worker computes one unit into the cache
    units: dict[tuple[str, int], tuple[Callable[..., tuple[int, str]], tuple[Any, ...]]] = {}
    todo, done, train_rows, errors = [], [], [], import_errors
    opened = {}

    def schedule(label: str, step: int, key: str, fn: Callable[..., tuple[int, str]], args: tuple[Any, ...]) -> None:
        units[(label, step)] = (fn, args + (key, opts, str(cache)))
        key_file = cache / label / f"{step_dirname(step)}.key"
        if key_file.exists() and key_file.read_text() == key:
            done.append((label, step))
        else:
            todo.append((label, step))

    for path, label in zip(runs, labels):
        run = opened[label] = open_run(path, include_interrupts=opts.include_interrupts)
        train_rows += _train_rows(path, label, run.method) + run_rows(label, run.method, run.config)
        for step in run.steps:
            schedule(label, step, _unit_key(run, step, opts), _run_unit_cached, (str(path), label, step))
    if opts.cross_run and {"update_cumulative", "act"} & set(opts.kinds):  # ReLoRA vs full-rank (dynamics/cross_run.py)
        paths = dict(zip(labels, runs))
        for rl, fl in pair_runs([(lb, r.method, r.config) for lb, r in opened.items()]):
            label = f"{rl}~{fl}"
            interrupts = set(opened[rl].interrupt_steps) | set(opened[fl].interrupt_steps)  # off the grid: not paired
            for step in sorted((set(opened[rl].steps) & set(opened[fl].steps)) - interrupts):
                schedule(
                    label,
                    step,
                    _cross_key(opened[rl], opened[fl], step, opts),
                    _run_cross_cached,
                    (str(paths[rl]), str(paths[fl]), rl, label, step),
                )

    n_units = len(units)
    if shard is not None:  # this shard's units only; its workers take the cache's lock around their writes
        mine = set(shard_units(units, shard))
        todo, done = [u for u in todo if u in mine], [u for u in done if u in mine]
    if write_lock is not None:  # a shard's or a cluster's units; a cached one too: recomputed (under the lock) when
        for u, (fn, args) in units.items():  # its cache file is unreadable
            units[u] = (partial(fn, write_lock=write_lock), args)
    n_cached = len(done)

    bar = tqdm(total=len(todo) + len(done), initial=len(done), disable=not progress, unit="ckpt", desc="analyze")

    def failed(label: str, step: int, e: BaseException) -> None:
        msg = f"{label} step {step}: {type(e).__name__}: {e}"
        if not keep_going and not isinstance(e, NonFiniteCheckpointError):  # a diverged checkpoint: named, skipped
            bar.close()
            raise AnalysisError(msg + " (use --keep-going to analyse the rest)") from e
        warnings.warn(msg, stacklevel=3)
        errors.append(msg)

    if cluster is not None:  # Dask tasks (dynamics.cluster); they report back like the local workers below
        for (label, step), error in cluster.run({u: units[u] for u in todo}, INPUT_ERRORS):
            if error is None:
                done.append((label, step))
            else:
                failed(label, step, error)
            bar.update(1)
    elif workers <= 1:
        with reuse_freed_memory():  # held across the units: each reuses the memory the last one freed
            for label, step in todo:
                fn, args = units[(label, step)]
                try:
                    fn(*args)
                    done.append((label, step))
                except INPUT_ERRORS as e:  # a bad or empty input; anything else is a bug and surfaces
                    failed(label, step, e)
                bar.update(1)
    else:
        import multiprocessing as mp

        from trainer.runtime import child_threads

        with (
            child_threads(max(1, int(os.environ.get("DYNAMICS_WORKER_THREADS", "1")))),
            child_tunables(),
            ProcessPoolExecutor(
                max_workers=workers, mp_context=mp.get_context("spawn"), initializer=hold_for_process
            ) as pool,
        ):
            futures = {pool.submit(units[u][0], *units[u][1]): u for u in todo}
            for fut in as_completed(futures):
                label, step = futures[fut]
                try:
                    fut.result()
                    done.append((label, step))
                except INPUT_ERRORS as e:  # a worker's exception arrives re-raised here; others surface
                    failed(label, step, e)
                bar.update(1)
    bar.close()

    n_computed = len(done) - n_cached
    frames = [pd.DataFrame(train_rows if shard is None else [], columns=COLUMNS)]
    spectra = []
    for label, step in sorted(done):
        try:
            frame, spec = _read_cached(cache, label, step)
        except _TABLE_READ_ERRORS as e:  # a damaged cache file: recompute that unit (its inputs are verified again)
            warnings.warn(
                f"{cache / label} step {step}: cached result unreadable ({type(e).__name__}: {e}); recomputing",
                stacklevel=2,
            )
            try:
                fn, args = units[(label, step)]
                fn(*args)
                frame, spec = _read_cached(cache, label, step)
            except INPUT_ERRORS as e2:
                failed(label, step, e2)
                continue
        frames.append(frame)
        if spec is not None:
            spectra.append(spec)
    table = pd.concat([f for f in frames if len(f)], ignore_index=True) if any(len(f) for f in frames) else frames[0]
    table = table.astype({"step": "int64", "layer": "int64", "value": "float64"})
    counts = {"units": n_units, "computed": n_computed, "cached": n_cached, "failed": len(todo) - n_computed}
    if shard is not None:  # no table written: a final analyze without a shard assembles it from the cache
        table.attrs["shard"] = {"shard": f"{shard[0]}/{shard[1]}", "assigned": n_cached + len(todo), **counts}
        return table, errors
    if out.suffix == ".csv":
        atomic_write(out, lambda p: table.to_csv(p, index=False))
    else:
        atomic_write(out, partial(_write_parquet, table))
    spectra_path = out.with_name(out.stem + ".spectra.parquet")
    if spectra:
        all_spectra = pd.concat(spectra, ignore_index=True)
        atomic_write(spectra_path, partial(_write_parquet, all_spectra))
    table.attrs["units"] = counts  # after writing: counts of this call, not part of the table's file
    return table, errors


def _table_read_errors() -> tuple[type[Exception], ...]:
    """What reading a damaged or foreign parquet/csv file raises (pyarrow's errors are ``OSError``/``ValueError`` or theirs)."""
    import pyarrow as pa

    return (OSError, ValueError, pa.ArrowException)


_TABLE_READ_ERRORS = _table_read_errors()


def _renamed_kinds(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with old kind names (:data:`KIND_ALIASES`) renamed: tables written before the rename read as new ones."""
    if "kind" in table.columns and table["kind"].isin(list(KIND_ALIASES)).any():
        table = table.assign(kind=table["kind"].replace(KIND_ALIASES))
    return table


def _read_cached(cache: Path, label: str, step: int) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """One unit's cached rows and spectra, page checksums verified."""
    frame = pd.read_parquet(cache / label / f"{step_dirname(step)}.parquet", **PARQUET_READ)
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"lacks columns {missing}")
    sp = cache / label / f"{step_dirname(step)}.spectra.parquet"
    spectra = _renamed_kinds(pd.read_parquet(sp, **PARQUET_READ)) if sp.exists() else None
    return _renamed_kinds(frame), spectra


def read_results(path: str | Path) -> pd.DataFrame:
    """Read a results table written by :func:`analyze_runs` (parquet or csv), checking its columns.

    Rows of a table written before a kind was renamed come back under the new name (``update_restart`` →
    ``update_merge``).
    """
    path = Path(path)
    if not path.is_file():
        raise AnalysisError(f"{path} not found; create it with `dynamics analyze RUN_DIR --out {path}`")
    try:
        table = pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path, **PARQUET_READ)
    except _TABLE_READ_ERRORS as e:
        raise AnalysisError(f"{path} is not a readable results table: {e}") from None
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise AnalysisError(f"{path} lacks columns {missing}; expected the output of `dynamics analyze`")
    return _renamed_kinds(table)
