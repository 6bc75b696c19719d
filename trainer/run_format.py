"""The run directory format, said once: what the trainer writes and every reader reads.

A run directory (schema documented in ``data/README.md``)::

    <run>/manifest.json                      MANIFEST: schema, resolved config, code version, checkpoints + sha256
    <run>/metrics.jsonl                      METRICS: one JSON record per optimizer step
    <run>/data/                              DATA_DIR: tokenised streams, DATA_META describes them
        tokenizer.json                       TOKENIZER_FILE: text runs with a bpe or file tokenizer
    <run>/checkpoints/step_000100/           CHECKPOINTS_DIR / step_dirname(step)
        model.safetensors                    MODEL_FILE: dense (effective) weights, canonical keys
        adapters.safetensors                 ADAPTERS_FILE: ReLoRA only: frozen W, lora_a, lora_b
        optimizer.pt                         OPTIMIZER_FILE (torch.save; read with weights_only=True)
        rng.pt                               RNG_FILE (torch.save; read with weights_only=True)
        trainer_state.json                   STATE_FILE: step, tokens seen, lr, loss, merges ...
    <run>/dynamics/step_000100.h5            DYNAMICS_DIR: capture files (CAPTURE_KINDS groups)

Also here: the results-table columns of ``dynamics analyze``, the Hugging Face
LLaMA key map (export and import), which matrices a run wraps (read from its
stored config, never assumed) and the one check of files against the manifest's
sha256. This module imports no torch: the trainer and ``dynamics`` both use it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.atomic import inside, sha256_file
from trainer.names import ATTN_PROJS, MLP_PROJS

__all__ = [
    "MANIFEST",
    "METRICS",
    "DATA_DIR",
    "DATA_META",
    "TOKENIZER_FILE",
    "CHECKPOINTS_DIR",
    "MODEL_FILE",
    "ADAPTERS_FILE",
    "OPTIMIZER_FILE",
    "RNG_FILE",
    "STATE_FILE",
    "DYNAMICS_DIR",
    "RENAMED_KEYS",
    "stored_setting",
    "EXECUTION_SETTINGS",
    "without_execution_settings",
    "RUN_SCHEMA_VERSION",
    "CAPTURE_SCHEMA_VERSION",
    "CAPTURE_KINDS",
    "RESULTS_COLUMNS",
    "SPECTRA_COLUMNS",
    "step_dirname",
    "parse_step_dirname",
    "checkpoint_relpath",
    "capture_relpath",
    "hf_key",
    "canonical_key",
    "Wrapped",
    "wrapped_matrices",
    "projection_name",
    "file_problem",
    "checkpoint_file_problems",
]

# -- file and directory names ------------------------------------------------------------------------

MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"
DATA_DIR = "data"
DATA_META = "data.json"
TOKENIZER_FILE = "tokenizer.json"  # in DATA_DIR (the run's tokenizer) and beside an exported HF model
CHECKPOINTS_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
ADAPTERS_FILE = "adapters.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "trainer_state.json"
DYNAMICS_DIR = "dynamics"

#: Newest run-manifest schema (``schema_version`` of ``manifest.json``) this code writes and reads.
RUN_SCHEMA_VERSION = 1
#: Newest capture-file schema (``schema_version`` root attribute of ``dynamics/step_*.h5``).
CAPTURE_SCHEMA_VERSION = 1
#: Kinds (HDF5 groups) a capture file holds besides ``probe`` (``weight`` there: only LoRA factors).
CAPTURE_KINDS: tuple[str, ...] = ("act", "act_in", "grad", "weight")

#: Columns of the long results table of ``dynamics analyze`` (one row per run, step, matrix, metric).
RESULTS_COLUMNS: tuple[str, ...] = ("run", "method", "step", "tokens", "layer", "component", "kind", "metric", "value")
#: Columns of the optional spectra table (one row per run, step, matrix: its singular values).
SPECTRA_COLUMNS: tuple[str, ...] = ("run", "method", "step", "layer", "component", "kind", "shape", "values")


def step_dirname(step: int) -> str:
    """File-system name of a step (zero-padded to six digits): ``step_000100``."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step_{step:06d}"


def parse_step_dirname(dirname: str) -> int | None:
    """Inverse of :func:`step_dirname`; ``None`` when the name is not a step directory."""
    m = re.fullmatch(r"step_(\d{6,})", dirname)
    return int(m.group(1)) if m else None


def checkpoint_relpath(step: int) -> str:
    """Path of a checkpoint directory relative to the run directory: ``checkpoints/step_000100``."""
    return f"{CHECKPOINTS_DIR}/{step_dirname(step)}"


