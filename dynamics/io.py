"""Lazy reading of a run directory: checkpoints' weights and the dense capture files.

>>> run = open_run("runs/micro-full")               # reads manifest.json only
>>> run.steps, run.capture_steps, run.layers         # doctest: +SKIP
>>> acts = run.get("act", step=100, names="layers.*.resid_post")   # {name: (tokens, D) array}
>>> grads = run.get("grad", step=100, names="layers.3.attn.*", as_tensor=True)
>>> w = run.weights(100, names="layers.*.mlp.down")  # effective weights, from model.safetensors

Nothing but JSON is read when a run is opened; every call reads only the
datasets (or safetensors entries) it returns. Kinds and names follow
:mod:`trainer.names`: kind ``act`` (module output), ``act_in`` (module input;
``act_in`` of ``layers.i.mlp.down`` is the SwiGLU hidden state), ``grad``
(``dL/dW``, out×in; for ReLoRA the gradient with respect to the effective
weight) and ``weight`` (the effective weights of the checkpoint; LoRA factors
``<name>.lora_a``/``<name>.lora_b``). The file schema is documented in
``data/README.md`` ("Dynamics capture files").

Which matrices a ReLoRA run wraps, and at which rank, come from its stored
config (:attr:`Run.wrapped`, via :func:`trainer.run_format.wrapped_matrices`),
never from a default. File names, schema versions and capture kinds are those
of :mod:`trainer.run_format`, which the trainer writes with.

A damaged file raises :class:`DynamicsIOError` (a :class:`DynamicsError` and
an ``OSError``) naming it; with
``errors="skip"`` (or :meth:`Run.iter`) the step is skipped with a
:class:`~dynamics.validation.DynamicsWarning`, so one bad file never stops a
whole analysis. A file written by a newer toolkit is refused with
:class:`SchemaVersionError`.
"""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dynamics._lru import BoundedLRU
from dynamics.validation import DynamicsError, DynamicsWarning
from trainer.names import select
from trainer.run_format import (
    ADAPTERS_FILE,
    CAPTURE_KINDS,
    CAPTURE_SCHEMA_VERSION,
    DYNAMICS_DIR,
    MANIFEST,
    MODEL_FILE,
    RUN_SCHEMA_VERSION,
    Wrapped,
    capture_relpath,
    file_problem,
    parse_step_dirname,
    stored_setting,
    wrapped_matrices,
)

if TYPE_CHECKING:
    import h5py

__all__ = [
    "DynamicsIOError",
    "SchemaVersionError",
    "Run",
    "open_run",
    "CAPTURE_KINDS",
    "SCHEMA_VERSION",
    "RUN_SCHEMA_VERSION",
]

#: Newest capture-file schema this reader understands (``schema_version`` root attribute); this module's name for
#: :data:`trainer.run_format.CAPTURE_SCHEMA_VERSION`.
SCHEMA_VERSION = CAPTURE_SCHEMA_VERSION
_FACTOR_SUFFIXES = (".lora_a", ".lora_b")


