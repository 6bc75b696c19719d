"""Checkpoints from outside this trainer, turned into a run directory ``dynamics analyze`` reads.

Accepted sources (``find_checkpoints`` decides which one a path is):

* **a run directory** (it has ``manifest.json``): used as it is, nothing is copied;
* **one weights file**: ``*.safetensors``, or a torch pickle ``*.pt`` / ``*.pth`` / ``*.bin``;
* **a model directory**: a Hugging Face directory (``config.json`` plus ``model.safetensors``,
  sharded ``model-0000i-of-0000n.safetensors``, or ``pytorch_model*.bin``) or any folder of
  weight files, read as one checkpoint (step 0);
* **a folder of step directories**: subdirectories whose names end in a step number
  (``step_1000``, ``step-1000``, ``step1000``, ``checkpoint-1000``, ``1000``), each a model
  directory — the layout of published pico-decoder checkpoints (one revision per step).

Torch pickles are loaded only with ``torch.load(weights_only=True)``: a pickle that
needs arbitrary code (a class, a function, ``os.system``…) is refused with
:class:`UntrustedCheckpointError` and nothing in it runs. Safetensors headers are
validated by the ``safetensors`` library (sizes, offsets, overlaps).

:func:`import_checkpoints` writes the checkpoints in our layout (manifest + one
``model.safetensors`` of float32 2-D matrices per step, under the canonical names
of STYLE.md: Hugging Face LLaMA keys are renamed, ``model.layers.3.self_attn.q_proj``
→ ``layers.3.attn.q``, by the key map of :mod:`trainer.run_format`; other keys keep their name). 1-D tensors (norm gains,
biases) are left out: the analysis looks at matrices. Peak memory is one checkpoint.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch

from dynamics.io import DynamicsIOError
from dynamics.validation import DynamicsError
from trainer.run_format import (
    MANIFEST,
    MODEL_FILE,
    RUN_SCHEMA_VERSION,
    canonical_key,
    checkpoint_relpath,
    wrapped_matrices,
)

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_STEP_DIR = re.compile(r"^(?:.*?[^0-9])?(\d+)$")  # a name ending in digits: step_1000, checkpoint-1000, 1000


class UntrustedCheckpointError(DynamicsIOError):
    """A torch pickle that would need arbitrary code to load; refused, never executed."""


def canonical_name(key: str) -> str:
    """A state-dict key → our canonical name (``model.layers.0.mlp.down_proj.weight`` → ``layers.0.mlp.down.weight``).

    Our own keys and keys of other architectures are returned unchanged (:func:`trainer.run_format.canonical_key`).
    """
    return canonical_key(key)


def model_config_from_hf(config: dict[str, Any]) -> dict[str, Any]:
    """Our ``model`` config section from a Hugging Face LLaMA-style ``config.json`` (missing fields left out)."""
    fields = {
        "vocab_size": "vocab_size",
        "d_model": "hidden_size",
        "n_layers": "num_hidden_layers",
        "n_heads": "num_attention_heads",
        "n_kv_heads": "num_key_value_heads",
        "d_mlp": "intermediate_size",
        "max_seq_len": "max_position_embeddings",
        "rope_theta": "rope_theta",
        "norm_eps": "rms_norm_eps",
    }
    out = {ours: config[theirs] for ours, theirs in fields.items() if theirs in config}
    if "n_heads" in out and "n_kv_heads" not in out:
        out["n_kv_heads"] = out["n_heads"]
    return out


# ----------------------------------------------------------------------------------------------
# finding checkpoints


def _weight_files(directory: Path) -> list[Path]:
    """The weight files of one model directory, preferring safetensors over pickles (HF writes both sometimes)."""
    files = sorted(
        p
        for p in directory.iterdir()
        if p.is_file()
        and p.suffix in WEIGHT_SUFFIXES
        and not p.name.startswith((".", "optimizer", "rng", "training_args", "scheduler"))
    )
    safe = [p for p in files if p.suffix == ".safetensors"]
    return safe or files


def find_checkpoints(src: str | Path) -> list[tuple[int, list[Path]]]:
    """``[(step, [weight files]), ...]`` ascending by step for a file, model directory or folder of step directories.

    Raises :class:`DynamicsIOError` naming ``src`` when it is missing or holds no weights.
    """
    src = Path(src)
    if not src.exists():
        raise DynamicsIOError(f"{src} not found", src)
    if src.is_file():
        if src.suffix not in WEIGHT_SUFFIXES:
            raise DynamicsIOError(f"{src}: not a weights file (expected one of {', '.join(WEIGHT_SUFFIXES)})", src)
        return [(0, [src])]
    own = _weight_files(src)
    if own:
        return [(0, own)]
    steps: dict[int, list[Path]] = {}
    for sub in sorted(p for p in src.iterdir() if p.is_dir()):
        m = _STEP_DIR.match(sub.name)
        files = _weight_files(sub) if m else []
        if m and files:
            step = int(m.group(1))
            if step in steps:
                raise DynamicsIOError(
                    f"{src}: two directories give step {step} ({steps[step][0].parent.name}, {sub.name})", src
                )
            steps[step] = files
    if not steps:
        raise DynamicsIOError(
            f"{src}: no checkpoints found (expected manifest.json, weight files {', '.join(WEIGHT_SUFFIXES)}, "
            "or step directories such as step_1000/ holding them)",
            src,
        )
    return sorted(steps.items())


# ----------------------------------------------------------------------------------------------
# loading one checkpoint safely


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UntrustedCheckpointError(
            f"{path}: refused: this pickle needs arbitrary code to load, which is never run here "
            f"({str(e).splitlines()[-1][:200] if str(e) else 'unsupported global'}). Only tensors and plain "
            "containers are accepted (torch.load weights_only=True); convert the file to safetensors where you trust it.",
            path,
        ) from None
    except Exception as e:  # noqa: BLE001 - torch.load raises many types on a truncated zip or a foreign file
        raise DynamicsIOError(f"{path}: unreadable torch file: {type(e).__name__}: {e}", path) from None
    for key in ("state_dict", "model", "model_state_dict", "module"):  # common training-script wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise DynamicsIOError(f"{path}: expected a state dict (name → tensor), got {type(obj).__name__}", path)
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - SafetensorError (an Exception): bad header, sizes, overlapping offsets
        raise DynamicsIOError(f"{path}: not a valid safetensors file: {e}", path) from None


def load_matrices(files: Iterable[Path]) -> dict[str, torch.Tensor]:
    """The 2-D floating-point tensors of one checkpoint (all shards), as float32 under canonical names."""
    out: dict[str, torch.Tensor] = {}
    for path in files:
        state = _load_safetensors(path) if path.suffix == ".safetensors" else _load_pickle(path)
        for key, t in state.items():
            if t.ndim != 2 or not t.is_floating_point():
                continue
            name = canonical_name(key)
            name = name if name.endswith(".weight") else name + ".weight"
            if name in out:
                raise DynamicsIOError(f"{path}: matrix {key!r} appears twice in the checkpoint", path)
            out[name] = t.to(torch.float32).contiguous()
    if not out:
        raise DynamicsIOError(f"{', '.join(str(p) for p in files)}: no 2-D floating-point tensors found", None)
    return out


# ----------------------------------------------------------------------------------------------
# writing a run directory


def _fingerprint(checkpoints: list[tuple[int, list[Path]]]) -> list[list[Any]]:
    """Cheap identity of the source files (path, size, mtime): re-importing an unchanged source is skipped."""
    return [
        [step, [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]]
        for step, files in checkpoints
    ]


def _save_weights(matrices: dict[str, torch.Tensor], path: Path) -> None:
    """Write ``matrices`` as one safetensors file at ``path`` (a temporary file of :func:`trainer.atomic.atomic_write`)."""
    from safetensors.torch import save_file

    save_file(matrices, str(path))


def import_checkpoints(
    src: str | Path,
    dst: str | Path,
    *,
    method: str = "full",
    relora: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """Write the checkpoints found at ``src`` as a run directory at ``dst``; returns ``dst``.

    ``method`` is the label the results table shows (``full`` or ``relora``: the
    imported weights are always the effective dense ones). A ``relora`` import
    must say what the source run wrapped: ``relora={"targets": [...], "rank": r}``,
    optionally ``"alpha"`` and ``"merge_every"`` (stored as the run's ``relora``
    config; the analysis never assumes them; without ``merge_every`` no merges are known).
    Re-importing an unchanged source into the same ``dst`` does nothing. Each
    file is written atomically and the manifest last, so an interrupted import
    is redone, never half-read.
    """
    from tqdm.auto import tqdm

    from trainer.atomic import atomic_write, atomic_write_json, sha256_file

    if method not in ("full", "relora"):
        raise DynamicsError(f"import_checkpoints: method must be 'full' or 'relora', got {method!r}")
    config: dict[str, Any] = {"method": method}
    if method == "relora":
        config["relora"] = dict(relora or {})
        try:
            wrapped_matrices(config)
        except ValueError as e:
            raise DynamicsError(
                f"import_checkpoints: a 'relora' import needs relora={{'targets': [...], 'rank': r}} "
                f"naming what the source run wrapped: {e}"
            ) from None
    src, dst = Path(src), Path(dst)
    checkpoints = find_checkpoints(src)
    fingerprint = _fingerprint(checkpoints)
    manifest_path = dst / MANIFEST
    if manifest_path.is_file():
        try:
            old = json.loads(manifest_path.read_text())
        except ValueError:
            old = {}
        if old.get("source", {}).get("fingerprint") == fingerprint:
            return dst

    model: dict[str, Any] = {}
    for config_dir in (src if src.is_dir() else src.parent, checkpoints[-1][1][0].parent):
        if (config_dir / "config.json").is_file():
            try:
                model = model_config_from_hf(json.loads((config_dir / "config.json").read_text()))
            except (ValueError, AttributeError) as e:
                raise DynamicsIOError(f"{config_dir / 'config.json'}: unreadable config: {e}", config_dir) from None
            break

    entries = []
    n_layers = 0
    for step, files in tqdm(checkpoints, desc=f"import {src.name}", unit="ckpt", disable=not progress):
        matrices = load_matrices(files)
        layers = [int(m.group(1)) for k in matrices if (m := re.match(r"layers\.(\d+)\.", k))]
        n_layers = max([n_layers, *(i + 1 for i in layers)])
        rel = checkpoint_relpath(step)
        target = dst / rel / MODEL_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, partial(_save_weights, matrices))
        entries.append(
            {
                "step": step,
                "tokens_seen": None,
                "loss": None,
                "path": rel,
                "sha256": {MODEL_FILE: sha256_file(target)},
                "source": [str(p) for p in files],
            }
        )
        del matrices
    model.setdefault("n_layers", n_layers)
    manifest = {
        "schema_version": RUN_SCHEMA_VERSION,
        "config": {**config, "model": model, "imported": True},
        "source": {"path": str(src.resolve()), "fingerprint": fingerprint},
        "checkpoints": entries,
    }
    atomic_write_json(manifest_path, manifest)
    return dst


def as_run_directory(path: str | Path, import_root: str | Path, *, progress: bool = True) -> Path:
    """``path`` itself when it is a run directory, else its import under ``import_root/<name>``."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    name = path.stem if path.is_file() else path.name
    return import_checkpoints(path, Path(import_root) / name, progress=progress)
