"""Untrusted files: code-executing pickles, malicious safetensors headers, path traversal in a manifest.

Each is planted with a *consistent* manifest (its sha256 recomputed, as an
attacker who controls the folder would), so hash checks alone cannot save us:
the readers themselves must refuse. Nothing may run and nothing may be written
outside the run directory.
"""

from __future__ import annotations

import json
import os
import pickle
import struct

import _reliability as R
import pytest

from dynamics.cli import main
from dynamics.io import DynamicsIOError, open_run
from trainer.atomic import sha256_file
from trainer.checkpoint import CheckpointError, load_checkpoint, read_manifest, write_manifest

pytestmark = pytest.mark.reliability


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(run, step, name, data: bytes) -> None:
    m = read_manifest(run)
    entry = next(c for c in m["checkpoints"] if c["step"] == step)
    (run / entry["path"] / name).write_bytes(data)
    entry["sha256"][name] = sha256_file(run / entry["path"] / name)
    write_manifest(run, m)


@pytest.mark.parametrize("name", ["optimizer.pt", "rng.pt"])
def test_code_executing_pickle_is_refused(run_copy, tmp_path, name):
    run, marker = run_copy(), tmp_path / "pwned"
    assert os.system("true") == 0  # os.system works here: the payload would really run if unpickled
    _plant(run, 3, name, pickle.dumps(_Evil(marker), protocol=2))
    with pytest.raises(CheckpointError, match=name):
        load_checkpoint(run, 3)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_code_executing_pickle_given_to_analyze_is_refused(tmp_path, capsys, suffix):
    marker = tmp_path / "pwned"
    evil = tmp_path / f"model{suffix}"
    evil.write_bytes(pickle.dumps({"layers.0.attn.q.weight": _Evil(marker)}, protocol=2))
    code = main(["analyze", str(evil), "--out", str(tmp_path / "out" / "r.parquet"), "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and evil.name in err, err
    assert not marker.exists()


def _safetensors(header: dict, payload: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + payload


MALICIOUS_HEADERS = {
    "offsets beyond the file": _safetensors(
        {"embed.weight": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4_000_000]}}, b"\0" * 64
    ),
    "overlapping offsets": _safetensors(
        {
            "a.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            "b.weight": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
        },
        b"\0" * 24,
    ),
    "shape disagrees with offsets": _safetensors(
        {"a.weight": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 16]}}, b"\0" * 16
    ),
    "header length beyond the file": struct.pack("<Q", 2**40) + b"{}",
    "header not JSON": struct.pack("<Q", 8) + b"\xff\xfe{{{{{{",
}


@pytest.mark.parametrize("case", list(MALICIOUS_HEADERS))
def test_malicious_safetensors_header_is_refused(run_copy, case):
    run = run_copy()
    _plant(run, 3, "model.safetensors", MALICIOUS_HEADERS[case])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(run, 3)
    with pytest.raises(DynamicsIOError, match="model.safetensors"):
        open_run(run).weights(3)
    load_checkpoint(run, 6)  # the other checkpoints still load


@pytest.mark.parametrize(
    "field,value",
    [("path", "../../evil"), ("path", "/etc"), ("file", "../../../evil.txt"), ("dynamics", "../../evil.h5")],
)
def test_path_traversal_in_manifest_is_refused(run_copy, tmp_path, capsys, field, value, text_corpus):
    run = run_copy()
    outside = tmp_path / "evil"  # what ../../evil points at from checkpoints/ ... must stay untouched
    outside.mkdir()
    (outside / "keep.txt").write_text("precious")
    m = read_manifest(run)
    entry = m["checkpoints"][-1]
    if field == "path":
        entry["path"] = value
    elif field == "file":
        entry["sha256"][value] = "0" * 64
    else:
        entry["dynamics"]["path"] = value
    write_manifest(run, m)  # consistent checksum: only the path check stands in the way
    with pytest.raises(CheckpointError, match="refusing to read it"):
        read_manifest(run)
    with pytest.raises(DynamicsIOError, match="refusing to read it"):
        open_run(run)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code = main(R.train_argv(run, text_corpus, resume=True))
    err = capsys.readouterr().err
    assert code == 2 and "refusing to read it" in err and "Traceback" not in err
    assert (outside / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written or removed anywhere
