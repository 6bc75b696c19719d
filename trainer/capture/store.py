"""The capture file: one HDF5 file per captured step, written atomically (schema: ``data/README.md``).

:func:`write_capture` turns a :class:`~trainer.capture.extract.Captured` into
``dynamics/step_XXXXXX.h5`` (temporary name in the same directory, fsync,
rename): root attributes (the step's training state, the config, the probe's
sha256), the ``probe`` group and one group per kind of
:data:`trainer.run_format.CAPTURE_KINDS`, datasets named by canonical name,
chunked by whole rows, with Fletcher-32 checksums and the configured
compression. The schema version and the kinds come from
:mod:`trainer.run_format`, which the reader (``dynamics.io``) shares.
:func:`estimate_bytes` predicts a file's size from a config.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trainer.atomic import atomic_write, fault_point
from trainer.config import TrainConfig
from trainer.names import select
from trainer.run_format import CAPTURE_KINDS, CAPTURE_SCHEMA_VERSION

if TYPE_CHECKING:
    from trainer.capture.extract import Captured, ProbeSet

__all__ = ["CHUNK_BYTES", "CaptureCancelled", "write_capture", "estimate_bytes"]

#: Target bytes of one HDF5 chunk.
CHUNK_BYTES = 1 << 18


# --------------------------------------------------------------------------------------------------
# Writing


def _chunk_shape(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Row blocks of about :data:`CHUNK_BYTES`, whole rows (so a full-matrix read touches few chunks)."""
    rows = max(1, min(shape[0], CHUNK_BYTES // max(1, int(np.prod(shape[1:])) * itemsize)))
    return (rows,) + tuple(shape[1:])


def _dataset_kwargs(cfg: TrainConfig, shape: tuple[int, ...], dtype: np.dtype) -> dict[str, Any]:
    c = cfg.capture
    kw: dict[str, Any] = {"chunks": _chunk_shape(shape, np.dtype(dtype).itemsize), "fletcher32": True}
    if c.compression == "gzip":
        kw.update(compression="gzip", compression_opts=c.compression_level, shuffle=True)
    elif c.compression == "lzf":
        kw.update(compression="lzf", shuffle=True)
    return kw


def _as_stored(arr: np.ndarray, dtype: str) -> tuple[np.ndarray, bool]:
    """Cast to the storage dtype; keep float32 when float16 would overflow a finite value (returns ``fell_back``)."""
    if dtype == "float32":
        return arr.astype(np.float32, copy=False), False
    with np.errstate(over="ignore"):
        half = arr.astype(np.float16)
    if not np.isfinite(half).all() and np.isfinite(arr).all():
        return arr.astype(np.float32, copy=False), True
    return half, False


class CaptureCancelled(Exception):
    """A capture write stopped early on request (``should_stop``); its temporary file is removed, nothing renamed."""


def write_capture(
    path: str | Path,
    captured: Captured,
    probe: ProbeSet,
    cfg: TrainConfig,
    attrs: dict[str, Any],
    *,
    should_stop: Callable[[], bool] | None = None,
) -> None:
    """Write one capture file atomically (temp file in the same directory, fsync, rename).

    ``should_stop`` is asked before every dataset; when it returns true the write
    raises :class:`CaptureCancelled` and ``path`` is left as it was. Safe to call
    from a background thread: it reads ``captured`` and ``probe`` only.
    """
    import h5py

    c = cfg.capture

    def write(tmp: Path) -> None:
        # The HDF5 file is built in memory and written with one plain write: HDF5 running out of disk space
        # inside an open file makes h5py print finalizer tracebacks and can crash the process in close()
        # (seen with h5py 3.16 / HDF5 2.0); a plain write fails with one ENOSPC OSError instead.
        buf = io.BytesIO()
        with h5py.File(buf, "w", track_order=True) as f:
            f.attrs["schema_version"] = CAPTURE_SCHEMA_VERSION
            for key, value in attrs.items():
                f.attrs[key] = value
            f.attrs["probe_loss"] = captured.probe_loss
            f.attrs["grad_loss"] = captured.grad_loss
            f.attrs["probe_sha256"] = probe.sha256
            f.attrs["act_dtype"], f.attrs["grad_dtype"] = c.act_dtype, c.grad_dtype
            g = f.create_group("probe", track_order=True)
            g.create_dataset("input_ids", data=probe.act_ids.numpy().astype(np.int32))
            g.create_dataset("windows", data=probe.act_windows.astype(np.int64))
            g.create_dataset("token_index", data=probe.token_index.astype(np.int64))
            g.create_dataset("grad_input_ids", data=probe.grad_ids.numpy().astype(np.int32))
            g.create_dataset("grad_windows", data=probe.grad_windows.astype(np.int64))
            for i, kind in enumerate(CAPTURE_KINDS):
                if i == len(CAPTURE_KINDS) // 2:
                    f.flush()
                    if os.environ.get("TRAINER_FAULT"):  # test hook: a half-written temporary file, then a crash
                        tmp.write_bytes(buf.getbuffer())
                    fault_point("capture-write", int(attrs.get("step", -1)))
                group = f.create_group(kind, track_order=True)
                dtype = c.act_dtype if kind in ("act", "act_in") else c.grad_dtype if kind == "grad" else "float32"
                for name, arr in captured.data.get(kind, {}).items():
                    if should_stop is not None and should_stop():
                        raise CaptureCancelled(f"writing {Path(path).name} was cancelled")
                    stored, fell_back = _as_stored(arr, dtype)
                    ds = group.create_dataset(name, data=stored, **_dataset_kwargs(cfg, stored.shape, stored.dtype))
                    if fell_back:
                        ds.attrs["float16_overflow"] = True
        tmp.write_bytes(buf.getbuffer())

    atomic_write(path, write)


# --------------------------------------------------------------------------------------------------
# Volume


def estimate_bytes(cfg: TrainConfig) -> dict[str, int]:
    """Uncompressed bytes of one capture file's datasets under ``cfg`` (full-rank; ReLoRA adds the small factors).

    Keys ``act`` (activations at the token sample), ``grad`` and ``total``.
    """
    m, c = cfg.model, cfg.capture
    hd = m.d_model // m.n_heads
    q, kv, d, f = m.n_heads * hd, m.n_kv_heads * hd, m.d_model, m.d_mlp
    # (name, features) of every site of one layer, as activation_sites lists them (act_in of o and down included)
    per_layer = [
        ("resid_pre", d),
        ("attn.q", q),
        ("attn.k", kv),
        ("attn.v", kv),
        ("attn.o", q),
        ("attn.o", d),
        ("resid_mid", d),
        ("mlp.gate", f),
        ("mlp.up", f),
        ("mlp.down", f),
        ("mlp.down", d),
        ("resid_post", d),
    ]
    sites = [(f"layers.{i}.{leaf}", w) for i in range(m.n_layers) for leaf, w in per_layer]
    chosen = set(select([n for n, _ in sites], list(c.act_names)))
    width = sum(w for n, w in sites if n in chosen)
    n_tok = c.probe_sequences * cfg.context
    tokens = n_tok if c.token_sample is None else min(c.token_sample, n_tok)
    act = tokens * width * np.dtype(c.act_dtype).itemsize
    mats = {"embed": m.vocab_size * d, "lm_head": m.vocab_size * d}
    for i in range(m.n_layers):
        mats.update(
            {
                f"layers.{i}.attn.q": q * d,
                f"layers.{i}.attn.k": kv * d,
                f"layers.{i}.attn.v": kv * d,
                f"layers.{i}.attn.o": d * q,
                f"layers.{i}.mlp.gate": f * d,
                f"layers.{i}.mlp.up": f * d,
                f"layers.{i}.mlp.down": d * f,
            }
        )
    grad = sum(mats[k] for k in select(list(mats), list(c.grad_names))) * np.dtype(c.grad_dtype).itemsize
    return {"act": int(act), "grad": int(grad), "total": int(act + grad)}