def capture_relpath(step: int) -> str:
    """Path of a capture file relative to the run directory: ``dynamics/step_000100.h5``."""
    return f"{DYNAMICS_DIR}/{step_dirname(step)}.h5"


# -- Hugging Face LLaMA keys ------------------------------------------------------------------------

#: Our per-layer module path (after ``layers.{i}.``) → the HF ``LlamaForCausalLM`` one.
_HF_LAYER = {
    "attn_norm": "input_layernorm",
    "mlp_norm": "post_attention_layernorm",
    **{f"attn.{p}": f"self_attn.{p}_proj" for p in ATTN_PROJS},
    **{f"mlp.{p}": f"mlp.{p}_proj" for p in MLP_PROJS},
}
_HF_TOP = {
    "embed.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_FROM_HF_LAYER = {v: k for k, v in _HF_LAYER.items()}
_FROM_HF_TOP = {v: k for k, v in _HF_TOP.items()}
_OUR_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)\.weight")
_HF_LAYER_KEY = re.compile(r"(?:model\.)?layers\.(\d+)\.(.+)\.weight")


def hf_key(key: str) -> str:
    """Our state-dict key (``layers.3.attn.q.weight``) → the HF key (``model.layers.3.self_attn.q_proj.weight``).

    Raises ``KeyError`` for a key with no LLaMA equivalent.
    """
    if key in _HF_TOP:
        return _HF_TOP[key]
    m = _OUR_LAYER_KEY.fullmatch(key)
    if not m or m.group(2) not in _HF_LAYER:
        raise KeyError(f"no Hugging Face LLaMA equivalent for {key!r}")
    return f"model.layers.{m.group(1)}.{_HF_LAYER[m.group(2)]}.weight"


def canonical_key(key: str) -> str:
    """A HF LLaMA state-dict key → ours (``model.layers.0.mlp.down_proj.weight`` → ``layers.0.mlp.down.weight``).

    Our own keys and keys of other architectures come back unchanged.
    """
    if key in _FROM_HF_TOP:
        return _FROM_HF_TOP[key]
    m = _HF_LAYER_KEY.fullmatch(key)
    if m and m.group(2) in _FROM_HF_LAYER:
        return f"layers.{m.group(1)}.{_FROM_HF_LAYER[m.group(2)]}.weight"
    return key


# -- settings renamed since runs were first written ---------------------------------------------------

#: Old dotted config key → current one. Config files, ``--set`` overrides and stored manifests that use an
#: old key load as if they used the new one (``trainer.config``); readers of stored configs use
#: :func:`stored_setting`.
RENAMED_KEYS: dict[str, str] = {
    "relora.reset_every": "relora.merge_every",
    "relora.restart_warmup": "relora.lr_restart_warmup",
}


def stored_setting(config: Mapping[str, Any], key: str) -> Any:
    """The value of dotted ``key`` (``relora.merge_every``) in a stored config dict, under its current name or
    any older one (:data:`RENAMED_KEYS`); ``None`` when it is under neither."""
    for name in [key, *(old for old, new in RENAMED_KEYS.items() if new == key)]:
        node: Any = config
        for part in name.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is not None:
            return node
    return None


#: Dotted config keys that say how a run is executed, not what it computes (the same algorithm on the same
#: tokens; results agree up to floating-point rounding): free to change on ``--resume``, and left out when
#: runs are paired or grouped by seed (``dynamics.cross_run``), so a seed tokenised with more ``data.workers``
#: or trained on another device still pairs and groups with its siblings.
EXECUTION_SETTINGS: tuple[str, ...] = ("device", "compile", "prefetch", "loss_chunk_tokens", "data.workers")


