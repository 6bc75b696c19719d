"""The fused, chunked LM-head cross-entropy equals the plain loss and its gradients, and training is unchanged by it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.config import MODEL_PRESETS
from trainer.loss import auto_chunk_tokens, linear_cross_entropy
from trainer.model import Decoder


def _problem(n=300, d=24, v=1000, seed=0, ignore_every=None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).requires_grad_()
    weight = (0.2 * torch.randn(v, d, generator=g)).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        targets[::ignore_every] = -100
    return hidden, weight, targets


def _plain(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.T).float(), targets)


@pytest.mark.parametrize("chunk", [1, 7, 64, 299, 300, 10_000, None])
@pytest.mark.parametrize("ignore_every", [None, 5])
def test_loss_and_gradients_match_plain_cross_entropy(chunk, ignore_every):
    hidden, weight, targets = _problem(ignore_every=ignore_every)
    ref = _plain(hidden, weight, targets)
    ref_h, ref_w = torch.autograd.grad(ref, [hidden, weight])
    got = linear_cross_entropy(hidden, weight, targets, chunk_tokens=chunk)
    got_h, got_w = torch.autograd.grad(3.0 * got, [hidden, weight])  # the incoming gradient is applied
    assert got.dtype == torch.float32 and got.shape == ()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(got_h, 3.0 * ref_h, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_w, 3.0 * ref_w, rtol=1e-5, atol=1e-7)


def test_float64_inputs_stay_float64_precise():
    hidden, weight, targets = _problem()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = F.cross_entropy(h64 @ w64.T, targets)
    got = linear_cross_entropy(h64, w64, targets, chunk_tokens=50)
    # the loss is reduced in float32 (as the trainer's loss always is); the products ran in float64
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    (gh,) = torch.autograd.grad(got, [h64])
    assert gh.dtype == torch.float64


def test_bf16_autocast_is_as_accurate_as_the_plain_loss():
    """Under autocast the products run in bf16 like nn.Linear's; errors against float64 are no worse than the plain loss's."""
    hidden, weight, targets = _problem(n=400, d=32, v=3000)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    exact = F.cross_entropy(h64 @ w64.T, targets)
    exact_h, exact_w = torch.autograd.grad(exact, [h64, w64])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = F.cross_entropy(F.linear(hidden, weight).float(), targets)
        fused = linear_cross_entropy(hidden, weight, targets, chunk_tokens=64)
    plain_h, plain_w = torch.autograd.grad(plain, [hidden, weight])
    fused_h, fused_w = torch.autograd.grad(fused, [hidden, weight])
    assert fused_w.dtype == torch.float32  # a float32 weight gets a float32 gradient

    def err(x, ref):
        return ((x.double() - ref).abs().max() / ref.abs().max()).item()

    assert abs(fused.item() - exact.item()) <= 1.5 * abs(plain.item() - exact.item()) + 1e-4
    assert err(fused_h, exact_h) <= 1.5 * err(plain_h, exact_h)
    assert err(fused_w, exact_w) <= 1.5 * err(plain_w, exact_w)
    assert err(fused_w, exact_w) < 2e-2  # and bf16-level close in absolute terms


def test_without_gradients_gives_the_same_loss():
    hidden, weight, targets = _problem()
    with torch.no_grad():
        got = linear_cross_entropy(hidden, weight, targets, chunk_tokens=13)
    assert got.item() == pytest.approx(_plain(hidden, weight, targets).item(), rel=1e-6)
    assert not got.requires_grad


def test_all_targets_ignored_is_nan_like_the_plain_loss():
    hidden, weight, targets = _problem(n=10)
    targets[:] = -100
    assert math.isnan(linear_cross_entropy(hidden, weight, targets).item())
    assert math.isnan(_plain(hidden, weight, targets).item())


@pytest.mark.parametrize("bad", ["hidden_3d", "width", "targets", "empty", "chunk"])
def test_bad_inputs_are_refused_with_a_clear_error(bad):
    hidden, weight, targets = _problem(n=10)
    kwargs = {}
    if bad == "hidden_3d":
        hidden = hidden.detach()[None]
    elif bad == "width":
        weight = weight.detach()[:, :-1]
    elif bad == "targets":
        targets = targets[:-1]
    elif bad == "empty":
        hidden, targets = hidden[:0], targets[:0]
    else:
        kwargs["chunk_tokens"] = -3
    with pytest.raises(ValueError):
        linear_cross_entropy(hidden, weight, targets, **kwargs)


def test_auto_chunk_keeps_a_chunk_of_logits_within_budget():
    assert auto_chunk_tokens(50304) * 4 * 50304 <= 512 * 2**20
    assert auto_chunk_tokens(50304) == 512 * 2**20 // (4 * 50304)
    assert auto_chunk_tokens(10**12) == 1  # never zero


def test_decoder_loss_matches_the_unfused_loss_for_every_parameter():
    torch.manual_seed(0)
    model = Decoder(MODEL_PRESETS["micro"])
    idx = torch.randint(0, model.cfg.vocab_size, (3, 40))
    targets = torch.randint(0, model.cfg.vocab_size, (3, 40))
    params = [p for p in model.parameters()]
    model.loss_chunk_tokens = 0
    ref = model.loss(idx, targets)
    ref_grads = torch.autograd.grad(ref, params)
    # the plain path is exactly F.cross_entropy over forward()'s logits
    assert ref.item() == pytest.approx(F.cross_entropy(model(idx).flatten(0, 1), targets.flatten()).item(), rel=1e-6)
    model.loss_chunk_tokens = 17  # 120 tokens in 8 chunks, the last one partial
    got = model.loss(idx, targets)
    got_grads = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)
    for (name, _), g, r in zip(model.named_parameters(), got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("method", ["full", "relora"])
def test_training_results_are_unchanged_by_the_fused_loss(train_variants, method):
    """The same run with the plain loss and with small chunks: the same losses and weights, to float32 tolerance."""
    extra = ["steps=6", "checkpoint_interval=6", "eval_interval=6", "capture.enabled=false", "lr=1e-3", "prefetch=0"]
    if method == "relora":
        extra += [
            "method=relora",
            "relora.rank=4",
            "relora.alpha=8",
            "relora.merge_every=3",
            "relora.dropout=0.0",
            "relora.lr_restart_warmup=1",
            "relora.optimizer_reset=none",
        ]  # pruned Adam state would amplify rounding
    runs = train_variants(extra, {"plain": ["loss_chunk_tokens=0"], "chunked": ["loss_chunk_tokens=37"]})
    plain, chunked = runs["plain"], runs["chunked"]
    assert len(plain["loss"]) == 6
    assert chunked["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert chunked["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-5)
    for k in plain["weights"]:
        torch.testing.assert_close(chunked["weights"][k], plain["weights"][k], rtol=1e-4, atol=1e-6)
