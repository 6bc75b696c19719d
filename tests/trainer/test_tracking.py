"""Experiment tracking (trainer.tracking): config, the PER summary, missing packages, failing trackers, and a run
logged to TensorBoard, W&B (offline) and MLflow (local file store), read back with each tracker's own reader."""

from __future__ import annotations

import json
import math
import struct
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer import tracking
from trainer.config import ConfigError, ModelConfig, ReLoRAConfig, build_config
from trainer.model import Decoder
from trainer.relora import dense_state_dict, wrap_model

#: A 4-step micro ReLoRA run: evaluations and checkpoints at 0, 2, 4; a merge after update 2 (logged at step 3).
RUN = [
    "steps=4",
    "seq_len=32",
    "batch_size=8",
    "eval_interval=2",
    "checkpoint_interval=2",
    "warmup_steps=1",
    "data.train_tokens=40000",
    "data.val_tokens=4000",
    "eval_batches=1",
    "capture.enabled=false",
]
RELORA = ["method=relora", "relora.rank=4", "relora.alpha=8", "relora.merge_every=2", "relora.lr_restart_warmup=1"]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def series(run: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in records(run) if r.get(key) is not None}


# --------------------------------------------------------------------------- config


def test_logger_setting_parses_validates_and_is_not_stored() -> None:
    cfg = build_config(overrides=["logger=tensorboard,wandb", "tracking.wandb_project=p"])
    assert cfg.logger == ("tensorboard", "wandb") and cfg.tracking.wandb_project == "p"
    assert build_config().logger is None and build_config(overrides=["logger=none"]).logger is None
    stored = cfg.to_dict()  # what the manifest keeps: where a run is watched is not what it computes
    assert "logger" not in stored and "tracking" not in stored
    assert stored == build_config().to_dict()
    for bad, said in (
        ("logger=tensorbord", "logger must be some of tensorboard, wandb, mlflow"),
        ("logger=wandb,wandb", "each once"),
        ("tracking.wandb_mode=sometimes", "tracking.wandb_mode must be one of"),
        ("tracking.mlflow_experiment=", "tracking.mlflow_experiment must be a non-empty name"),
    ):
        with pytest.raises(ConfigError, match=said) as e:
            build_config(overrides=[bad])
        assert "\n" not in str(e.value)


def test_tag_names() -> None:
    assert [tracking.tag_for(k) for k in ("loss", "val_loss", "merge", "optimizer_reset", "tokens_per_s")] == [
        "train/loss",
        "eval/val_loss",
        "events/merge",
        "events/optimizer_reset",
        "train/tokens_per_s",
    ]


# --------------------------------------------------------------------------- the PER summary


def test_per_equals_dynamics_per() -> None:
    from dynamics.metrics import proportional_effective_rank as dynamics_per

    g = torch.Generator().manual_seed(0)
    low_rank = torch.randn(48, 3, generator=g) @ torch.randn(3, 40, generator=g)
    decaying = torch.randn(32, 96, generator=g) * torch.logspace(0, -6, 96)
    cases = [torch.randn(64, 64, generator=g), torch.randn(96, 24, generator=g), low_rank, decaying]
    for m in cases:
        ours = float(tracking.proportional_effective_rank(m))
        assert ours == pytest.approx(float(dynamics_per(m)), abs=1e-6)
        assert 0 < ours <= 1
    batch = torch.randn(5, 16, 40, generator=g)
    np.testing.assert_allclose(
        tracking.proportional_effective_rank(batch).numpy(), dynamics_per(batch), rtol=0, atol=1e-6
    )
    assert float(tracking.proportional_effective_rank(torch.zeros(8, 4))) == 0.0  # SPEC §5: the zero matrix → 0
    assert float(tracking.proportional_effective_rank(torch.eye(6))) == pytest.approx(1.0, abs=1e-12)


