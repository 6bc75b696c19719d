"""ReLoRA done correctly: each pitfall of SPEC §3 is a test that fails if it comes back."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from trainer.checkpoint import load_checkpoint
from trainer.config import MODEL_PRESETS, ReLoRAConfig, build_config
from trainer.model import Decoder, count_parameters
from trainer.relora import (
    ReLoRALinear,
    dense_state_dict,
    lora_parameters,
    merge_all,
    prune_optimizer_state,
    relora_modules,
    row_keys_of,
    wrap_model,
)
from trainer.train import Trainer, train

MICRO = MODEL_PRESETS["micro"]


def wrapped_micro(seed=0, **kw) -> tuple[Decoder, torch.Generator]:
    torch.manual_seed(seed)
    model = Decoder(MICRO)
    gen = torch.Generator().manual_seed(seed + 1)
    wrap_model(model, ReLoRAConfig(**{"rank": 4, "alpha": 8.0, "dropout": 0.0, **kw}), gen)
    return model, gen


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, MICRO.vocab_size, (4, 24), generator=g)
    return x, torch.roll(x, -1, 1)


def test_wrapping_targets_and_trainability():
    model, _ = wrapped_micro(targets=("q", "v", "down"))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, ReLoRALinear)]
    assert wrapped == [f"layers.{i}.{p}" for i in range(4) for p in ("attn.q", "attn.v", "mlp.down")]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "layers.0.attn.q.weight" not in trainable  # frozen base keeps its key
    assert {
        "layers.0.attn.q.lora_a.weight",
        "layers.0.attn.q.lora_b.weight",
        "layers.0.attn.k.weight",
        "embed.weight",
        "lm_head.weight",
        "final_norm.weight",
        "layers.0.attn_norm.weight",
    } <= trainable


def test_init_is_a_no_op_but_not_dead():
    torch.manual_seed(0)
    plain = Decoder(MICRO)
    model = copy.deepcopy(plain)
    wrap_model(model, ReLoRAConfig(rank=4, alpha=8.0, dropout=0.0), torch.Generator().manual_seed(1))
    x, y = batch()
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)  # B = 0: adapters start at zero contribution
    m = model.layers[0].attn.q
    assert m.lora_a.weight.abs().min() >= 0 and m.lora_a.weight.abs().max() > 0  # A is not zero (dead adapters)
    assert torch.all(m.lora_b.weight == 0)


def test_first_step_grads_B_nonzero_A_exactly_zero_then_both_nonzero():
    model, _ = wrapped_micro()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = batch()
    model.loss(x, y).backward()
    for name, m in model.named_modules():
        if isinstance(m, ReLoRALinear):
            assert m.lora_b.weight.grad.abs().sum() > 0, name
            assert torch.all(m.lora_a.weight.grad == 0), name  # dL/dA = s Bᵀ g xᵀ = 0 while B = 0
            assert m.weight.grad is None  # frozen
    opt.step()
    opt.zero_grad()
    model.loss(x, y).backward()
    assert all(m.lora_a.weight.grad.abs().sum() > 0 for m in model.modules() if isinstance(m, ReLoRALinear))


def test_merge_preserves_the_function_to_float32_rounding():
    model, gen = wrapped_micro()  # s = alpha / r = 2: an unscaled merge would change the loss
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = batch()
    for _ in range(5):
        opt.zero_grad()
        model.loss(x, y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        before_logits, before = model(x), model.loss(x, y).item()
        dense_before = dense_state_dict(model)
        assert merge_all(model, gen) == 28
        after_logits, after = model(x), model.loss(x, y).item()
    assert abs(after - before) <= 1e-5 * abs(before)
    torch.testing.assert_close(after_logits, before_logits, rtol=1e-5, atol=1e-5)
    for k, v in dense_state_dict(model).items():
        torch.testing.assert_close(v, dense_before[k], rtol=1e-6, atol=1e-6)
    m = model.layers[1].mlp.up
    assert torch.all(m.lora_b.weight == 0) and m.lora_a.weight.abs().sum() > 0  # re-initialised


def test_unscaled_merge_would_be_caught():
    model, gen = wrapped_micro()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ReLoRALinear):
                m.lora_b.weight.normal_(0, 0.05)
        m = model.layers[0].attn.q
        assert not torch.allclose(m.weight + m.lora_b.weight @ m.lora_a.weight, m.effective_weight())


@pytest.mark.parametrize("mode, ratio", [("random", 0.999), ("random", 0.5), ("magnitude", 0.9), ("full", 1.0)])
def test_optimizer_reset_prunes_the_tensors_adam_uses(mode, ratio):
    model, gen = wrapped_micro()
    lora = lora_parameters(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = batch()
    for _ in range(3):
        opt.zero_grad()
        model.loss(x, y).backward()
        opt.step()
    other = model.embed.weight
    embed_state = opt.state[other]["exp_avg"].clone()
    nonzero_before = sum(int((opt.state[p]["exp_avg_sq"] != 0).sum()) for p in lora)
    stats = prune_optimizer_state(opt, lora, mode=mode, ratio=ratio, generator=gen)
    total = sum(opt.state[p][k].numel() for p in lora for k in ("exp_avg", "exp_avg_sq"))
    zeros = sum(int((opt.state[p][k] == 0).sum()) for p in lora for k in ("exp_avg", "exp_avg_sq"))
    assert stats["zero_fraction"] == pytest.approx(zeros / total)
    assert zeros / total == pytest.approx(ratio, abs=0.02)
    assert nonzero_before > 0
    assert torch.equal(opt.state[other]["exp_avg"], embed_state)  # only LoRA parameters are pruned
    assert int(opt.state[lora[0]]["step"]) == 3  # the step counter is kept


def test_full_reset_reaches_the_next_adam_update():
    """After a full reset, the next update equals Adam's update from zero moments at the kept step count."""
    model, gen = wrapped_micro()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    x, y = batch()
    for _ in range(3):
        opt.zero_grad()
        model.loss(x, y).backward()
        opt.step()
    prune_optimizer_state(opt, lora_parameters(model), mode="full", ratio=1.0, generator=gen)
    p = model.layers[0].attn.q.lora_b.weight
    opt.zero_grad()
    model.loss(x, y).backward()
    g, before = p.grad.clone(), p.detach().clone()
    opt.step()
    b1, b2, t = 0.9, 0.999, 4
    m_hat = (1 - b1) * g / (1 - b1**t)
    v_hat = (1 - b2) * g * g / (1 - b2**t)
    expected = before - 1e-2 * m_hat / (v_hat.sqrt() + 1e-8)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "preset, extra_millions, trainable_millions, total_millions",
    [("tiny", 0.40, 10.0, 11.6), ("small", 1.60, 40.2, 66.1)],
)
def test_trainable_parameter_counts_match_spec(preset, extra_millions, trainable_millions, total_millions):
    with torch.device("meta"):
        model = Decoder(MODEL_PRESETS[preset])
    full = count_parameters(model)
    wrap_model(model, ReLoRAConfig(), torch.Generator())
    extra = sum(p.numel() for p in lora_parameters(model))
    assert extra / 1e6 == pytest.approx(extra_millions, abs=0.01)
    assert count_parameters(model) == full + extra
    assert count_parameters(model, trainable_only=True) / 1e6 == pytest.approx(trainable_millions, abs=0.1)
    assert count_parameters(model) / 1e6 == pytest.approx(total_millions, abs=0.1)


