"""Every bad input to a shipped command is one line, `stkd <command>: error: ...`, exit 2, and nothing
written: no MLflow store, no run folder. Run in-process through `cli.main` (the same code path as the
console script), in an empty working directory; none of these cases may start Ray."""

from __future__ import annotations

import pytest
import torch

from pipeline import cli


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    return work


def inputs(folder) -> dict[str, str]:
    """Bad input files, written outside the working directory."""
    files = {
        "bad_yaml.yaml": "optim:\n  lr: [0.1\n",
        "low_high.yaml": "method: kd\nparameters:\n  optim.lr: {distribution: uniform, low: 0.5, high: 0.1}\n",
        "bad_space_yaml.yaml": "method: kd\nparameters: {optim.lr: {distribution: uniform\n",
        "text_teacher.pt": "not a checkpoint\n",
    }
    for name, text in files.items():
        (folder / name).write_text(text)
    return {name: str(folder / name) for name in files}


def cases(digits, files) -> list[tuple[list[str], str]]:
    data = f"data.path={digits}"
    return [
        (["tune", "--recipe", "test_tiny", "--space", "nosuch", data], "stkd tune: error: "),
        (["tune", "--recipe", "test_tiny", "--space", files["low_high.yaml"], data], "stkd tune: error: "),
        (["tune", "--recipe", "test_tiny", "--space", files["bad_space_yaml.yaml"], data],
         "bad_space_yaml.yaml:3:1: not valid YAML"),
        (["distill", "--recipe", files["bad_yaml.yaml"], data], "bad_yaml.yaml:3:1: not valid YAML"),
        (["teacher", "--recipe", "test_tiny", data, "train.bf16=true"],
         "stkd teacher: error: invalid configuration: train.bf16: replaced by train.precision"),
        (["teacher", "--recipe", "test_tiny", data, "train.precision=fp16"],
         "fp16 trains on CUDA devices only"),
        (["distill", "--recipe", "test_tiny", data, "method.name=kd", f"teacher.source={files['text_teacher.pt']}"],
         "stkd distill: error: "),
        (["distill", "--recipe", "test_tiny", data, "method.name=kd", "teacher.source=/no/such/teacher.pt"],
         "stkd distill: error: "),
        (["study", "--spec", "nosuch", data], "stkd study: error: study 'nosuch' not found"),
        (["eval", files["text_teacher.pt"], "--data", str(digits)], "stkd eval: error: "),
    ]


def test_bad_inputs_are_one_line_exit_2_and_write_nothing(digits, empty_cwd, tmp_path, capsys):
    files = inputs(tmp_path)
    for argv, needle in cases(digits, files):
        code = cli.main(argv)
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert code == 2, (argv, captured.err)
        assert len(lines) == 1 and lines[0].startswith(f"stkd {argv[0]}: error: "), (argv, captured.err)
        assert needle in lines[0], (argv, lines[0])
        assert "Traceback" not in captured.err + captured.out
        assert list(empty_cwd.iterdir()) == [], (argv, list(empty_cwd.iterdir()))


def test_a_teacher_of_the_wrong_shape_is_refused_before_ray(digits, empty_cwd, tmp_path, capsys):
    from pipeline.train import checkpoint
    from stkd import models

    path = tmp_path / "rgb_teacher"
    model = models.create("resnet8", 10, in_channels=3)  # digits has one channel
    checkpoint.save({"model": checkpoint.model_spec("resnet8", 10, 3), "student": model.state_dict()}, path)
    code = cli.main(["distill", "--recipe", "test_tiny", f"data.path={digits}", "method.name=kd",
                     f"teacher.source={path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "3 channels" in err[0] and "1 channels" in err[0]
    assert list(empty_cwd.iterdir()) == []
    assert torch.is_grad_enabled()
