"""Corruption campaign: bytes flipped or cut at random offsets in every kind of file a run and an analysis write.

Each case damages one file of a copy of the reference run (a checkpoint file,
a capture file, the manifest, a results table) and asks the reader that owns
it. Every case must be *detected* — an error naming the file — unless the
damage left what the reader returns unchanged (e.g. a flipped bit in unused
parquet statistics or JSON whitespace), which is counted apart as harmless.
Silent wrong data is a failure. Then ``dynamics analyze --keep-going`` on
damaged runs must name the bad file and analyse every other checkpoint.
"""

from __future__ import annotations

import random
import shutil
from collections import Counter
from pathlib import Path

import _reliability as R
import pandas as pd
import pytest

from dynamics.analyze import AnalysisError, read_results
from dynamics.cli import main
from dynamics.io import DynamicsIOError, open_run
from trainer.checkpoint import CheckpointError, load_checkpoint, read_manifest

pytestmark = pytest.mark.reliability

ANALYZE = ["--kinds", "weight,grad,act,update", "--no-circuits", "--no-progress"]


@pytest.fixture(scope="module")
def analysed(reference_run, tmp_path_factory):
    """The reference run analysed once: ``results.parquet`` and its spectra, and a copy of the run."""
    d = tmp_path_factory.mktemp("analysed")
    run = d / "run"
    shutil.copytree(reference_run, run)
    assert main(["analyze", str(run), "--out", str(d / "results.parquet")] + ANALYZE) == 0
    return run, d / "results.parquet"


def _targets(run: Path, results: Path) -> list[tuple[str, Path]]:
    m = read_manifest(run)
    out = [
        ("manifest", run / "manifest.json"),
        ("results", results),
        ("results", results.with_name("results.spectra.parquet")),
    ]
    for c in m["checkpoints"]:
        out += [("checkpoint", run / c["path"] / name) for name in c["sha256"]]
        if "dynamics" in c:
            out.append(("capture", run / c["dynamics"]["path"]))
    out += [("results", p) for p in sorted((results.parent / "results.parquet.cache").rglob("*.parquet"))]
    return out


def _detect(kind: str, path: Path, run: Path, original) -> str:
    """``detected`` (an error naming the file) or ``harmless`` (the reader returns what it did before); else raise."""
    if kind == "checkpoint":
        step = int(path.parent.name.split("_")[1])
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(run, step)
        assert str(path) in str(e.value) or path.name in str(e.value), e.value
        return "detected"
    if kind == "capture":
        step = int(path.stem.split("_")[1])
        problems = open_run(run).check()
        assert list(problems) == [step] and path.name in problems[step], problems
        return "detected"
    if kind == "manifest":
        try:
            got = read_manifest(run)
        except CheckpointError as e:
            assert "manifest.json" in str(e)
            with pytest.raises(DynamicsIOError, match="manifest.json"):
                open_run(run)
            return "detected"
        assert got == original, "a damaged manifest was read as different content without an error"
        return "harmless"
    if kind == "results":
        if ".cache" in str(path):
            try:  # the analysis cache: the same page-checksummed read as analyze_runs
                got = pd.read_parquet(path, page_checksum_verification=True)
            except Exception:
                return "detected"
            pd.testing.assert_frame_equal(got, original)
            return "harmless"
        try:
            got = (
                read_results(path)
                if path.name == "results.parquet"
                else pd.read_parquet(path, page_checksum_verification=True)
            )
        except AnalysisError as e:
            assert str(path) in str(e)
            return "detected"
        except Exception:
            return "detected"
        pd.testing.assert_frame_equal(got, original)
        return "harmless"
    raise AssertionError(kind)


def test_random_damage_is_always_detected(analysed, campaign_scale):
    run, results = analysed
    rng = random.Random(99 + campaign_scale)
    targets = _targets(run, results)
    # every target file at least once per scale unit, flipped or truncated at random
    cases = [(t, rng.choice(["flip", "truncate"])) for _ in range(campaign_scale) for t in targets]
    outcome: Counter = Counter()
    lines, failures = [], []
    for (kind, path), how in cases:
        raw = path.read_bytes()
        original = None
        if kind == "manifest":
            original = read_manifest(run)
        elif kind == "results":
            original = pd.read_parquet(path)
        try:
            what = (R.flip if how == "flip" else R.truncate)(path, rng)
            verdict = _detect(kind, path, run, original)
            outcome[(kind, verdict)] += 1
        except BaseException as e:
            failures.append(f"{kind} {path.relative_to(path.parents[2])} {how}: {type(e).__name__}: {e}")
            what = "?"
        finally:
            path.write_bytes(raw)
        lines.append(f"{kind:10s} {path.name:32s} {what}")
    summary = [f"cases: {len(cases)} over {len(targets)} files"]
    for kind in ("checkpoint", "capture", "manifest", "results"):
        summary.append(f"{kind:10s} detected={outcome[(kind, 'detected')]} harmless={outcome[(kind, 'harmless')]}")
    R.report("corruption campaign", summary + [f"silent corruption / failures: {len(failures)}", *failures])
    assert not failures, "\n".join(failures)
    assert read_manifest(run) and open_run(run).check() == {}  # every file was restored


@pytest.mark.parametrize("victim", ["weights", "capture"])
def test_analyze_keep_going_names_the_file_and_analyses_the_rest(
    reference_run, tmp_path, capsys, victim, campaign_scale
):
    rng = random.Random(7 + campaign_scale)
    for n in range(campaign_scale):
        run = tmp_path / f"run{n}"
        shutil.copytree(reference_run, run)
        entry = rng.choice(read_manifest(run)["checkpoints"][1:-1])
        step = entry["step"]
        bad = run / (entry["path"] + "/model.safetensors" if victim == "weights" else entry["dynamics"]["path"])
        (R.flip if n % 2 == 0 else R.truncate)(bad, rng)
        out = tmp_path / f"results{n}.parquet"
        capsys.readouterr()
        assert main(["analyze", str(run), "--out", str(out), "--keep-going"] + ANALYZE) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err
        failed = [line for line in err.splitlines() if line.startswith("failed:")]
        assert len(failed) == 1 and f"step {step}" in failed[0] and str(bad) in failed[0], err
        table = read_results(out)
        steps = set(table.loc[table["kind"] == "weight", "step"])
        assert steps == {c["step"] for c in read_manifest(run)["checkpoints"]} - {step}
        assert not table["value"].isna().all()
