"""Input fuzzing (hypothesis): configs, ``--set`` overrides, CLI arguments and the public metric functions.

Bad input may only end in the toolkit's own errors (``ConfigError``,
``DynamicsError``; at the CLI one ``error:`` line and status 1 or 2, or
argparse's usage error) with a message; valid input never gives NaN.
"""

from __future__ import annotations

import json
import math
import string

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dynamics
from dynamics.cli import main
from dynamics.validation import DynamicsError
from trainer.config import ConfigError, TrainConfig, build_config

pytestmark = pytest.mark.reliability

KEYS = sorted(TrainConfig().to_dict()) + [
    "model.d_model",
    "model.n_heads",
    "model.vocab_size",
    "relora.rank",
    "relora.alpha",
    "capture.every",
    "capture.token_sample",
    "data.source",
    "capture.act_dtype",
    "nonsense",
    "model.",
    ".x",
    "model.d_model.x",
]
VALUES = st.one_of(
    st.sampled_from(
        [
            "0",
            "-1",
            "1e-3",
            "nan",
            "inf",
            "-inf",
            "1e309",
            "true",
            "null",
            "[]",
            "[1,2]",
            "full",
            "relora",
            "bf16",
            "cuda",
            "",
            " ",
            "=",
            "2048",
            "99999999999999999999",
            "[a,[b]",
            "micro",
        ]
    ),
    st.text(string.printable, max_size=12),
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
OVERRIDE = st.one_of(
    st.tuples(st.sampled_from(KEYS), VALUES).map(lambda kv: f"{kv[0]}={kv[1]}"), st.text(string.printable, max_size=20)
)


def _examples(base: int):
    import os

    n = int(os.environ.get("RELIABILITY_N", "1"))
    return settings(
        max_examples=base * max(1, n),
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


def _builds_or_refuses_cleanly(**kwargs) -> None:
    """``build_config(**kwargs)`` either raises a ConfigError with a message or gives a config without NaNs."""
    try:
        cfg = build_config(**kwargs)
    except ConfigError as e:
        assert str(e).strip()
        return
    for key, value in json.loads(json.dumps(cfg.to_dict(), default=str)).items():
        if isinstance(value, float):
            assert math.isfinite(value), (key, value)


@_examples(150)
@given(st.lists(OVERRIDE, max_size=5))
def test_overrides_fail_only_with_config_errors(items):
    _builds_or_refuses_cleanly(overrides=items)


CONFIG_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(10**6), 10**20), st.floats(), st.text(max_size=8)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(KEYS + ["rank", "d_model"]), inner, max_size=3)
    ),
    max_leaves=8,
)


@_examples(100)
@given(
    data=st.one_of(
        st.dictionaries(st.sampled_from(KEYS), CONFIG_VALUES, max_size=5), CONFIG_VALUES, st.text(max_size=40)
    ),
    suffix=st.sampled_from([".yaml", ".json"]),
)
def test_config_files_fail_only_with_config_errors(tmp_path_factory, data, suffix):
    path = tmp_path_factory.mktemp("cfg") / f"c{suffix}"
    if isinstance(data, str):
        path.write_text(data)
    else:
        import yaml

        path.write_text(json.dumps(data) if suffix == ".json" else yaml.safe_dump(data))
    _builds_or_refuses_cleanly(file=path)


ARG = st.one_of(
    st.sampled_from(
        [
            "--steps",
            "--set",
            "--config",
            "--out",
            "--resume",
            "--preset",
            "--method",
            "--kinds",
            "--workers",
            "--keep-going",
            "--metric",
            "--kind",
            "--formats",
            "--dpi",
            "-h",
            "--blimp",
            "--init-from",
            "0",
            "-3",
            "x=1",
            "lr=nan",
            "tiny",
            "relora",
            "/nonexistent",
            "weight,bogus",
            "a.parquet",
            "b.csv",
            "--no-progress",
        ]
    ),
    st.text(string.printable, max_size=10),
)


@_examples(120)
@given(
    cmd=st.sampled_from(["train", "evaluate", "analyze", "summary", "plot", "reproduce", "demo", "bogus"]),
    args=st.lists(ARG, max_size=6),
)
def test_cli_arguments_never_crash(tmp_path_factory, monkeypatch, capsys, cmd, args):
    import dynamics.pipeline as pipeline
    import trainer.train as tt

    # valid arguments would start hours of work: stop at the point where it would begin (config already validated)
    stub = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt())
    monkeypatch.setattr(tt, "train", stub)
    monkeypatch.setattr(pipeline, "demo", stub)
    monkeypatch.setattr(pipeline, "reproduce", stub)
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    try:
        code = main([cmd] + args)
    except SystemExit as e:  # argparse: usage error (2) or --help (0)
        assert e.code in (0, 2)
        return
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert code in (0, 1, 2, 130)
    if code in (1, 2):
        assert err.startswith("error:") or "failed:" in err or "error:" in err, err


METRICS = [
    "effective_rank",
    "proportional_effective_rank",
    "stable_rank",
    "numerical_rank",
    "condition_number",
    "truncated_condition_number",
    "spectral_entropy",
    "participation_ratio",
    "singular_values",
    "activation_effective_rank",
    "anisotropy",
]
DTYPES = ["float64", "float32", "float16", "bfloat16"]


@st.composite
def matrices(draw):
    shape = draw(
        st.one_of(
            st.tuples(st.integers(0, 6), st.integers(0, 6)),
            st.tuples(st.integers(1, 3), st.integers(200, 2000)),  # huge aspect ratios, both ways
            st.tuples(st.integers(200, 2000), st.integers(1, 3)),
            st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4)),  # a batch
            st.tuples(st.integers(1, 5)),  # 1-D: not a matrix
        )
    )
    scale = draw(st.sampled_from([0.0, 1e-30, 1e-4, 1.0, 1e4, 6e4, 1e30]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = rng.standard_normal(shape) * scale
    special = draw(st.sampled_from([None, np.nan, np.inf, -np.inf]))
    if special is not None and x.size:
        x.flat[draw(st.integers(0, x.size - 1))] = special
    dtype = draw(st.sampled_from(DTYPES))
    as_torch = dtype == "bfloat16" or draw(st.booleans())
    t = torch.from_numpy(x).to(getattr(torch, dtype)) if as_torch else x.astype(dtype)
    return t


@_examples(300)
@given(M=matrices(), name=st.sampled_from(METRICS))
def test_metrics_on_any_input(M, name):
    fn = getattr(dynamics, name)
    x = M.double().numpy() if isinstance(M, torch.Tensor) else M.astype(np.float64)
    try:
        out = fn(M)
    except DynamicsError as e:
        assert str(e).strip()
        return
    # accepted: then the input was valid — finite values, a non-empty matrix (or batch)
    assert np.isfinite(x).all() and x.ndim >= 2 and x.size > 0, f"{name} accepted invalid input {x.shape}"
    values = np.asarray(out, dtype=np.float64)
    assert not np.isnan(values).any(), f"{name} returned NaN for a valid {tuple(x.shape)} {M.dtype} input"


@_examples(100)
@given(X=matrices(), Y=matrices())
def test_cka_on_any_input(X, Y):
    try:
        out = dynamics.linear_cka(X, Y)
    except DynamicsError as e:
        assert str(e).strip()
        return
    assert not np.isnan(np.asarray(out, dtype=np.float64)).any()
