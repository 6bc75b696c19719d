"""Run directories: the manifest, the step log and crash-safe checkpoints.

The layout and every file name are in :mod:`trainer.run_format` (documented in
``data/README.md``); this module writes and reads them.

A checkpoint directory is written under a temporary name, fsynced and renamed;
then the manifest is atomically replaced with one listing it. The manifest is
the source of truth: a directory it does not list (a crash between the two
renames) is incomplete as far as readers are concerned and is removed on resume.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from trainer.atomic import (
    atomic_write,
    atomic_write_dir,
    fault_point,
    finite_json,
    inside,
    json_checksum,
    sha256_file,
)
from trainer.errors import CheckpointError
from trainer.run_format import (
    ADAPTERS_FILE,
    CHECKPOINTS_DIR,
    DATA_DIR,
    MANIFEST,
    METRICS,
    MODEL_FILE,
    OPTIMIZER_FILE,
    RNG_FILE,
    RUN_SCHEMA_VERSION,
    STATE_FILE,
    checkpoint_file_problems,
    checkpoint_relpath,
    parse_step_dirname,
)

if TYPE_CHECKING:
    from trainer.model import Decoder

__all__ = [
    "CheckpointError",
    "CheckpointPayload",
    "MANIFEST",
    "METRICS",
    "CHECKPOINTS",
    "MODEL_FILE",
    "ADAPTERS_FILE",
    "OPTIMIZER_FILE",
    "RNG_FILE",
    "STATE_FILE",
    "RUN_SCHEMA_VERSION",
    "code_version",
    "read_manifest",
    "check_manifest",
    "write_manifest",
    "new_manifest",
    "record_config_change",
    "save_checkpoint",
    "remove_unlisted_checkpoints",
    "checkpoint_entry",
    "verify_checkpoint",
    "load_checkpoint",
    "load_model",
]

#: The checkpoints directory's name (:data:`trainer.run_format.CHECKPOINTS_DIR`; this module's older name for it).
CHECKPOINTS = CHECKPOINTS_DIR


def code_version() -> dict[str, str | None]:
    """Package version, git commit of the source tree (if it is a git checkout) and torch version."""
    from importlib import metadata

    try:
        version = metadata.version("relora-dynamics")
    except metadata.PackageNotFoundError:
        version = None
    sha = None
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        if out.returncode == 0:
            sha = out.stdout.strip()
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=Path(__file__).parent,
                capture_output=True,
                text=True,
                timeout=5,
            )
            if dirty.returncode == 0 and dirty.stdout.strip():
                sha += "-dirty"
    except (OSError, subprocess.SubprocessError):
        pass
    return {"package": version, "git_commit": sha, "torch": torch.__version__}


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    """Load and check ``manifest.json``. Raises :class:`CheckpointError` naming the file."""
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        raise CheckpointError(f"{path} not found: {run_dir} is not a run directory (or no checkpoint completed yet)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable or corrupted: {e}") from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if not isinstance(version, int):
        raise CheckpointError(f"{path} has no schema_version; not a run manifest")
    if version > RUN_SCHEMA_VERSION:
        raise CheckpointError(
            f"{path} has schema_version {version}, newer than this toolkit understands ({RUN_SCHEMA_VERSION}); upgrade the package"
        )
    problem = check_manifest(manifest, Path(run_dir))
    if problem:
        raise CheckpointError(f"{path} {problem}")
    checked: dict[str, Any] = manifest
    return checked


def check_manifest(manifest: dict[str, Any], run_dir: Path) -> str | None:
    """What is wrong with a parsed manifest (``None`` when nothing); pops its ``checksum`` key.

    The ``checksum`` (sha256 of the canonical JSON of everything else) catches
    any change of content, e.g. a flipped digit in a setting; a manifest without
    one (older, or hand-edited with the key deleted) is accepted. Checkpoint
    paths and file names must stay inside ``run_dir``.
    """
    stored = manifest.pop("checksum", None)
    if stored is not None and stored != json_checksum(manifest):
        return (
            "is corrupted: its checksum does not match its content (after a deliberate hand edit, "
            'delete the "checksum" key)'
        )
    entries = manifest.get("checkpoints")
    if not isinstance(entries, list):
        return "has no checkpoint list; not a run manifest"
    try:
        for c in entries:
            if (
                not isinstance(c, dict)
                or not isinstance(c.get("step"), int)
                or not isinstance(c.get("sha256", {}), dict)
            ):
                raise ValueError(f"malformed checkpoint entry {str(c)[:80]!r}")
            inside(run_dir, c.get("path"), what="checkpoint path")
            for name in c.get("sha256", {}):
                if "/" in name or name in (".", "..") or not isinstance(c["sha256"][name], str):
                    raise ValueError(f"checkpoint file name {name!r} is not a plain file name")
                inside(run_dir, name, what="checkpoint file name")
            dyn = c.get("dynamics")
            if dyn is not None:
                if not isinstance(dyn, dict):
                    raise ValueError(f"malformed capture record {str(dyn)[:80]!r}")
                inside(run_dir, dyn.get("path"), what="capture path")
    except ValueError as e:
        return f"is invalid: {e}; refusing to read it"
    return None


def write_manifest(run_dir: str | Path, manifest: dict[str, Any], *, fault: str | None = None) -> None:
    """Atomically replace the manifest, adding its ``checksum``. ``fault`` names a TRAINER_FAULT point (``point@step``)."""
    body = finite_json({k: v for k, v in manifest.items() if k != "checksum"})
    data = (json.dumps({**body, "checksum": json_checksum(body)}, indent=2, allow_nan=False) + "\n").encode()

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)
        if fault is not None:
            point, _, step = fault.partition("@")
            fault_point(point, int(step))

    atomic_write(Path(run_dir) / MANIFEST, write)


#: what the manifest's ``data`` records of ``data/data.json``: the token files, and the tokenizer with its sha256
MANIFEST_DATA_KEYS = ("vocab_size", "n_tokens", "sha256", "tokenizer", "tokenizer_sha256", "eos")


def new_manifest(config: dict[str, Any], data_meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema_version": RUN_SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config,
        "seed": config["seed"],
        "code_version": code_version(),
        "data": {k: data_meta[k] for k in MANIFEST_DATA_KEYS if k in data_meta},
        "checkpoints": [],
    }


_fault_point = fault_point  # the TRAINER_FAULT test hook (see trainer.atomic.fault_point)


@dataclass
class CheckpointPayload:
    """What one checkpoint holds, as in-memory objects."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, Any]
    state: dict[str, Any]
    adapters: dict[str, torch.Tensor] | None = None


