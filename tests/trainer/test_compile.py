"""`compile=true` trains the same model: losses and weights match the eager run to float32 tolerance."""

from __future__ import annotations

import pytest
import torch

from trainer.config import build_config


@pytest.mark.slow
@pytest.mark.parametrize("method", ["relora"])  # full-rank runs the same compiled loss; ReLoRA adds merges
def test_compiled_training_matches_eager(train_variants, method):
    extra = ["steps=6", "checkpoint_interval=6", "eval_interval=6", "capture.enabled=false", "lr=1e-3"]
    if method == "relora":  # a merge after update 2, so the compiled step also runs through a merge and an lr restart
        extra += [
            "method=relora",
            "relora.rank=4",
            "relora.alpha=8",
            "relora.merge_every=2",
            "relora.dropout=0.0",
            "relora.lr_restart_warmup=1",
            "relora.optimizer_reset=none",
        ]
    runs = train_variants(extra, {"eager": ["compile=false"], "compiled": ["compile=true"]})
    eager, compiled = runs["eager"], runs["compiled"]
    assert len(eager["loss"]) == 6
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-4)
    assert eager["weights"].keys() == compiled["weights"].keys()  # no `_orig_mod.` prefixes: the module is not wrapped
    for k in eager["weights"]:
        torch.testing.assert_close(compiled["weights"][k], eager["weights"][k], rtol=1e-4, atol=1e-5)


def test_a_compiler_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    from trainer.runtime import CompiledLoss

    def broken_compile(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("backend exploded\nlong compiler log ...")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    loss = CompiledLoss(lambda x: 2 * x)
    with pytest.warns(UserWarning, match="torch.compile failed .*backend exploded.*continues without compile"):
        assert loss(torch.tensor(3.0)).item() == 6.0
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: eager from now on
        assert loss(torch.tensor(4.0)).item() == 8.0


def test_an_error_that_eager_mode_also_raises_is_raised(monkeypatch):
    from trainer.runtime import CompiledLoss

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)

    def bad(x):
        raise ValueError("bad input")

    loss = CompiledLoss(bad)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="bad input"):
        loss(torch.tensor(1.0))


@pytest.mark.parametrize("setting, expect_compiled", [("null", False), ("true", True), ("false", False)])
def test_compile_default_is_off_on_cpu(tmp_path, fast_overrides, setting, expect_compiled):
    from trainer.runtime import CompiledLoss
    from trainer.train import Trainer

    cfg = build_config(overrides=fast_overrides + ["capture.enabled=false", "device=cpu", f"compile={setting}"])
    t = Trainer(cfg, tmp_path / "run", progress=False, echo=lambda msg: None)
    try:
        t.setup()
        assert isinstance(t._train_loss, CompiledLoss) is expect_compiled
    finally:
        t.cleanup()


def test_out_of_memory_is_raised_and_compile_stays_on(monkeypatch):
    from trainer.runtime import CompiledLoss

    calls = []

    def compile_that_runs_out(fn, **kwargs):
        def compiled(*args):
            calls.append(args)
            if len(calls) == 1:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 26.00 GiB")
            return fn(*args)

        return compiled

    monkeypatch.setattr(torch, "compile", compile_that_runs_out)
    loss = CompiledLoss(lambda x: 2 * x)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        loss(torch.tensor(1.0))
    assert loss.compiled is not None
    assert loss(torch.tensor(2.0)).item() == 4.0 and len(calls) == 2