def test_weight_per_uses_the_merged_relora_weight() -> None:
    from dynamics.metrics import proportional_effective_rank as dynamics_per

    mc = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=64, max_seq_len=16)
    torch.manual_seed(0)
    model = Decoder(mc)
    base = {p: [model.get_submodule(f"layers.{i}.attn.{p}").weight.detach().clone() for i in range(2)] for p in "qv"}
    g = torch.Generator().manual_seed(1)
    wrap_model(model, ReLoRAConfig(rank=4, alpha=8.0), g)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("lora_b"):
                module.weight.copy_(torch.randn(module.weight.shape, generator=g))  # a trained adapter: B ≠ 0
    per = tracking.weight_per(dense_state_dict(model), mc.n_layers)
    assert list(per) == ["q", "k", "v", "o", "gate", "up", "down"]
    for proj in "qv":
        merged = [model.get_submodule(f"layers.{i}.attn.{proj}").effective_weight() for i in range(2)]
        assert per[proj] == pytest.approx(float(np.mean([dynamics_per(w) for w in merged])), abs=1e-6)
        frozen = float(np.mean([dynamics_per(w) for w in base[proj]]))
        assert abs(per[proj] - frozen) > 1e-3  # the adapter's update counts


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize("logger", ["tensorboard", "wandb", "mlflow"])
def test_missing_package_is_one_line_before_anything_is_written(logger, tmp_path, monkeypatch, capsys) -> None:
    from dynamics.cli import main

    monkeypatch.setitem(sys.modules, logger, None)  # `import <logger>` now raises ImportError
    out = tmp_path / "run"
    status = main(["train", "--out", str(out), "--set", f"logger={logger}", "--set", "steps=1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err == f"error: logger={logger} needs the {logger} package: pip install relora-dynamics[{logger}]"
    assert not out.exists()


class _Exploding:
    """A tracker that fails on its second scalar call."""

    name = "exploding"

    def __init__(self) -> None:
        self.calls = 0
        self.closed = False

    def log_scalars(self, step, values) -> None:
        self.calls += 1
        if self.calls >= 2:
            raise OSError("disk on fire\nsecond line")

    def log_params(self, params) -> None:
        pass

    def close(self, *, finished: bool = True) -> None:
        self.closed = True


def test_a_failing_tracker_warns_once_and_is_dropped() -> None:
    bad, good = _Exploding(), _Exploding()
    good.log_scalars = lambda step, values: None  # type: ignore[method-assign]
    trackers = tracking.Trackers([bad, good])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(5):
            trackers.log_record({"step": step, "loss": 1.0})
        trackers.close()
    messages = [str(w.message) for w in caught if issubclass(w.category, tracking.TrackerWarning)]
    assert messages == [
        "exploding tracker failed while logging step 1 (OSError: disk on fire); it is off for the rest of this run"
    ]
    assert bad.calls == 2 and not bad.closed and good.closed


@pytest.mark.slow
def test_training_completes_when_a_tracker_fails_mid_run(tmp_path, fast_overrides, monkeypatch) -> None:
    from trainer.train import train

    calls = []

    def explode(self, step, values):
        calls.append(step)
        if len(calls) > 3:
            raise RuntimeError("event file went away")

    monkeypatch.setattr(tracking.TensorBoardTracker, "log_scalars", explode)
    cfg = build_config(overrides=fast_overrides + ["steps=6", "capture.enabled=false", "logger=tensorboard"])
    with pytest.warns(tracking.TrackerWarning, match="tensorboard tracker failed while logging") as caught:
        run = train(cfg, tmp_path / "run", progress=False)
    assert len([w for w in caught if issubclass(w.category, tracking.TrackerWarning)]) == 1
    assert len(calls) == 4  # off after the failure
    assert sorted(series(run, "loss")) == [1, 2, 3, 4, 5, 6]  # training went on to the end


# --------------------------------------------------------------------------- the trackers' own readers


def wandb_history(run: Path) -> tuple[list[dict], dict]:
    """History rows and config of the one offline W&B run under ``run/wandb``, from its ``.wandb`` file.

    The file is W&B's record log: a 7-byte header (``:W&B``, magic, version), then LevelDB-log
    framing (32 KiB blocks; chunks with a 7-byte header: crc32c, length, type FULL/FIRST/MIDDLE/LAST)
    around ``wandb_internal_pb2.Record`` protobufs, decoded with W&B's own schema.
    """
    from wandb.proto import wandb_internal_pb2

    (path,) = list(run.glob("wandb/offline-run-*/run-*.wandb"))
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    chunks, partial, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            partial = chunk
        elif kind == 3:
            partial += chunk
        elif kind == 4:
            chunks.append(partial + chunk)
    history, config = [], {}
    for chunk in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        which = record.WhichOneof("record_type")
        if which == "history":
            history.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
        elif which == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    return history, config


@pytest.mark.slow
def test_every_tracker_holds_what_metrics_jsonl_holds(tmp_path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from dynamics.io import Run
    from dynamics.metrics import proportional_effective_rank as dynamics_per
    from trainer.train import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = build_config(overrides=RUN + RELORA + ["logger=tensorboard,wandb,mlflow"])
    run = train(cfg, tmp_path / "run", progress=False)
    loss, val_loss, merges = series(run, "loss"), series(run, "val_loss"), series(run, "merge")
    assert sorted(loss) == [1, 2, 3, 4] and sorted(val_loss) == [0, 2, 4] and merges == {3: 1}

    # the PER summary: dynamics' PER of the checkpoint's (merged) weights, mean over layers
    stored = Run(run)
    names = [f"layers.{i}.attn.q" for i in range(stored.n_layers)]
    per_q = {s: float(np.mean([dynamics_per(w) for w in stored.weights(s, names).values()])) for s in (0, 2, 4)}

    # TensorBoard (float32 scalars)
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    assert scalars["train/loss"] == {s: pytest.approx(v, rel=1e-6) for s, v in loss.items()}
    assert scalars["eval/val_loss"] == {s: pytest.approx(v, rel=1e-6) for s, v in val_loss.items()}
    assert scalars["events/merge"] == {3: 1.0}
    assert scalars["weights/per/q"] == {s: pytest.approx(v, abs=1e-6) for s, v in per_q.items()}
    hp = plugin_data_pb2.HParamsPluginData.FromString(acc.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert hp.session_start_info.hparams["lr"].number_value == pytest.approx(cfg.lr)
    assert hp.session_start_info.hparams["method"].string_value == "relora"

    # W&B offline run (float64)
    history, config = wandb_history(run)
    wandb_series = {}
    for row in history:
        for key, value in row.items():
            wandb_series.setdefault(key, {})[row["_step"]] = value
    assert wandb_series["train/loss"] == loss and wandb_series["eval/val_loss"] == val_loss
    assert wandb_series["events/merge"] == merges
    assert wandb_series["weights/per/q"] == {s: pytest.approx(v, abs=1e-6) for s, v in per_q.items()}
    assert config["lr"] == cfg.lr and config["relora.rank"] == 4

    # MLflow local file store
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("relora-dynamics")
    (mlrun,) = client.search_runs([experiment.experiment_id])
    assert mlrun.info.run_name == "run" and mlrun.info.status == "FINISHED"

    def history_of(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, key)}

    assert history_of("train/loss") == loss and history_of("eval/val_loss") == val_loss
    assert history_of("events/merge") == merges
    assert history_of("weights/per/q") == {s: pytest.approx(v, abs=1e-6) for s, v in per_q.items()}
    assert mlrun.data.params["lr"] == str(cfg.lr) and mlrun.data.params["relora.rank"] == "4"


@pytest.mark.slow
def test_resume_may_change_the_trackers(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainer.config import given_settings
    from trainer.train import train

    out = tmp_path / "run"
    train(build_config(overrides=[*RUN, "steps=2"]), out, progress=False)
    more = [*RUN, "steps=4", "logger=tensorboard"]
    train(build_config(overrides=more), out, resume=True, progress=False, given=given_settings(overrides=more))
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert {e.step: e.value for e in acc.Scalars("train/loss")} == {
        s: pytest.approx(v, rel=1e-6) for s, v in series(out, "loss").items() if s > 2
    }
    assert "logger" not in json.loads((out / "manifest.json").read_text())["config"]


@pytest.mark.slow
def test_divergence_is_logged_and_the_trackers_closed(tmp_path, fast_overrides, monkeypatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import trainer.train as tt
    from trainer.errors import TrainingError

    real, calls = tt.global_norm, []

    def nan_at_third_step(tensors):
        calls.append(1)
        return real(tensors) * float("nan") if len(calls) == 3 else real(tensors)

    closed = []
    monkeypatch.setattr(tt, "global_norm", nan_at_third_step)
    real_close = tracking.Trackers.close

    def close(self, **kw):
        closed.append(kw)
        real_close(self, **kw)

    monkeypatch.setattr(tracking.Trackers, "close", close)
    cfg = build_config(overrides=fast_overrides + ["steps=5", "capture.enabled=false", "logger=tensorboard"])
    with pytest.raises(TrainingError, match="diverged at step 3"):
        tt.train(cfg, tmp_path / "run", progress=False)
    assert closed == [{"finished": False}]  # closed once, as a run that ended early
    acc = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert {e.step: e.value for e in acc.Scalars("events/diverged")} == {3: 1.0}
    assert math.isnan({e.step: e.value for e in acc.Scalars("train/grad_norm")}[3])


def test_a_resumed_tensorboard_log_replaces_steps_logged_after_the_checkpoint(tmp_path) -> None:
    """A session that logged steps 1-4 and crashed after checkpoint 2: the resumed session's steps 3-4 replace
    the lost session's, instead of each step appearing twice."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = tracking.TensorBoardTracker(tmp_path)
    for step in (1, 2, 3, 4):
        first.log_scalars(step, {"train/loss": float(step)})
    first.close()
    resumed = tracking.TensorBoardTracker(tmp_path, purge_step=3)
    for step in (3, 4, 5):
        resumed.log_scalars(step, {"train/loss": 10.0 * step})
    resumed.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1), (2, 2), (3, 30), (4, 40), (5, 50)]