def save_checkpoint(run_dir: str | Path, payload: CheckpointPayload, *, interrupt: bool = False) -> dict[str, Any]:
    """Write ``checkpoints/step_N/`` atomically and add it to the manifest; returns the manifest entry.

    ``interrupt``: a checkpoint saved because training was stopped by a signal
    at a step that was not due one; its entry gets ``"interrupt": true``, and
    analysis leaves it out unless asked (its step is no regular checkpoint).
    Non-finite numbers (a NaN validation loss) are stored as ``null``.
    """
    run_dir = Path(run_dir)
    step = int(payload.state["step"])
    final = run_dir / checkpoint_relpath(step)
    if final.exists():  # left by a crash before the manifest listed it, or being overwritten on resume
        shutil.rmtree(final)

    def fill(tmp: Path) -> None:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in payload.model.items()},
            tmp / MODEL_FILE,
            metadata={"step": str(step), "format": "pt"},
        )
        if payload.adapters is not None:
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in payload.adapters.items()},
                tmp / ADAPTERS_FILE,
                metadata={"step": str(step), "format": "pt"},
            )
        _fault_point("checkpoint-write", step)
        torch.save(payload.optimizer, tmp / OPTIMIZER_FILE)
        torch.save(payload.rng, tmp / RNG_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(finite_json(payload.state), indent=2, allow_nan=False) + "\n")

    atomic_write_dir(final, fill)
    _fault_point("before-manifest", step)
    entry = {
        "step": step,
        "tokens_seen": payload.state.get("tokens_seen"),
        "loss": payload.state.get("loss"),
        "val_loss": payload.state.get("val_loss"),
        "path": checkpoint_relpath(step),
        "sha256": {f.name: sha256_file(f) for f in sorted(final.iterdir()) if f.is_file()},
    }
    if interrupt:
        entry["interrupt"] = True
    manifest = read_manifest(run_dir)
    manifest["checkpoints"] = [c for c in manifest["checkpoints"] if c["step"] != step] + [entry]
    manifest["checkpoints"].sort(key=lambda c: c["step"])
    write_manifest(run_dir, manifest, fault=f"manifest-write@{step}")
    return entry


def record_config_change(
    run_dir: str | Path, config: dict[str, Any], changed: dict[str, tuple[Any, Any]], *, at_step: int
) -> dict[str, Any]:
    """Store a resumed run's new ``config`` in the manifest and append what changed to its ``history``.

    ``changed`` maps dotted keys to ``(old, new)``. The history entry is
    ``{"time", "at_step", "changed": {key: {"from": old, "to": new}}}`` (plus
    ``"extended": {"from": old_steps, "to": new_steps}`` when ``steps`` grew), so
    the manifest always describes the run as it now is and how it got there.
    Returns the entry.
    """
    manifest = read_manifest(run_dir)
    entry: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "at_step": at_step,
        "changed": {k: {"from": old, "to": new} for k, (old, new) in sorted(changed.items())},
    }
    if "steps" in changed:
        entry["extended"] = {"from": changed["steps"][0], "to": changed["steps"][1]}
    manifest["config"] = config
    manifest.setdefault("history", []).append(entry)
    write_manifest(run_dir, manifest)
    return entry