class DynamicsIOError(DynamicsError, OSError):
    """A run directory or one of its files is missing, truncated, corrupted or unreadable; ``path`` names it.

    Both a :class:`~dynamics.validation.DynamicsError` (the package's root) and an
    ``OSError`` (what a damaged file is to any caller); ``str(e)`` is the message alone.
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)


class SchemaVersionError(DynamicsIOError):
    """A file written by a newer toolkit, with a schema version this reader does not know."""


def open_run(path: str | Path, *, include_interrupts: bool = False) -> Run:
    """Open a run directory lazily (reads ``manifest.json`` only).

    ``include_interrupts``: also list the checkpoints saved when training was
    stopped by a signal (``"interrupt": true`` in the manifest); by default they
    are left out of :attr:`Run.steps` (see :attr:`Run.interrupt_steps`).
    Raises :class:`DynamicsIOError` when ``path`` is not a run directory or the
    manifest is unreadable, :class:`SchemaVersionError` when it is newer than this reader.
    """
    return Run(path, include_interrupts=include_interrupts)


class Run:
    """A run directory, opened lazily. See the module docstring for kinds and names.

    Attributes
    ----------
    path : Path
    manifest : dict
        ``manifest.json`` as written by the trainer.
    config : dict
        The run's resolved ``TrainConfig`` (``trainer.config.config_from_dict`` rebuilds it).
    probe : dict or None
        The probe set's record (validation windows, gradient windows, token-sample hash, ``sha256``);
        two runs whose ``probe["sha256"]`` agree captured activations and gradients of the same inputs.
    interrupt_steps : list of int
        Checkpoints saved because training was interrupted (SIGINT/SIGTERM) at a step that was not due one.
        They are off the run's checkpoint grid, so they are not in :attr:`steps` (nor their captures in
        :attr:`capture_steps`) unless the run is opened with ``include_interrupts=True``: then update
        matrices and ``cka_prev`` would be taken against them.
    """

    def __init__(self, path: str | Path, *, include_interrupts: bool = False) -> None:
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise DynamicsIOError(f"{mpath} not found: {str(self.path)!r} is not a run directory", mpath)
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, ValueError) as e:
            raise DynamicsIOError(f"{mpath} is unreadable or corrupted: {e}", mpath) from None
        version = manifest.get("schema_version") if isinstance(manifest, dict) else None
        if not isinstance(version, int):
            raise DynamicsIOError(f"{mpath} has no schema_version; not a run manifest", mpath)
        if version > RUN_SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{mpath} has schema_version {version}, newer than this reader understands ({RUN_SCHEMA_VERSION}); "
                "upgrade the relora-dynamics package",
                mpath,
            )
        from trainer.checkpoint import check_manifest

        problem = check_manifest(manifest, self.path)  # checksum, and paths that stay inside the run directory
        if problem:
            raise DynamicsIOError(f"{mpath} {problem}", mpath)
        self.manifest: dict[str, Any] = manifest
        self.config: dict[str, Any] = manifest.get("config", {})
        self.probe: dict[str, Any] | None = manifest.get("probe")
        entries = {int(c["step"]): c for c in manifest.get("checkpoints", [])}
        self.interrupt_steps: list[int] = sorted(s for s, c in entries.items() if c.get("interrupt"))
        self.include_interrupts = include_interrupts
        self._entries = {s: c for s, c in entries.items() if include_interrupts or not c.get("interrupt")}

    def __repr__(self) -> str:
        return (
            f"Run({str(self.path)!r}, method={self.method!r}, steps={len(self.steps)}, "
            f"capture_steps={len(self.capture_steps)})"
        )

    # -- what the run holds (no file is opened) ---------------------------------------------------

    @property
    def method(self) -> str:
        """``full`` or ``relora`` (the stored config's ``method``)."""
        return str(self.config.get("method", "full"))

    @property
    def steps(self) -> list[int]:
        """Steps of the complete checkpoints (weights available), ascending."""
        return sorted(self._entries)

    @property
    def capture_steps(self) -> list[int]:
        """Steps with a capture file: listed in the manifest, or present on disk for a listed checkpoint.

        (A file is renamed into place only when complete; the manifest lists it, with its
        sha256, right after. A crash in between leaves a complete but unlisted file.)
        """
        steps = {s for s, e in self._entries.items() if "dynamics" in e}
        d = self.path / DYNAMICS_DIR
        if d.is_dir():
            for f in d.glob("step_*.h5"):
                s = parse_step_dirname(f.stem)
                if s is not None and s in self._entries:
                    steps.add(s)
        return sorted(steps)

    @property
    def n_layers(self) -> int:
        return int(self.config.get("model", {}).get("n_layers", 0))

    @property
    def layers(self) -> list[int]:
        """Layer indices ``0 .. n_layers-1`` (the ``i`` of ``layers.{i}.*``)."""
        return list(range(self.n_layers))

    @property
    def wrapped(self) -> Wrapped:
        """Which projections the run wraps with adapters and at which rank, from its stored config.

        Empty (``targets == ()``, ``rank is None``) for a full-rank run. A ReLoRA run
        whose config does not state ``relora.targets`` and ``relora.rank`` raises
        :class:`DynamicsIOError` naming the manifest: a reader never assumes a default.
        """
        try:
            return wrapped_matrices(self.config)
        except ValueError as e:
            mpath = self.path / MANIFEST
            raise DynamicsIOError(f"{mpath}: {e}", mpath) from None

    @property
    def merge_every(self) -> int | None:
        """The ReLoRA merge period in steps (``relora.merge_every``), ``None`` for a full-rank run.

        Manifests written before the key was renamed store it as ``relora.reset_every``.
        A trained ReLoRA run whose config states neither raises :class:`DynamicsIOError` naming
        the manifest; checkpoints imported from elsewhere (:mod:`dynamics.external`) without it
        have no known merges (``None``).
        """
        if self.method != "relora":
            return None
        period = stored_setting(self.config, "relora.merge_every")
        if period is None and self.config.get("imported"):
            return None
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            mpath = self.path / MANIFEST
            raise DynamicsIOError(
                f"{mpath}: the run's config has no valid relora.merge_every (got {period!r}); "
                "cannot tell when the run merged",
                mpath,
            )
        return period

    @property
    def lora_scale(self) -> float | None:
        """``s = relora.alpha / relora.rank`` for ReLoRA runs, else ``None``.

        Raises :class:`DynamicsIOError` naming the manifest for a ReLoRA run whose config lacks them.
        """
        wrapped = self.wrapped
        if wrapped.rank is None:
            return None
        if wrapped.scale is None:
            mpath = self.path / MANIFEST
            raise DynamicsIOError(
                f"{mpath}: the run's config has no valid relora.alpha; cannot scale its adapters", mpath
            )
        return wrapped.scale

    def capture_path(self, step: int) -> Path:
        """The capture file of ``step`` (``dynamics/step_XXXXXX.h5``); raises when ``step`` has none."""
        step = self._check_step(step, self.capture_steps, "capture")
        entry = self._entries.get(step, {}).get("dynamics")
        rel = str(entry["path"]) if entry else capture_relpath(step)
        return self.path / rel

    def checkpoint_path(self, step: int) -> Path:
        """The checkpoint directory of ``step`` (``checkpoints/step_XXXXXX``); raises when ``step`` has none."""
        step = self._check_step(step, self.steps, "checkpoint")
        return self.path / str(self._entries[step]["path"])

    def _check_step(self, step: Any, available: list[int], what: str) -> int:
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise DynamicsError(f"Run: `step` must be an int, got {step!r}")
        checked = int(step)
        if checked not in available:
            shown: list[int | str] = [*available] if len(available) <= 12 else [*available[:6], "...", *available[-3:]]
            hint = (
                f" (step {checked} is an interrupt checkpoint: open_run(path, include_interrupts=True) lists it)"
                if checked in self.interrupt_steps and not self.include_interrupts
                else ""
            )
            raise DynamicsError(f"{self.path}: no {what} at step {checked}; available: {shown}{hint}")
        return checked

    # -- capture files -------------------------------------------------------------------------

    def _open_h5(self, step: int) -> h5py.File:
        """Open a capture file read-only, checking its schema version; errors name the file."""
        import h5py

        path = self.capture_path(step)
        if not path.is_file():
            raise DynamicsIOError(f"{path} is missing (listed in {self.path / MANIFEST})", path)
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise DynamicsIOError(f"{path} is truncated or corrupted and cannot be opened as HDF5: {e}", path) from None
        try:
            version = f.attrs.get("schema_version")
        except Exception as e:  # noqa: BLE001 - h5py raises OSError/KeyError/RuntimeError/... on damaged metadata
            f.close()
            raise DynamicsIOError(f"{path} is corrupted (cannot read its attributes): {e}", path) from None
        if version is None:
            f.close()
            raise DynamicsIOError(f"{path} has no schema_version attribute; not a capture file", path)
        if int(version) > SCHEMA_VERSION:
            f.close()
            raise SchemaVersionError(
                f"{path} has capture schema_version {int(version)}, newer than this reader understands "
                f"({SCHEMA_VERSION}); upgrade the relora-dynamics package to read it",
                path,
            )
        return f

    def names(self, kind: str, step: int | None = None) -> list[str]:
        """Names stored under ``kind`` at ``step`` (default: the latest capture step), in model order.

        For ``kind="weight"``: the checkpoint's dense names plus the LoRA factor names.
        Reads only file metadata.
        """
        kind = _check_kind(kind)
        if kind == "weight":
            step = self.steps[-1] if step is None else step
            dense = [k[: -len(".weight")] for k in self._safetensors_keys(self.checkpoint_path(step) / MODEL_FILE)]
            return sorted(dense + self._factor_names(step), key=_model_order)
        caps = self.capture_steps
        if step is None:
            if not caps:
                raise DynamicsError(f"{self.path}: the run has no capture files (capture.enabled was false?)")
            step = caps[-1]
        with self._open_h5(step) as f:
            path = f.filename
            try:
                return list(f[kind].keys()) if kind in f else []
            except Exception as e:  # noqa: BLE001 - any h5py error here means a damaged file, named in the error
                raise DynamicsIOError(f"{path} is corrupted (cannot list group {kind!r}): {e}", path) from None

    def attrs(self, step: int) -> dict[str, Any]:
        """Root attributes of the capture file of ``step`` (step, tokens_seen, lr, loss, val_loss, probe_loss ...).

        ``config`` and ``code_version`` are decoded from JSON; NaN stands for "not available".
        """
        with self._open_h5(step) as f:
            try:
                out = {k: _plain(v) for k, v in f.attrs.items()}
            except Exception as e:  # noqa: BLE001 - any h5py error here means a damaged file, named in the error
                raise DynamicsIOError(f"{f.filename} is corrupted (cannot read attributes): {e}", f.filename) from None
        for key in ("config", "code_version"):
            if isinstance(out.get(key), str):
                out[key] = json.loads(out[key])
        return out

    def token_index(self, step: int | None = None) -> np.ndarray:
        """Flat positions ``n·T + t`` (into the probe's ``(N, T)`` sequences) of the stored activation rows."""
        return self._read_probe("token_index", step)

    def probe_inputs(self, step: int | None = None) -> dict[str, np.ndarray]:
        """The probe set's token ids: ``input_ids`` ``(N, T)`` (activations), ``grad_input_ids`` ``(M, T)``."""
        return {k: self._read_probe(k, step) for k in ("input_ids", "grad_input_ids")}

    def _read_probe(self, key: str, step: int | None) -> np.ndarray:
        if step is None:
            if not self.capture_steps:
                raise DynamicsError(f"{self.path}: the run has no capture files (capture.enabled was false?)")
            step = self.capture_steps[-1]
        with self._open_h5(step) as f:
            return _read_dataset(f, f"probe/{key}")

    def get(
        self,
        kind: str,
        step: int,
        names: str | Iterable[str] | None = None,
        *,
        as_tensor: bool = False,
        dtype: Any = None,
        errors: str = "raise",
    ) -> dict[str, Any]:
        """``{name: array}`` of one kind at one step, reading only the selected datasets.

        Parameters
        ----------
        kind
            ``act`` ``(tokens, features)``, ``act_in`` ``(tokens, features)``, ``grad`` (out×in),
            or ``weight`` (dense effective weights from the checkpoint, plus LoRA factors).
        step
            A step of :attr:`capture_steps` (of :attr:`steps` for ``weight``).
        names
            Glob or globs over canonical names (``layers.*.attn.q``; ``**`` crosses dots); all when ``None``.
            A selection that matches nothing raises :class:`~dynamics.validation.DynamicsError`.
        as_tensor
            Return ``torch.Tensor`` instead of ``numpy.ndarray``.
        dtype
            Cast to this dtype (e.g. ``numpy.float32``); stored dtype when ``None`` (activations are float16 by default).
        errors
            ``"raise"``: a damaged or missing file raises :class:`DynamicsIOError`; ``"skip"``: warn
            (:class:`~dynamics.validation.DynamicsWarning`, naming the file) and return ``{}``.
        """
        kind = _check_kind(kind)
        if errors not in ("raise", "skip"):
            raise DynamicsError(f"Run.get(): `errors` must be 'raise' or 'skip', got {errors!r}")
        try:
            if kind == "weight":
                out = self.weights(step, names)
            else:
                out = self._get_h5(kind, step, names)
        except DynamicsIOError as e:
            if errors == "raise":
                raise
            warnings.warn(f"skipping step {step}: {e}", DynamicsWarning, stacklevel=2)
            return {}
        return _convert(out, as_tensor=as_tensor, dtype=dtype)

    def _get_h5(self, kind: str, step: int, names: Any) -> dict[str, np.ndarray]:
        with self._open_h5(step) as f:
            path = f.filename
            try:
                available = list(f[kind].keys()) if kind in f else []
            except Exception as e:  # noqa: BLE001 - any h5py error here means a damaged file, named in the error
                raise DynamicsIOError(f"{path} is corrupted (cannot list group {kind!r}): {e}", path) from None
            chosen = _select(available, names, kind, path)
            return {n: _read_dataset(f, f"{kind}/{n}") for n in chosen}

    def iter(
        self,
        kind: str,
        names: str | Iterable[str] | None = None,
        *,
        steps: Iterable[int] | None = None,
        as_tensor: bool = False,
        dtype: Any = None,
        errors: str = "skip",
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """Yield ``(step, {name: array})`` over ``steps`` (default: every capture step, or every checkpoint for ``weight``).

        With ``errors="skip"`` (the default) a damaged file is reported as a
        :class:`~dynamics.validation.DynamicsWarning` naming it and its step is left out.
        """
        kind = _check_kind(kind)
        if errors not in ("raise", "skip"):
            raise DynamicsError(f"Run.iter(): `errors` must be 'raise' or 'skip', got {errors!r}")
        if steps is None:
            steps = self.steps if kind == "weight" else self.capture_steps
        for step in steps:
            try:
                out = self.get(kind, step, names, as_tensor=as_tensor, dtype=dtype)
            except DynamicsIOError as e:
                if errors == "raise":
                    raise
                warnings.warn(f"skipping step {step}: {e}", DynamicsWarning, stacklevel=2)
                continue
            yield step, out

    def check(self, steps: Iterable[int] | None = None) -> dict[int, str]:
        """Verify capture files (sha256 against the manifest, then HDF5 structure); ``{step: problem}``, empty when all good.

        Reads every byte of every file checked; meant for an explicit integrity scan, not for every read.
        A file on disk that the manifest does not list yet (a crash before listing it) is checked for
        readability only.
        """
        problems = {}
        for step in self.capture_steps if steps is None else steps:
            try:
                path = self.capture_path(step)
                entry = self._entries.get(step, {}).get("dynamics")
                problem = file_problem(path, entry.get("sha256") if entry else None)
                if problem is not None:
                    raise DynamicsIOError(problem, path)
                with self._open_h5(step) as f:
                    for kind in CAPTURE_KINDS:
                        if kind in f:
                            for name in f[kind]:
                                _read_dataset(f, f"{kind}/{name}")
            except DynamicsError as e:
                problems[step] = str(e)
        return problems

    # -- checkpoints -------------------------------------------------------------------------------

    def weights(
        self,
        step: int,
        names: str | Iterable[str] | None = None,
        *,
        merged: bool = True,
        as_tensor: bool = False,
        dtype: Any = None,
    ) -> dict[str, Any]:
        """Weights of the checkpoint at ``step`` under canonical names (no ``.weight`` suffix), read lazily.

        ``merged=True``: the effective weights (``model.safetensors``; ``W + s·B·A`` for
        ReLoRA). ``merged=False``: wrapped matrices give their frozen base ``W``
        instead (``adapters.safetensors``). LoRA factor names (``<name>.lora_a``,
        ``<name>.lora_b``) are served too, from the capture file or the checkpoint.
        """
        ckpt = self.checkpoint_path(step)
        model_file = ckpt / MODEL_FILE
        dense = {k[: -len(".weight")]: k for k in sorted(self._safetensors_keys(model_file), key=_model_order)}
        factors = self._factor_names(step)
        chosen = _select(list(dense) + factors, names, "weight", model_file)
        out: dict[str, Any] = {}
        want_dense = [n for n in chosen if n in dense]
        base = set()
        if not merged and want_dense and (ckpt / ADAPTERS_FILE).is_file():
            base_keys = {k[: -len(".weight")] for k in self._safetensors_keys(ckpt / ADAPTERS_FILE)}
            base = {n for n in want_dense if n in base_keys}
            out.update(_read_safetensors(ckpt / ADAPTERS_FILE, {n: f"{n}.weight" for n in base}))
        out.update(_read_safetensors(model_file, {n: dense[n] for n in want_dense if n not in base}))
        want_factors = [n for n in chosen if n in factors]
        if want_factors:
            out.update(self._read_factors(step, want_factors))
        return _convert({n: out[n] for n in chosen}, as_tensor=as_tensor, dtype=dtype)

    def lora_factors(
        self, step: int, names: str | Iterable[str] | None = None, *, as_tensor: bool = False, dtype: Any = None
    ) -> dict[str, Any]:
        """``{"<name>.lora_a": A (r×in), "<name>.lora_b": B (out×r)}`` at ``step``; ``{}`` when the model is not wrapped.

        ``names`` selects matrices (``layers.*.attn.q``) or factors (``**.lora_a``). With
        :attr:`lora_scale` ``s``, the adapter's update is ``s·B@A``.
        """
        factors = self._factor_names(step)
        if not factors:
            return {}
        if names is None:
            chosen = factors
        else:
            patterns = [names] if isinstance(names, str) else list(names)
            chosen = [f for f in factors if select([f], patterns) or select([f.rsplit(".", 1)[0]], patterns)]
            if not chosen:
                raise DynamicsError(
                    f"{self.path}: no LoRA factors at step {step} match {names!r}; available: {_shown(factors)}"
                )
        return _convert(self._read_factors(step, chosen), as_tensor=as_tensor, dtype=dtype)

    def _factor_names(self, step: int) -> list[str]:
        """Factor names at ``step``: from adapters.safetensors' header (checkpoints are the source of truth)."""
        adapters = self.checkpoint_path(step) / ADAPTERS_FILE
        if not adapters.is_file():
            return []
        names = [k[: -len(".weight")] for k in self._safetensors_keys(adapters)]
        return sorted((n for n in names if n.endswith(_FACTOR_SUFFIXES)), key=_model_order)

    def _read_factors(self, step: int, names: list[str]) -> dict[str, np.ndarray]:
        adapters = self.checkpoint_path(step) / ADAPTERS_FILE
        return _read_safetensors(adapters, {n: f"{n}.weight" for n in names})

    def weight_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
        """``{name: shape}`` of the checkpoint's dense weights (``model.safetensors``: the merged weights) under
        canonical names, in model order, from the file's header alone (no tensor is read)."""
        header = self._safetensors_header(self.checkpoint_path(step) / MODEL_FILE)
        dense = {k[: -len(".weight")]: shape for k, shape in header}
        return {n: dense[n] for n in sorted(dense, key=_model_order)}

    def _safetensors_keys(self, path: Path) -> list[str]:
        """The keys of a safetensors file's header (remembered per file identity: path, inode, size, mtime)."""
        return [k for k, _ in self._safetensors_header(path)]

    def _safetensors_header(self, path: Path) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """``(key, shape)`` of each tensor in a safetensors file's header (:func:`_header`)."""
        try:
            st = path.stat()
        except OSError:
            st = None
        if st is None or not path.is_file():
            raise DynamicsIOError(f"{path} is missing (listed in {self.path / MANIFEST})", path)
        return _header(str(path), st.st_ino, st.st_size, st.st_mtime_ns)


# --------------------------------------------------------------------------------------------------
# helpers


#: Bytes of decoded activations :func:`cached_activations` keeps per process (least recently used dropped first).
ACTIVATION_CACHE_BYTES = 256 << 20
_ACTIVATIONS: BoundedLRU[dict[str, np.ndarray]] = BoundedLRU(
    lambda: ACTIVATION_CACHE_BYTES, lambda arrays: sum(a.nbytes for a in arrays.values())
)


def cached_activations(
    run: Run, kind: str, step: int, names: str | Iterable[str], *, errors: str = "raise"
) -> dict[str, np.ndarray]:
    """``run.get(kind, step, names, errors=errors)`` for an activation kind (``act``, ``act_in``), remembered per process.

    For analysis, which compares each capture with the previous and the final one (and the other run's): a capture's
    datasets are decoded (gzip, Fletcher-32) once, not once per comparison. The arrays are **read-only** (shared
    between callers; take a copy to modify). Keyed by the capture file's path, inode, size, modification and change
    times, ``kind`` and the ``names`` glob(s), so a file rewritten on disk is read again; at most
    :data:`ACTIVATION_CACHE_BYTES` are kept. Failures are not remembered: ``errors="skip"`` warns each time.
    """
    if kind not in ("act", "act_in"):
        raise DynamicsError(f"cached_activations(): kind must be 'act' or 'act_in', got {kind!r}")
    try:
        path = run.capture_path(step)
        st = path.stat()
    except (OSError, DynamicsError):
        return run.get(kind, step, names, errors=errors)
    selection = names if isinstance(names, str) else tuple(names)  # a glob or globs, hashable
    key = (
        str(path.resolve()),
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
        kind,
        selection,
    )
    hit = _ACTIVATIONS.get(key)
    if hit is not None:
        return dict(hit)
    out = run.get(kind, step, names, errors=errors)
    if not out:  # a skipped (damaged) file: not remembered
        return out
    for a in out.values():
        a.setflags(write=False)
    _ACTIVATIONS.put(key, out)
    return dict(out)


def _check_kind(kind: Any) -> str:
    if kind not in CAPTURE_KINDS:
        hint = " (the frozen base of a ReLoRA matrix: Run.weights(step, merged=False))" if kind == "base" else ""
        raise DynamicsError(f"Run: `kind` must be one of {list(CAPTURE_KINDS)}, got {kind!r}{hint}")
    return str(kind)


_ORDER = (
    "attn_norm",
    "resid_pre",
    "attn",
    "q",
    "k",
    "v",
    "o",
    "resid_mid",
    "mlp_norm",
    "mlp",
    "gate",
    "up",
    "down",
    "resid_post",
)


@functools.lru_cache(maxsize=4096)
def _model_order(name: str) -> tuple[Any, ...]:
    """Sort key putting canonical names in model order (``embed``, layers by index, ``final_norm``, ``lm_head``)."""
    from trainer.names import parse

    try:
        p = parse(name)
    except ValueError:
        return (3, name)
    sub = {"lora_a": 1, "lora_b": 2}.get(p.sub or "", 0)
    if p.layer is None:
        return ({"embed": 0, "final_norm": 2, "lm_head": 2}[p.proj], p.proj == "lm_head", 0, sub)
    return (1, p.layer, _ORDER.index(p.proj) if p.proj in _ORDER else len(_ORDER), sub)


def _shown(names: list[str]) -> str:
    return ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")


def _select(available: list[str], names: Any, kind: str, path: Any) -> list[str]:
    if names is None:
        return list(available)
    if not isinstance(names, str):
        names = list(names)
        if not all(isinstance(n, str) for n in names):
            raise DynamicsError(f"Run: `names` must be a glob or a list of globs, got {names!r}")
    chosen = select(available, names)
    if not chosen:
        raise DynamicsError(f"{path}: no {kind} names match {names!r}; available: {_shown(available)}")
    return chosen


def _read_dataset(f: Any, key: str) -> np.ndarray:
    try:
        return np.asarray(f[key][()])
    except KeyError:
        raise DynamicsIOError(f"{f.filename} has no dataset {key!r}", f.filename) from None
    except Exception as e:  # noqa: BLE001 - OSError (checksum, filter failure, truncation), RuntimeError ...
        raise DynamicsIOError(f"{f.filename}: dataset {key!r} is corrupted: {e}", f.filename) from None


@functools.lru_cache(maxsize=256)
def _header(path: str, inode: int, size: int, mtime_ns: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``(key, shape)`` of each tensor of the safetensors file ``path`` (its header only), cached by the file's
    identity: analysis asks for the same headers many times per checkpoint, and a file replaced on disk gets a new
    entry. Errors are not cached."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return tuple((k, tuple(f.get_slice(k).get_shape())) for k in f.keys())
    except Exception as e:  # noqa: BLE001 - SafetensorError (an Exception) and friends on a damaged header
        raise DynamicsIOError(f"{path} is truncated or corrupted: {type(e).__name__}: {e}", path) from None


def _read_safetensors(path: Path, keys: dict[str, str]) -> dict[str, np.ndarray]:
    """``{name: array}`` for ``{name: safetensors key}``, reading only those entries."""
    import torch
    from safetensors import safe_open

    out: dict[str, np.ndarray] = {}
    if not keys:
        return out
    try:
        with safe_open(str(path), framework="pt") as f:
            for name, key in keys.items():
                t = f.get_tensor(key)
                out[name] = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    except Exception as e:  # noqa: BLE001 - SafetensorError (an Exception) and friends on a damaged file
        raise DynamicsIOError(f"{path} is truncated or corrupted: {type(e).__name__}: {e}", path) from None
    return out


def _convert(out: dict[str, np.ndarray], *, as_tensor: bool, dtype: Any) -> dict[str, Any]:
    """``out`` cast to ``dtype`` (when given) and turned into torch tensors (``as_tensor``)."""
    if dtype is not None:
        out = {k: np.asarray(v).astype(dtype, copy=False) for k, v in out.items()}
    if as_tensor:
        import torch

        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}
    return dict(out)


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value