def relora_overrides(fast_overrides, *extra):
    return fast_overrides + [
        "method=relora",
        "relora.rank=4",
        "relora.alpha=8",
        "relora.merge_every=4",
        "relora.lr_restart_warmup=2",
        "relora.dropout=0.1",
        *extra,
    ]


def test_run_logs_merges_and_resets_and_checkpoints_hold_all_forms(tmp_path, fast_overrides):
    cfg = build_config(overrides=relora_overrides(fast_overrides, "steps=10"))
    run = train(cfg, tmp_path / "r", progress=False)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    merges = [r["step"] for r in recs if "merge" in r]
    assert merges == [5, 9]  # after updates 4 and 8 (the lr-0 steps)
    assert all(r["lr"] == 0.0 for r in recs if r["step"] in (5, 9))
    assert all(r["optimizer_reset"] > 0.99 for r in recs if "merge" in r)
    ck = load_checkpoint(run, step=10)
    w, a, b = (ck.adapters[f"layers.1.mlp.up{s}.weight"] for s in ("", ".lora_a", ".lora_b"))
    torch.testing.assert_close(ck.model["layers.1.mlp.up.weight"], w + 2.0 * b @ a)
    assert (
        ck.model.keys()
        == load_checkpoint(
            train(build_config(overrides=fast_overrides + ["steps=3"]), tmp_path / "f", progress=False)
        ).model.keys()
    )


