"""Canonical names for weights, gradients and activations.

One name per thing, shared by the trainer (which writes it) and by ``dynamics``
(which reads it). The canonical name of a module is its path in the model,
which is also its state-dict key minus ``.weight``::

    embed
    layers.{i}.attn_norm
    layers.{i}.attn.{q,k,v,o}
    layers.{i}.mlp_norm
    layers.{i}.mlp.{gate,up,down}
    layers.{i}.resid_{pre,mid,post}      (identity modules marking the residual stream)
    final_norm
    lm_head

Per-layer names always start ``layers.{i}`` with ``i`` counted from 0 and never
padded. What is stored about a name (weight, gradient, activation ...) is a
separate *kind*, never a suffix. ReLoRA runs use the same names: ``weight``
always means the effective matrix ``W + s·B·A``; the adapter factors are the
submodules ``<name>.lora_a`` and ``<name>.lora_b``.

This module imports nothing heavy (no torch) so analysis code can use it freely.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

#: What is stored about a name. ``act_in`` of ``layers.i.mlp.down`` is the SwiGLU hidden state.
KINDS: tuple[str, ...] = ("weight", "grad", "act", "act_in", "act_grad")

ATTN_PROJS: tuple[str, ...] = ("q", "k", "v", "o")
MLP_PROJS: tuple[str, ...] = ("gate", "up", "down")
#: Residual-stream marker modules inside each block.
RESID_POINTS: tuple[str, ...] = ("resid_pre", "resid_mid", "resid_post")

_LAYER_RE = re.compile(r"^layers\.(\d+)(?:\.(.*))?$")


@dataclass(frozen=True)
class NameParts:
    """A canonical name split into the columns analysis tables use.

    ``layer`` is ``None`` for model-level modules (``embed``, ``final_norm``,
    ``lm_head``). ``block`` is ``attn``, ``mlp``, ``resid`` or ``norm`` inside a
    layer (``None`` outside one); ``proj`` is the leaf (``q``, ``gate``,
    ``resid_mid``, ``attn_norm`` ...) and ``sub`` is ``lora_a``/``lora_b`` for
    adapter factors, else ``None``.
    """

    name: str
    layer: int | None
    block: str | None
    proj: str
    sub: str | None = None


def matrix_names(n_layers: int) -> list[str]:
    """Names of every per-layer projection matrix (those ReLoRA can wrap), in model order.

    Which of them a given run wraps is in its stored config: :func:`trainer.run_format.wrapped_matrices`.
    """
    names = []
    for i in range(n_layers):
        names += [f"layers.{i}.attn.{p}" for p in ATTN_PROJS]
        names += [f"layers.{i}.mlp.{p}" for p in MLP_PROJS]
    return names


def parse(name: str) -> NameParts:
    """Split a canonical name into (layer, block, proj, sub).

    >>> parse("layers.3.mlp.down")
    NameParts(name='layers.3.mlp.down', layer=3, block='mlp', proj='down', sub=None)
    >>> parse("lm_head").layer is None
    True

    Raises ``ValueError`` for a name outside the scheme (e.g. HF-style
    ``self_attn.q_proj`` or a ``.weight`` suffix).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"parse: expected a non-empty canonical name, got {name!r}")
    sub = None
    base = name
    for leaf in ("lora_a", "lora_b"):
        if name.endswith("." + leaf):
            sub, base = leaf, name[: -len(leaf) - 1]
    if base in ("embed", "final_norm", "lm_head"):
        if sub is not None:
            raise ValueError(f"parse: {name!r} has no adapters")
        return NameParts(name, None, None, base)
    m = _LAYER_RE.match(base)
    if not m or m.group(2) is None:
        raise ValueError(
            f"parse: {name!r} is not a canonical name; expected e.g. 'layers.0.attn.q', "
            "'layers.2.mlp.down', 'layers.1.resid_mid', 'embed' or 'lm_head' (no '.weight' suffix)"
        )
    if m.group(1) != str(int(m.group(1))):
        raise ValueError(f"parse: layer index in {name!r} must not be zero-padded")
    layer, rest = int(m.group(1)), m.group(2)
    parts = rest.split(".")
    if len(parts) == 2 and parts[0] == "attn" and parts[1] in ATTN_PROJS:
        block, proj = "attn", parts[1]
    elif len(parts) == 2 and parts[0] == "mlp" and parts[1] in MLP_PROJS:
        block, proj = "mlp", parts[1]
    elif len(parts) == 1 and parts[0] in RESID_POINTS:
        block, proj = "resid", parts[0]
    elif len(parts) == 1 and parts[0] in ("attn_norm", "mlp_norm"):
        block, proj = "norm", parts[0]
    elif len(parts) == 1 and parts[0] in ("attn", "mlp"):
        block, proj = parts[0], parts[0]
    else:
        raise ValueError(f"parse: {name!r} is not a canonical name (unknown part {rest!r})")
    if sub is not None and not (block in ("attn", "mlp") and proj not in ("attn", "mlp")):
        raise ValueError(f"parse: {name!r}: only projection matrices carry adapters")
    return NameParts(name, layer, block, proj, sub)


def select(names: Iterable[str], pattern: str | Iterable[str] | None = None) -> list[str]:
    """Names matching a glob (``layers.*.attn.q``) or any of several globs; all when ``None``.

    Order of ``names`` is kept. ``*`` matches within one dot-separated part and
    ``**`` across parts, so ``layers.*.q`` does not match ``layers.0.attn.q``
    but ``layers.*.attn.q`` and ``**.attn.q`` do.
    """
    names = list(names)
    if pattern is None:
        return names
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    regexes = [_glob_regex(p) for p in patterns]
    return [n for n in names if any(r.fullmatch(n) for r in regexes)]


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """``*`` → one dot-free segment part, ``**`` → anything, ``?`` → one non-dot character."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^.]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))