def remove_unlisted_checkpoints(run_dir: str | Path, manifest: dict[str, Any]) -> list[Path]:
    """Delete checkpoint directories the manifest does not list and temp leftovers of interrupted writes; return them."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    listed = {Path(c["path"]).name for c in manifest["checkpoints"]}
    removed = []
    # temporary files of atomic writes a crash interrupted (manifest, step log, tokenised data)
    for pattern in (f".{MANIFEST}.*.tmp", f".{METRICS}.*.tmp", f"{DATA_DIR}/.*.tmp"):
        for leftover in Path(run_dir).glob(pattern):
            if leftover.is_file():
                leftover.unlink(missing_ok=True)
                removed.append(leftover)
    if root.exists():
        for d in root.iterdir():
            if d.name not in listed and (d.name.startswith(".") or parse_step_dirname(d.name) is not None):
                shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
                removed.append(d)
    return removed


def checkpoint_entry(manifest: dict[str, Any], step: int | None = None) -> dict[str, Any]:
    """The manifest entry of ``step`` (the latest when ``None``)."""
    entries: list[dict[str, Any]] = manifest["checkpoints"]
    if not entries:
        raise CheckpointError("the run has no complete checkpoint yet")
    if step is None:
        return entries[-1]
    for c in entries:
        if c["step"] == step:
            return c
    raise CheckpointError(f"no checkpoint at step {step}; available: {[c['step'] for c in entries]}")


def verify_checkpoint(run_dir: str | Path, entry: dict[str, Any]) -> None:
    """Check every file of a checkpoint against the manifest's sha256. Raises :class:`CheckpointError` naming the file.

    The check itself is :func:`trainer.run_format.checkpoint_file_problems` (shared with the readers).
    """
    try:
        problems = checkpoint_file_problems(run_dir, entry)
    except ValueError as e:  # a manifest path that leaves the run directory
        raise CheckpointError(f"{Path(run_dir) / MANIFEST} is invalid: {e}") from None
    if problems:
        raise CheckpointError(problems[0][1])


def load_checkpoint(
    run_dir: str | Path, step: int | None = None, *, verify: bool = True, map_location: str | torch.device = "cpu"
) -> CheckpointPayload:
    """Read a checkpoint (the latest when ``step`` is ``None``), verifying hashes first.

    Tensors come from safetensors; optimizer and RNG state through
    ``torch.load(weights_only=True)`` — nothing is unpickled beyond tensors and
    plain containers.
    """
    run_dir = Path(run_dir)
    entry = checkpoint_entry(read_manifest(run_dir), step)
    if verify:
        verify_checkpoint(run_dir, entry)
    ckpt = run_dir / entry["path"]
    adapters_path = ckpt / ADAPTERS_FILE

    def read(name: str, load: Callable[[Path], Any]) -> Any:
        path = ckpt / name
        try:
            return load(path)
        except pickle.UnpicklingError as e:  # weights_only refused a global: code, or an unknown class
            first = str(e).strip().splitlines()[-3:] if str(e).strip() else [""]
            raise CheckpointError(
                f"{path} is refused: it holds objects other than tensors and plain containers, which could run code "
                f"when unpickled ({' '.join(x for x in first if x).strip()[:200]}). Do not load it with "
                "weights_only=False unless you trust where it came from"
            ) from None
        except Exception as e:  # noqa: BLE001 - safetensors/pickle/json each raise their own types on a damaged file
            raise CheckpointError(f"{path} could not be read: {type(e).__name__}: {str(e)[:300]}") from None

    return CheckpointPayload(
        model=read(MODEL_FILE, lambda p: load_file(p, device=str(map_location))),
        optimizer=read(OPTIMIZER_FILE, lambda p: torch.load(p, map_location=map_location, weights_only=True)),
        rng=read(RNG_FILE, lambda p: torch.load(p, map_location="cpu", weights_only=True)),
        state=read(STATE_FILE, lambda p: json.loads(p.read_text())),
        adapters=read(ADAPTERS_FILE, lambda p: load_file(p, device=str(map_location)))
        if adapters_path.exists()
        else None,
    )


def load_model(run_dir: str | Path, step: int | None = None, *, device: str | torch.device = "cpu") -> Decoder:
    """Rebuild a run's model from its manifest and load a checkpoint's dense weights (eval mode).

    For ReLoRA runs this is the merged model (effective weights ``W + s·B·A``),
    which computes the same function as the adapter-wrapped one.
    """
    from trainer.config import config_from_dict
    from trainer.model import Decoder

    manifest = read_manifest(run_dir)
    entry = checkpoint_entry(manifest, step)
    verify_checkpoint(run_dir, entry)
    cfg = config_from_dict({**manifest["config"], "init_from": None})
    model = Decoder(cfg.model)
    try:
        model.load_state_dict(load_file(Path(run_dir) / entry["path"] / MODEL_FILE))
    except (RuntimeError, OSError, ValueError, KeyError) as e:  # missing/unexpected keys or shapes; unreadable file
        raise CheckpointError(
            f"{Path(run_dir) / entry['path'] / MODEL_FILE} does not fit the run's model: {e}"
        ) from None
    return model.to(device).eval()
