"""Comparisons across runs: which runs are seeds of one experiment, which ReLoRA run pairs with which full-rank run.

``dynamics analyze`` writes, for every (ReLoRA run, full-rank run) pair and
every checkpoint step both runs have, rows of ``kind = "cross_run"`` under the
ReLoRA run's label (``method = "relora"``):

===================================== ===================================================================
metric                                meaning (component: a wrapped projection, or an activation site)
===================================== ===================================================================
``update_overlap``                    overlap (mean squared cosine of principal angles, averaged over the
                                      output and input sides) of the top-``r`` singular subspaces of the
                                      two runs' cumulative updates ``W_t − W_0``; ``r`` = ReLoRA rank.
                                      Only for the projections the ReLoRA run wraps, and at its rank,
                                      both read from its stored config (``relora.targets``,
                                      ``relora.rank``; :attr:`dynamics.io.Run.wrapped`)
``update_overlap_out`` / ``_in``      the same, output (left) and input (right) side alone
``update_overlap_chance``             the value two random subspaces would give, ``(r/m + r/n)/2``
``cka_debiased``                      debiased linear CKA of the activations on the shared probe set
``cka``                               the biased linear CKA of the same activations, for comparison
``svcca`` / ``pwcca``                 SVCCA / PWCCA (:mod:`dynamics.similarity`; PWCCA weighted by the
                                      ReLoRA run's view) of the same activations, only where the probe
                                      has ``cca_min_tokens_per_feature`` (5) tokens per feature
===================================== ===================================================================

Pairing: runs are comparable when their model, data, step count, batch and
context agree (:func:`comparison_key`; method, seed, learning-rate schedule and
ReLoRA settings may differ). Each ReLoRA run is paired with the comparable
full-rank run of the same seed, else with the first comparable full-rank run
(sorted by label). Runs that differ *only* by seed form a seed group
(:func:`seed_group_key`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from dynamics._kernels import decomposition_cost
from dynamics.io import Run, cached_activations
from dynamics.validation import DynamicsError
from trainer.run_format import without_execution_settings

if TYPE_CHECKING:
    from dynamics.subspaces import UpdateOverlap

__all__ = ["comparison_key", "seed_group_key", "pair_runs", "cross_run_rows", "same_probe"]

_Add = Callable[[str, Mapping[str, float]], None]
_SAME = ("preset", "model", "data", "steps", "batch_size", "grad_accum", "seq_len")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def comparison_key(config: Mapping[str, Any]) -> str:
    """Hash of what must agree for two runs to be compared step by step: model, data, steps, batch, context
    (not how they were executed: :data:`trainer.run_format.EXECUTION_SETTINGS`)."""
    config = without_execution_settings(config)
    return _digest({k: config.get(k) for k in _SAME})


def seed_group_key(config: Mapping[str, Any]) -> str:
    """Hash of the whole resolved config except the run's ``seed`` and how it was executed
    (:data:`trainer.run_format.EXECUTION_SETTINGS`): equal for runs that differ only by seed."""
    return _digest({k: v for k, v in without_execution_settings(config).items() if k != "seed"})


def pair_runs(runs: Sequence[tuple[str, str, Mapping[str, Any]]]) -> list[tuple[str, str]]:
    """``(relora label, full label)`` pairs from ``(label, method, config)`` triples (see the module docstring)."""
    full = sorted((r for r in runs if r[1] == "full"), key=lambda r: r[0])
    pairs = []
    for label, method, config in sorted(runs, key=lambda r: r[0]):
        if method != "relora":
            continue
        same = [f for f in full if comparison_key(f[2]) == comparison_key(config)]
        if not same:
            continue
        seeded = [f for f in same if f[2].get("seed") == config.get("seed")]
        pairs.append((label, (seeded or same)[0][0]))
    return pairs


#: name -> its update overlap, or None for a zero update (no subspace)
_Found = dict[str, "UpdateOverlap | None"]


def _update_overlap_tasks(relora: Run, full: Run, step: int) -> tuple[list[str], list[Callable[[], _Found]]]:
    """The matrices ``relora`` wraps (in row order) and one task per group of same-shaped ones that returns their
    ``update_overlap`` results at the adapter rank (from the run's stored config), costliest group first.

    A group (all layers' ``attn.q``, ...) goes through one batched SVD per run (:func:`dynamics.subspaces.
    update_overlaps`: the numbers of :func:`~dynamics.subspaces.update_overlap` pair by pair); each task forms its
    own float64 differences. The weights are read here. Both checkpoints are finite (the cross-run unit checks them).
    """
    from dynamics.subspaces import update_overlaps

    wrapped = relora.wrapped
    if wrapped.rank is None or not wrapped.targets:
        return [], []
    k = wrapped.rank
    first_r, first_f = relora.steps[0], full.steps[0]
    names = wrapped.names(relora.n_layers)
    now_r, now_f = relora.weights(step, names), full.weights(step, names)
    init_r, init_f = relora.weights(first_r, names), full.weights(first_f, names)
    groups: dict[tuple[int, ...], list[str]] = {}
    for name in names:
        if now_r[name].shape == now_f[name].shape and now_r[name].ndim == 2:
            groups.setdefault(now_r[name].shape, []).append(name)

    def group_task(group: list[str]) -> _Found:
        dr = np.stack([np.subtract(now_r[n], init_r[n], dtype=np.float64) for n in group])
        df = np.stack([np.subtract(now_f[n], init_f[n], dtype=np.float64) for n in group])
        return dict(zip(group, update_overlaps(dr, df, k)))

    def cost(group: list[str]) -> int:
        return sum(decomposition_cost(now_r[n].shape) for n in group)

    return names, [partial(group_task, group) for group in sorted(groups.values(), key=cost, reverse=True)]


def _add_update_rows(add: _Add, names: list[str], found: _Found) -> None:
    """``update_overlap`` rows in the order of ``names``; a zero update (``None``, e.g. a frozen matrix) has no
    subspace: no row, no number."""
    for name in names:
        overlap = found.get(name)
        if overlap is not None:
            add(name, overlap.metrics("update_overlap"))


def _cka_rows(
    add: _Add, relora: Run, full: Run, step: int, act_sites: Sequence[str], cca_min_tokens_per_feature: float | None
) -> None:
    """CKA rows per activation site, and SVCCA/PWCCA unless ``cca_min_tokens_per_feature`` is None.

    Same-shaped pairs (a site's layers) go through one batched CKA call each; a batch holding a constant view (CKA
    undefined: no row for that pair) is redone pair by pair, so the other pairs keep their rows.
    """
    from dynamics.analyze_rows import similarity_rows

    for site in act_sites:
        kind, _, pattern = site.partition(":")
        try:
            xs, ys = cached_activations(relora, kind, step, pattern), cached_activations(full, kind, step, pattern)
        except DynamicsError:
            continue  # site not captured in one of the runs
        names = [n for n in sorted(set(xs) & set(ys)) if xs[n].size and ys[n].size]
        views = {n: (xs[n].reshape(-1, xs[n].shape[-1]), ys[n].reshape(-1, ys[n].shape[-1])) for n in names}
        names = [n for n in names if views[n][0].shape[0] == views[n][1].shape[0]]
        groups: dict[tuple[tuple[int, ...], tuple[int, ...]], list[str]] = {}
        for n in names:
            groups.setdefault((views[n][0].shape, views[n][1].shape), []).append(n)
        found: dict[str, dict[str, float]] = {}
        for group in groups.values():
            x = np.stack([views[n][0] for n in group], dtype=np.float64)
            y = np.stack([views[n][1] for n in group], dtype=np.float64)
            found.update(zip(group, _cka_pairs(x, y)))
        for name in names:
            label = name if kind == "act" else f"{name}.in"
            if not found.get(name):
                continue  # constant activations: CKA undefined, no row
            add(label, found[name])
            if cca_min_tokens_per_feature is not None:
                x, y = (v.astype(np.float64) for v in views[name])
                add(label, similarity_rows(x, y, min_tokens_per_feature=cca_min_tokens_per_feature))


def _cka_pairs(x: np.ndarray, y: np.ndarray) -> list[dict[str, float]]:
    """``{"cka_debiased", "cka"}`` of each pair of the float64 batches ``x`` (B, n, p) and ``y`` (B, n, q), batched;
    where the batch holds a constant view, pair by pair, leaving that pair's dict out (an empty dict)."""
    from dynamics.activations import linear_and_debiased_cka

    try:
        plain, debiased = (np.asarray(v).reshape(-1) for v in linear_and_debiased_cka(x, y))
        return [{"cka_debiased": float(d), "cka": float(c)} for d, c in zip(debiased, plain)]
    except DynamicsError:
        if x.shape[0] == 1:
            return [{}]
        return [out for i in range(x.shape[0]) for out in _cka_pairs(x[i : i + 1], y[i : i + 1])]


def same_probe(relora: Run, full: Run) -> bool:
    """Whether two runs captured activations on the same probe tokens (manifest ``probe.act`` and ``seq_len``)."""
    a, b = relora.manifest.get("probe") or {}, full.manifest.get("probe") or {}
    return bool(a.get("act")) and a.get("act") == b.get("act") and a.get("seq_len") == b.get("seq_len")


def cross_run_rows(
    relora_path: str,
    full_path: str,
    step: int,
    *,
    act_sites: Sequence[str],
    label: str,
    updates: bool = True,
    cka: bool = True,
    cca_min_tokens_per_feature: float | None = None,
    pool: Executor | None = None,
) -> list[dict[str, Any]]:
    """Rows (``kind = "cross_run"``) comparing a ReLoRA run with a full-rank run at ``step``; see the module docstring.

    ``label`` is the ReLoRA run's label in the table. Steps at which either run
    has no checkpoint give no rows; CKA rows need both runs' captures at
    ``step`` on the same probe set (:func:`same_probe`); SVCCA/PWCCA rows come with
    them when ``cca_min_tokens_per_feature`` is given (where the probe has that many
    tokens per feature). With a thread ``pool`` the CKA rows and each group of same-shaped update overlaps are
    tasks computed at once; the rows come in the same order either way (the update overlaps first).
    """
    from dynamics.io import open_run

    relora, full = open_run(relora_path), open_run(full_path)
    entry = next(c for c in relora.manifest["checkpoints"] if c["step"] == step)
    base = {"run": label, "method": relora.method, "step": step, "tokens": entry.get("tokens_seen")}

    def adder(rows: list[dict[str, Any]]) -> _Add:
        def add(name: str, metrics: Mapping[str, float]) -> None:
            layer, component = (
                (int(name.split(".")[1]), name.split(".", 2)[2]) if name.startswith("layers.") else (-1, name)
            )
            for metric, value in metrics.items():
                rows.append(
                    {
                        **base,
                        "layer": layer,
                        "component": component,
                        "kind": "cross_run",
                        "metric": metric,
                        "value": float(value),
                    }
                )

        return add

    update_rows: list[dict[str, Any]] = []
    cka_rows: list[dict[str, Any]] = []
    tasks: list[Callable[[], _Found | None]] = []
    if cka and step in relora.capture_steps and step in full.capture_steps and same_probe(relora, full):
        tasks.append(partial(_cka_rows, adder(cka_rows), relora, full, step, act_sites, cca_min_tokens_per_feature))
    names: list[str] = []
    if updates and step in full.steps and step != relora.steps[0]:
        names, overlap_tasks = _update_overlap_tasks(relora, full, step)
        tasks += overlap_tasks
    if pool is None or len(tasks) < 2:
        results = [task() for task in tasks]
    else:  # the CKA rows and each group of update overlaps: a task each
        results = [future.result() for future in [pool.submit(task) for task in tasks]]
    found: _Found = {}
    for result in results:
        found.update(result or {})
    _add_update_rows(adder(update_rows), names, found)
    return update_rows + cka_rows
