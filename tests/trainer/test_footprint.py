"""ReLoRA's frozen base matrices get no gradient buffer and no optimizer state, and the reported footprint says so."""

from __future__ import annotations

import pytest

from trainer import relora
from trainer.config import build_config
from trainer.train import Trainer, memory_footprint


@pytest.mark.parametrize("method", ["full", "relora"])
def test_footprint_matches_what_is_allocated(tmp_path, fast_overrides, method):
    cfg = build_config(
        overrides=fast_overrides
        + [
            "capture.enabled=false",
            "steps=3",
            f"method={method}",
            "relora.rank=4",
            "relora.merge_every=2",
            "relora.lr_restart_warmup=1",
        ]
    )
    messages = []
    t = Trainer(cfg, tmp_path / method, progress=False, echo=messages.append)
    try:
        t.setup()
        t.train_step()
        loss = t.model.loss(*[b.to(t.device) for b in t.val_batches[0]])
        loss.backward()  # gradients as the next step would leave them, before zero_grad
        m = memory_footprint(t.model, t.optimizer)
        state_bytes = sum(
            v.numel() * v.element_size()
            for s in t.optimizer.state.values()
            for k, v in s.items()
            if k in ("exp_avg", "exp_avg_sq")
        )
        grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in t.model.parameters() if p.grad is not None)
        assert m["optimizer_state_bytes"] == state_bytes
        assert m["grad_bytes"] == grad_bytes
        if method == "relora":
            frozen = [mod.weight for mod in relora.relora_modules(t.model).values()]
            assert frozen and all(w.grad is None and w not in t.optimizer.state for w in frozen)
            assert m["trainable_bytes"] < 0.7 * m["param_bytes"]  # micro: the projections are most of the weights
        else:
            assert m["trainable_bytes"] == m["param_bytes"]
        assert any(msg.startswith("memory: weights") for msg in messages)
    finally:
        t.cleanup()