def test_resume_is_exact_across_a_merge(tmp_path, fast_overrides):
    cfg = build_config(overrides=relora_overrides(fast_overrides, "steps=12", "checkpoint_interval=100"))
    ref = train(cfg, tmp_path / "ref", progress=False)
    t = Trainer(cfg, tmp_path / "split", progress=False)
    t.setup()
    t.run(stop_at=3)  # before the first merge (after update 4)
    t.cleanup()
    train(cfg, tmp_path / "split", resume=True, progress=False)
    a, b = load_checkpoint(ref), load_checkpoint(tmp_path / "split")
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]), k
    for k in a.adapters:
        assert torch.equal(a.adapters[k], b.adapters[k]), k
    la = [json.loads(x).get("loss") for x in (ref / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x).get("loss") for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert la == lb


def test_warm_start_then_relora_and_init_from(tmp_path, fast_overrides):
    cfg = build_config(overrides=relora_overrides(fast_overrides, "steps=8", "relora.warm_start_steps=3"))
    run = train(cfg, tmp_path / "w", progress=False)
    states = {c: load_checkpoint(run, step=c).state for c in (0, 5)}
    assert not states[0]["wrapped"] and states[5]["wrapped"]
    assert load_checkpoint(run, step=0).adapters is None
    # a ReLoRA run initialised from the full-rank warm-start's dense weights
    cfg2 = build_config(overrides=relora_overrides(fast_overrides, "steps=3", f"init_from={run}@5"))
    t = Trainer(cfg2, tmp_path / "i", progress=False)
    t.setup()
    t.cleanup()
    init = load_checkpoint(tmp_path / "i", step=0).model
    for k, v in load_checkpoint(run, step=5).model.items():
        torch.testing.assert_close(init[k], v, rtol=0, atol=0)


def dropout_micro(p: float = 0.5) -> Decoder:
    """A wrapped micro model in train mode whose adapters are not zero (B ~ N(0, 0.05)), so dropout shows."""
    model, _ = wrapped_micro(dropout=p)
    with torch.no_grad():
        for m in relora_modules(model).values():
            m.lora_b.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    return model.train()


def test_adapter_dropout_masks_follow_the_rows_not_the_split():
    """Rows 0-3 in one micro-batch or as 0-1 and 2-3 (two processes or two accumulation steps) get the same masks."""
    model = dropout_micro()
    rows = row_keys_of(model)
    assert rows is not None and all(m.rows is rows for m in relora_modules(model).values())
    x, _ = batch()  # (4, 24)
    rows.set(seed=7, step=3, first_row=0, n_rows=4, device="cpu")
    whole = model(x)
    parts = []
    for first in (0, 2):
        rows.set(seed=7, step=3, first_row=first, n_rows=2, device="cpu")
        parts.append(model(x[first : first + 2]))
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-5, atol=1e-6)
    rows.set(seed=7, step=4, first_row=0, n_rows=4, device="cpu")  # another step: other masks
    assert (model(x) - whole).abs().max() > 1e-3
    model.eval()  # no dropout at all: the same output whatever the keys
    eval_out = model(x)
    rows.set(seed=7, step=3, first_row=0, n_rows=4, device="cpu")
    assert torch.equal(model(x), eval_out)


