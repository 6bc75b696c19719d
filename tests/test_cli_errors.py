"""The `dynamics` command turns every project error into one `error:` line and an exit status, never a traceback.

Exit 2: bad input (ConfigError, DataError, EvaluationError, CheckpointError, any DynamicsError).
Exit 1: a run that failed (TrainingError, CaptureError) and a plain OSError (disk full ...).
A programming error (not a project error) is not hidden: it propagates.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path

import pytest

import dynamics.cli as cli
import trainer.commands as commands
from dynamics.analyze import ANALYSIS_KINDS
from dynamics.io import DynamicsIOError
from dynamics.validation import DynamicsError, NonFiniteError
from trainer.errors import (
    CaptureError,
    CheckpointError,
    ConfigError,
    DataError,
    EvaluationError,
    TrainerError,
    TrainingError,
)


def _raising(exc: BaseException) -> Callable[..., int]:
    def command(args: object) -> int:
        raise exc

    return command


def _run(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    module: object,
    func: str,
    exc: BaseException,
    argv: list[str],
) -> tuple[int, list[str], str]:
    monkeypatch.setattr(module, func, _raising(exc))
    status = cli.main(argv)
    out, err = capsys.readouterr()
    return status, err.splitlines(), out


CASES = [
    (CaptureError("capture of step 40 could not be written: no space left on device"), 1),
    (TrainingError("loss became NaN at step 12"), 1),
    (ConfigError("lr must be > 0, got -1"), 2),
    (DataError("corpus too small"), 2),
    (EvaluationError("no step 7 in run"), 2),
    (CheckpointError("checkpoint step_000010 is damaged: model.safetensors hash mismatch"), 2),
    (DynamicsError("argument `M` must be 2-D"), 2),
    (NonFiniteError("argument `M` contains NaN"), 2),
    (DynamicsIOError("run directory r/ has no manifest.json"), 2),
]


@pytest.mark.parametrize(("exc", "status"), CASES, ids=[type(e).__name__ for e, _ in CASES])
def test_a_project_error_in_a_trainer_command_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, exc: Exception, status: int
) -> None:
    got, err, out = _run(monkeypatch, capsys, commands, "cmd_train", exc, ["train", "--out", str(tmp_path / "run")])
    assert (got, err, out) == (status, [f"error: {exc}"], "")


@pytest.mark.parametrize(("exc", "status"), CASES, ids=[type(e).__name__ for e, _ in CASES])
def test_a_project_error_in_an_analysis_command_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, exc: Exception, status: int
) -> None:
    got, err, _ = _run(monkeypatch, capsys, cli, "_cmd_summary", exc, ["summary", str(tmp_path / "t.parquet")])
    assert (got, err) == (status, [f"error: {exc}"])


@pytest.mark.parametrize(
    "func,argv",
    [
        ("cmd_evaluate", ["evaluate", "RUN"]),
        ("cmd_export", ["export", "RUN", "OUT"]),
        ("cmd_batch_size", ["batch-size"]),
    ],
)
def test_every_trainer_command_is_covered(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], func: str, argv: list[str]
) -> None:
    got, err, _ = _run(monkeypatch, capsys, commands, func, CaptureError("writer failed"), argv)
    assert (got, err) == (1, ["error: writer failed"])


def test_the_roots_and_their_builtins() -> None:
    for cls in (ConfigError, DataError, EvaluationError, CheckpointError, CaptureError, TrainingError):
        assert issubclass(cls, TrainerError)
    assert issubclass(CheckpointError, OSError) and issubclass(DynamicsIOError, DynamicsError)


def test_project_oserrors_keep_their_message_and_status(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """CheckpointError is an OSError too: the project root wins, so no "files completed ..." advice and exit 2."""
    got, err, _ = _run(
        monkeypatch, capsys, commands, "cmd_train", CheckpointError("bad checkpoint"), ["train", "--out", str(tmp_path)]
    )
    assert (got, err) == (2, ["error: bad checkpoint"])


def test_a_plain_oserror_says_what_and_where(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    exc = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "model.safetensors"))
    got, err, _ = _run(monkeypatch, capsys, commands, "cmd_train", exc, ["train", "--out", str(tmp_path / "run")])
    assert got == 1 and len(err) == 1
    assert err[0].startswith(f"error: No space left on device: {tmp_path / 'run' / 'model.safetensors'}; ")
    assert "--resume" in err[0]


def test_ctrl_c_is_status_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    got, err, _ = _run(
        monkeypatch, capsys, commands, "cmd_train", KeyboardInterrupt(), ["train", "--out", str(tmp_path)]
    )
    assert (got, err) == (130, ["interrupted"])


@pytest.mark.parametrize("exc", [RuntimeError("a bug"), KeyError("a bug"), ValueError("not a project error")])
def test_a_programming_error_is_not_hidden(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, exc: Exception) -> None:
    monkeypatch.setattr(commands, "cmd_train", _raising(exc))
    with pytest.raises(type(exc)):
        cli.main(["train", "--out", str(tmp_path)])


def test_a_bad_flag_value_is_a_config_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Raised by the commands themselves, before any work."""
    assert cli.main(["analyze", str(tmp_path), "--kinds", "weight,nonsense", "--no-progress"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --kinds: unknown ['nonsense']; choose from {','.join(ANALYSIS_KINDS)}"
    ]
    assert cli.main(["analyze", str(tmp_path), "--workers", "0"]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: --workers must be >= 1, got 0"]
