"""Configs: presets, files, overrides, and one-line errors for every kind of mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynamics.cli import main
from trainer.config import ConfigError, build_config, config_from_dict, parse_value

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def test_precedence_preset_file_cli_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 7\nlr: 0.01\nmodel:\n  d_model: 32\n")
    cfg = build_config(preset="micro", file=f, cli={"steps": 9}, overrides=["lr=1e-3", "model.n_layers=2"])
    assert (cfg.steps, cfg.lr, cfg.model.d_model, cfg.model.n_layers) == (9, 1e-3, 32, 2)
    assert cfg.model.d_mlp == 256  # untouched preset value


def test_roundtrip_through_dict():
    cfg = build_config(preset="tiny", overrides=["method=relora", "relora.rank=8", "relora.targets=[q,v]"])
    assert cfg.relora.targets == ("q", "v")
    assert config_from_dict(cfg.to_dict()) == cfg


def test_old_relora_key_names_load_from_files_overrides_and_stored_manifests(tmp_path):
    new = build_config(overrides=["method=relora", "relora.merge_every=40", "relora.lr_restart_warmup=5"])
    assert (new.relora.merge_every, new.relora.lr_restart_warmup, new.relora.lr_restart_period) == (40, 5, 40)
    assert "reset_every" not in new.to_dict()["relora"] and "restart_warmup" not in new.to_dict()["relora"]
    # --set with the old names
    assert build_config(overrides=["method=relora", "relora.reset_every=40", "relora.restart_warmup=5"]) == new
    # a config file with the old names; a later --set of the new name still wins
    f = tmp_path / "old.yaml"
    f.write_text("method: relora\nrelora:\n  reset_every: 40\n  restart_warmup: 5\n")
    assert build_config(file=f) == new
    assert build_config(file=f, overrides=["relora.merge_every=50"]).relora.merge_every == 50
    # a manifest written before the rename
    stored = new.to_dict()
    stored["relora"]["reset_every"] = stored["relora"].pop("merge_every")
    stored["relora"]["restart_warmup"] = stored["relora"].pop("lr_restart_warmup")
    assert config_from_dict(stored) == new
    # the same value under both names is fine; different values are refused, naming both
    assert (
        build_config(
            overrides=["method=relora", "relora.reset_every=40", "relora.merge_every=40", "relora.lr_restart_warmup=5"]
        )
        == new
    )
    with pytest.raises(ConfigError, match=r"relora.reset_every=30 \(its old name\) and relora.merge_every=40") as e:
        build_config(overrides=["method=relora", "relora.reset_every=30", "relora.merge_every=40"])
    assert "unknown key" not in str(e.value)


@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("3", 3), ("true", True), ("null", None), ("abc", "abc")])
def test_parse_value(text, value):
    assert parse_value(text) == value


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["foo=1"], "unknown key 'foo'"),
        (["model.bogus=1"], "unknown key 'model.bogus'"),
        (["lr=-1"], "lr must be a positive"),
        (["lr=abc"], "lr must be float"),
        (["steps=2.5"], "steps must be int"),
        (["model.n_heads=5"], "must divide model.d_model"),
        (["batch_size=10", "grad_accum=3"], "divisible by grad_accum"),
        (["method=lora"], "method must be"),
        (["method=relora", "relora.rank=0"], "relora.rank must be > 0"),
        (["method=relora", "relora.optimizer_reset=some"], "optimizer_reset must be one of"),
        (["data.source=text"], "data.path is required"),
        (["seq_len=4096"], "seq_len=4096 must be in"),
        (["lr"], "key=value"),
    ],
)
def test_bad_settings_raise_config_error(overrides, needle):
    with pytest.raises(ConfigError, match=None) as e:
        build_config(preset="micro", overrides=overrides)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as e:
        build_config(overrides=["foo=1", "lr=-1", "model.n_heads=5"])
    msg = str(e.value)
    assert "foo" in msg and "lr must" in msg and "n_heads" in msg


def test_cli_bad_config_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--out", str(out), "--set", "lr=-1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_cli_unreadable_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    assert main(["train", "--out", str(tmp_path / "r"), "--config", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r"), "--config", str(tmp_path / "missing.yaml")]) == 2


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = build_config(file=path)
    assert cfg.steps > 0


@pytest.mark.parametrize("preset", ["micro", "tiny"])
def test_projection_shapes_are_the_models(preset):
    import torch

    from trainer.config import MODEL_PRESETS
    from trainer.model import Decoder

    cfg = MODEL_PRESETS[preset]
    with torch.device("meta"):
        state = Decoder(cfg).state_dict()
    attn = {"q", "k", "v", "o"}
    for target, shape in cfg.projection_shapes().items():
        key = f"layers.0.{'attn' if target in attn else 'mlp'}.{target}.weight"
        assert tuple(state[key].shape) == shape, target


def test_relora_rank_is_checked_against_every_wrapped_matrix():
    with pytest.raises(ConfigError, match=r"relora.rank=48 exceeds min\(out, in\) = 32 of the 32×64 'k'"):
        build_config(overrides=["method=relora", "relora.rank=48"])
    ok = build_config(overrides=["method=relora", "relora.rank=48", "relora.targets=[q,o,gate,up,down]"])
    assert ok.relora.rank == 48
    assert build_config(overrides=["method=full", "relora.rank=48"]).method == "full"  # not wrapped: not checked


@pytest.mark.parametrize("key", ["seed", "data.seed", "capture.seed"])
def test_seeds_must_fit_64_bit_generators(key):
    assert build_config(overrides=[f"{key}={2**63 - 1}"])
    for bad in (2**63, 2**64, -1):
        with pytest.raises(ConfigError, match=rf"{key} must be in \[0, 2\*\*63-1\], got {bad}"):
            build_config(overrides=[f"{key}={bad}"])


def test_given_settings_are_what_the_user_typed(tmp_path):
    from trainer.config import given_settings

    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.01\nmodel:\n  d_model: 32\nrelora:\n  reset_every: 40\n")
    given = given_settings(file=f, cli={"steps": 9, "method": None}, overrides=["capture.every=3"])
    assert given == {"lr", "model.d_model", "relora.merge_every", "steps", "capture.every"}
    assert given_settings() == frozenset() and given_settings(preset="tiny") == {"preset"}


def test_build_config_records_what_it_was_given_and_nobody_can_set_that() -> None:
    cfg = build_config(preset="micro", overrides=["steps=7", "data.seed=3"])
    assert cfg.given == {"preset", "steps", "data.seed"}
    assert "given" not in cfg.to_dict()
    assert cfg == build_config(
        preset="micro", overrides=["steps=7", "data.seed=3", "lr=" + str(cfg.lr)]
    )  # not compared
    with pytest.raises(ConfigError, match="unknown key 'given'"):
        build_config(overrides=["given=steps"])