def test_row_keys_are_not_in_the_state_dict():
    model, _ = wrapped_micro(dropout=0.1)
    torch.manual_seed(0)
    plain_keys = set(Decoder(MICRO).state_dict())
    lora_keys = {f"{n}.lora_{f}.weight" for n in relora_modules(model) for f in ("a", "b")}
    assert set(model.state_dict()) == plain_keys | lora_keys
    row_keys_of(model).set(seed=0, step=0, first_row=0, n_rows=4, device="cpu")
    assert set(model.state_dict()) == plain_keys | lora_keys  # setting keys adds no buffer


def test_the_trainer_keys_every_adapter_dropout_also_after_a_warm_start(tmp_path, fast_overrides, monkeypatch):
    """The fallback to plain (process-RNG) dropout never runs in training, before or after the warm-start switch."""

    def unkeyed(*args, **kwargs):
        raise AssertionError("adapter dropout fell back to the process's random stream")

    monkeypatch.setattr(torch.nn.functional, "dropout", unkeyed)
    cfg = build_config(
        overrides=relora_overrides(fast_overrides, "steps=6", "relora.warm_start_steps=2", "grad_accum=2")
    )
    t = Trainer(cfg, tmp_path / "w", progress=False)
    t.setup()
    try:
        t.run()
        assert t.wrapped and row_keys_of(t.model) is t.row_keys
        assert t.row_keys.keys is not None and t.row_keys.keys.shape == (cfg.micro_batch_size,)
    finally:
        t.cleanup()


def test_a_compiled_layer_reads_the_refilled_keys_without_recompiling(monkeypatch):
    """RowKeys refills its tensor in place: one graph serves every step, and it reads the new keys (not constants)."""
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    layer = ReLoRALinear(
        torch.nn.Linear(16, 8, bias=False),
        rank=2,
        alpha=4.0,
        dropout=0.5,
        generator=torch.Generator().manual_seed(0),
        name="layers.0.attn.q",
    )
    with torch.no_grad():
        layer.lora_b.weight.normal_(generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(layer, backend="aot_eager")
    x = torch.randn(4, 3, 16)
    outputs = []
    for step in range(3):
        layer.rows.set(seed=0, step=step, first_row=0, n_rows=4, device="cpu")
        outputs.append(compiled(x))
        torch.testing.assert_close(outputs[-1], layer(x), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(outputs[0], outputs[1])
    torch._dynamo.reset()


@pytest.mark.slow
def test_full_rank_and_relora_both_learn_the_grammar(tmp_path):
    from trainer.config import DataConfig
    from trainer.corpus import unigram_entropy
    from trainer.data import prepare

    base = [
        "steps=120",
        "eval_interval=60",
        "checkpoint_interval=120",
        "data.train_tokens=400000",
        "data.val_tokens=20000",
    ]
    val = {}
    for method, extra in (
        ("full", []),
        ("relora", ["relora.rank=8", "relora.alpha=16", "relora.merge_every=40", "relora.lr_restart_warmup=5"]),
    ):
        run = train(build_config(overrides=base + [f"method={method}", *extra]), tmp_path / method, progress=False)
        val[method] = load_checkpoint(run).state["val_loss"]
    stream = prepare(DataConfig(train_tokens=400000, val_tokens=20000), tmp_path / "full" / "data").val
    h1 = unigram_entropy(stream)  # ≈ 4.4 nats: what a model that ignores context can reach
    assert val["full"] < h1 - 0.8 and val["relora"] < h1 - 0.8, (val, h1)
    from trainer.evaluate import evaluate_run

    acc = evaluate_run(tmp_path / "full", steps=[120], n_builtin_pairs=400, progress=False).query(
        "metric == 'pair_acc'"
    )
    simple = acc[acc.phenomenon == "subject_verb_agreement"]["value"].item()
    assert simple > 0.65  # chance is 0.5; 0.65 is 3 standard errors above it with 100 pairs of this phenomenon