def without_execution_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a stored (nested) config dict without the :data:`EXECUTION_SETTINGS`."""
    out: dict[str, Any] = dict(config)
    for key in EXECUTION_SETTINGS:
        *parents, leaf = key.split(".")
        node: dict[str, Any] = out
        for part in parents:
            child = node.get(part)
            if not isinstance(child, Mapping):
                break
            node[part] = dict(child)  # copy on the way down: the caller's dict is left as it was
            node = node[part]
        else:
            node.pop(leaf, None)
    return out


# -- what a run wraps ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Wrapped:
    """Which projections a run wraps with ReLoRA adapters, read from its stored config.

    ``targets`` are projection leaves (``q``, ``k``, ``v``, ``o``, ``gate``, ``up``,
    ``down``), empty for a full-rank run; ``rank`` is the adapters' ``r``
    (``None`` when nothing is wrapped); ``scale`` is ``alpha / r``.
    """

    targets: tuple[str, ...]
    rank: int | None
    scale: float | None

    def names(self, n_layers: int) -> list[str]:
        """Canonical names of the wrapped matrices, in model order (``layers.0.attn.q`` ...)."""
        return [projection_name(i, leaf) for i in range(n_layers) for leaf in self.targets]

    def wraps(self, name: str) -> bool:
        """Whether canonical matrix ``name`` (``layers.3.attn.q``) is one of the wrapped ones."""
        parts = name.split(".")
        return len(parts) == 4 and parts[0] == "layers" and parts[2] in ("attn", "mlp") and parts[3] in self.targets


def projection_name(layer: int, leaf: str) -> str:
    """Canonical name of projection ``leaf`` of ``layer``: ``(3, "q")`` → ``layers.3.attn.q``."""
    if leaf in ATTN_PROJS:
        return f"layers.{layer}.attn.{leaf}"
    if leaf in MLP_PROJS:
        return f"layers.{layer}.mlp.{leaf}"
    raise ValueError(f"{leaf!r} is not a projection; expected one of {list(ATTN_PROJS + MLP_PROJS)}")


def wrapped_matrices(config: Mapping[str, Any]) -> Wrapped:
    """What a run wraps, from its stored (resolved) config dict (``manifest["config"]``).

    A full-rank run wraps nothing. A ReLoRA run must state ``relora.targets`` and
    ``relora.rank``; a config without them raises ``ValueError`` (a reader never
    assumes a default).
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"a run's config must be a mapping, got {type(config).__name__}")
    if config.get("method") != "relora":
        return Wrapped((), None, None)
    relora = config.get("relora")
    if not isinstance(relora, Mapping):
        raise ValueError("the run's config has method 'relora' but no 'relora' section; cannot tell what is wrapped")
    targets, rank, alpha = relora.get("targets"), relora.get("rank"), relora.get("alpha")
    known = (*ATTN_PROJS, *MLP_PROJS)
    if not isinstance(targets, (list, tuple)) or not targets or any(t not in known for t in targets):
        raise ValueError(
            f"the run's config has no valid relora.targets (got {targets!r}); "
            f"expected a non-empty subset of {list(known)}"
        )
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"the run's config has no valid relora.rank (got {rank!r})")
    scale = float(alpha) / rank if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) else None
    return Wrapped(tuple(t for t in known if t in targets), rank, scale)


# -- checking files against the manifest ----------------------------------------------------------------


def file_problem(path: Path, digest: str | None) -> str | None:
    """What is wrong with ``path`` given its manifest sha256 (``None`` when it is intact).

    ``digest=None`` checks existence only. Reads every byte of the file.
    """
    if not path.is_file():
        return f"{path} is missing (listed in the manifest)"
    if digest is not None and sha256_file(path) != digest:
        return f"{path} is corrupted: its sha256 does not match the manifest"
    return None


def checkpoint_file_problems(
    run_dir: str | Path, entry: Mapping[str, Any], *, files: Iterable[str] | None = None, capture: bool = False
) -> list[tuple[Path, str]]:
    """Check a checkpoint's files against its manifest entry; ``[(path, problem), ...]``, empty when intact.

    ``files`` limits the check to these checkpoint file names (those the entry
    lists); ``capture`` adds the step's capture file when the entry records one.
    Paths and names from the manifest must stay inside ``run_dir`` (``ValueError``
    otherwise: a crafted manifest never makes a reader look elsewhere).
    """
    run_dir = Path(run_dir)
    ckpt = inside(run_dir, entry["path"], what="checkpoint path")
    digests: Mapping[str, str] = entry.get("sha256", {})
    names = list(digests) if files is None else [f for f in files if f in digests]
    todo = [(inside(ckpt, name, what="checkpoint file name"), digests[name]) for name in names]
    record = entry.get("dynamics")
    if capture and record:
        todo.append((inside(run_dir, record["path"], what="capture path"), record.get("sha256")))
    threads = min(len(todo), os.cpu_count() or 1, _HASH_THREADS)
    if threads <= 1:
        found = [file_problem(path, digest) for path, digest in todo]
    else:  # hashlib releases the GIL while it hashes: the files on threads (a ReLoRA merge unit: 0.42 -> 0.21 s)
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sha256") as pool:
            found = list(pool.map(lambda job: file_problem(*job), todo))
    return [(path, problem) for (path, _), problem in zip(todo, found) if problem is not None]


#: at most this many files of one checkpoint are hashed at once (:func:`checkpoint_file_problems`).
_HASH_THREADS = 4
