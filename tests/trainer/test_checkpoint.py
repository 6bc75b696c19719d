"""Atomic writes and checkpoint integrity."""

from __future__ import annotations

import json

import pytest

from trainer.atomic import atomic_write_bytes, atomic_write_dir
from trainer.checkpoint import CheckpointError, load_checkpoint, read_manifest
from trainer.config import build_config
from trainer.errors import TrainerError
from trainer.train import train


def test_atomic_write_keeps_old_content_on_failure(tmp_path):
    p = tmp_path / "f.json"
    atomic_write_bytes(p, b"old")

    def boom(path):
        path.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    from trainer.atomic import atomic_write

    with pytest.raises(OSError):
        atomic_write(p, boom)
    assert p.read_bytes() == b"old"
    assert [f.name for f in tmp_path.iterdir()] == ["f.json"]  # no temp file left behind


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    def fill(d):
        (d / "a").write_text("x")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        atomic_write_dir(tmp_path / "step_000001", fill)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_run(tmp_path, fast_overrides):
    cfg = build_config(overrides=fast_overrides + ["steps=5"])
    return train(cfg, tmp_path / "run", progress=False)


def test_manifest_is_self_describing(small_run):
    m = read_manifest(small_run)
    assert m["schema_version"] == 1 and m["config"]["steps"] == 5 and m["seed"] == 0
    assert set(m["code_version"]) == {"package", "git_commit", "torch"}
    assert [c["step"] for c in m["checkpoints"]] == [0, 5]
    entry = m["checkpoints"][-1]
    assert set(entry["sha256"]) == {"model.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json"}
    assert entry["tokens_seen"] == 5 * 8 * 32 and entry["loss"] > 0
    lines = [json.loads(x) for x in (small_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2, 3, 4, 5]
    assert {"loss", "lr", "grad_norm", "tokens_seen", "tokens_per_s"} <= set(lines[3])


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.pt", "trainer_state.json"])
def test_corrupted_file_detected_by_hash(small_run, victim):
    path = small_run / "checkpoints" / "step_000005" / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"step_000005/{victim} is corrupted") as e:
        load_checkpoint(small_run)
    assert isinstance(e.value, OSError) and isinstance(e.value, TrainerError)  # a damaged file, from the trainer
    load_checkpoint(small_run, step=0)  # the others are fine


def test_unknown_future_schema_refused(small_run):
    m = read_manifest(small_run)
    m["schema_version"] = 99
    (small_run / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="newer than this toolkit"):
        read_manifest(small_run)


def test_optimizer_state_is_loaded_without_arbitrary_unpickling(small_run, tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = small_run / "checkpoints" / "step_000005" / "optimizer.pt"
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError):
        load_checkpoint(small_run, verify=False)


def _library_disk_errors():
    """What safetensors, torch.save and h5py raise on a full disk (their real types and messages)."""
    from safetensors import SafetensorError

    return {
        "safetensors": SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
        "torch.save": RuntimeError(
            "[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0. "
            "PytorchStreamWriter failed writing file data/0: file write failed"
        ),
        "h5py": OSError(
            "[Errno 28] Unable to synchronously create dataset (file write failed: time = Mon, "
            "errno = 28, error message = 'No space left on device')"
        ),
        "pyarrow": OSError(28, "Error writing bytes to file. Detail: [errno 28] No space left on device"),
        "open() without a file name": OSError(28, "No space left on device"),
    }


@pytest.mark.parametrize("library", ["safetensors", "torch.save", "h5py", "pyarrow", "open() without a file name"])
@pytest.mark.parametrize("writer", ["atomic_write", "atomic_write_dir"])
def test_disk_full_from_any_library_becomes_one_enospc_oserror(tmp_path, monkeypatch, library, writer):
    import errno

    from trainer import atomic

    monkeypatch.setattr(atomic, "_free_bytes", lambda path: 0)  # torch says only "file write failed": the disk is full
    error = _library_disk_errors()[library]

    def fail(path):
        raise error

    target = tmp_path / "thing"
    with pytest.raises(OSError) as e:
        getattr(atomic, writer)(target, fail)
    assert type(e.value) is OSError and e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    assert e.value.__cause__ is error  # the library's own error stays chained, for debugging
    assert list(tmp_path.iterdir()) == []  # no temporary file left


def test_other_errors_are_not_mistaken_for_a_full_disk(tmp_path, monkeypatch):
    from trainer import atomic

    monkeypatch.setattr(atomic, "_free_bytes", lambda path: 10**12)
    for error in (
        RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),  # disk not full
        OSError("Unable to synchronously create dataset (name already exists)"),
        ValueError("No space left on device"),  # not an I/O error type
    ):
        assert atomic.disk_error(error, tmp_path / "x") is None


def test_manifest_is_strict_json(small_run):
    from trainer.checkpoint import write_manifest

    m = read_manifest(small_run)
    m["checkpoints"][-1]["val_loss"] = float("nan")
    write_manifest(small_run, m)
    text = (small_run / "manifest.json").read_text()
    assert "NaN" not in text and read_manifest(small_run)["checkpoints"][-1]["val_loss"] is None


def test_every_damaged_file_of_a_checkpoint_is_named_in_the_manifest_order(tmp_path):
    """The files are hashed on threads; the problems still come back one per bad file, in the entry's order, with
    the capture file last."""
    import hashlib

    from trainer.run_format import checkpoint_file_problems

    ckpt = tmp_path / "checkpoints" / "step_000004"
    ckpt.mkdir(parents=True)
    contents = {name: name.encode() * 4096 for name in ("model.safetensors", "adapters.safetensors", "rng.pt")}
    for name, data in contents.items():
        (ckpt / name).write_bytes(data)
    (tmp_path / "step_000004.h5").write_bytes(b"capture")
    entry = {
        "path": "checkpoints/step_000004",
        "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()},
        "dynamics": {"path": "step_000004.h5", "sha256": hashlib.sha256(b"capture").hexdigest()},
    }
    assert checkpoint_file_problems(tmp_path, entry, capture=True) == []
    (ckpt / "model.safetensors").write_bytes(b"flipped" + contents["model.safetensors"][7:])
    (ckpt / "rng.pt").unlink()
    (tmp_path / "step_000004.h5").write_bytes(b"Capture")
    problems = checkpoint_file_problems(tmp_path, entry, capture=True)
    assert [(path.name, problem.split(" is ")[1].split(":")[0]) for path, problem in problems] == [
        ("model.safetensors", "corrupted"),
        ("rng.pt", "missing (listed in the manifest)"),
        ("step_000004.h5", "corrupted"),
    ]
    assert checkpoint_file_problems(tmp_path, entry, files=["adapters.safetensors"]) == []
