"""The command line: output of `probe` and `examples`, TARGET loading, and one-line errors."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from autobatch import InvalidInputError, Task
from autobatch.cli import main
from autobatch.examples import EXAMPLES
from autobatch.target import load_task

REPO = Path(__file__).resolve().parents[1]

TASK_FILE = """
import torch
from torch import nn

from autobatch import Task


def make_task():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=generator)
    y = torch.randint(0, 4, (512,), generator=generator)
    return Task(
        model=lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)),
        train_data=(x, y),
        loss=nn.functional.cross_entropy,
        name="file-task",
    )


TASK = make_task()
number = 3


def wrong_type():
    return {"model": None}


def forgot_return():
    make_task()


def fails():
    raise ValueError("no data in /nowhere\\nsecond line")


def needs_argument(size):
    return make_task()
"""


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    directory = tmp_path / "probe-cache"
    monkeypatch.setenv("AUTOBATCH_CACHE_DIR", str(directory))
    return directory


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "my_tasks.py"
    path.write_text(TASK_FILE)
    return path


def _error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("autobatch: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


# -- probe --------------------------------------------------------------------------------


def test_probe_digits_prints_table_and_summary(capsys):
    code = main(["probe", "digits", "--device", "cpu", "--memory-budget", "4MiB", "--no-cache"])
    out = capsys.readouterr().out
    assert code == 0
    header, rule, *_ = out.splitlines()
    assert header.split() == ["batch", "size", "result", "peak", "memory", "seconds", "phase"]
    assert set(rule.replace(" ", "")) == {"-"}
    assert "fits" in out and "measure" in out and "MiB" in out
    table, summary_text = out.split("\n\n")
    assert len(table.splitlines()) >= 3  # header, rule, at least one attempt
    summary = dict(line.split("  ", 1) for line in summary_text.strip().splitlines())
    summary = {key.strip(): value.strip() for key, value in summary.items()}
    assert int(summary["batch size"].split()[0]) >= 1
    assert summary["capacity"] == "4.00 MiB"
    assert summary["cached"] == "no"
    assert "fixed +" in out and "per sample" in out


def test_probe_json_parses(task_file, capsys):
    code = main(["probe", f"{task_file}:make_task", "--memory-budget", "1MiB", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["batch_size"] >= 1
    assert result["capacity_bytes"] == 2**20
    assert result["attempts"][0]["phase"] == "measure"


def test_probe_file_target_bounds_and_cache(task_file, cache_dir, capsys):
    args = ["probe", f"{task_file}:make_task", "--memory-budget", "1MiB", "--json"]
    args += ["--max-batch-size", "96", "--multiple-of", "8"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["batch_size"] % 8 == 0 and first["batch_size"] <= 96
    assert not first["cached"]
    assert list(cache_dir.glob("*.json"))

    assert main(["probe", f"{task_file}:TASK", *args[2:]]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["cached"] and second["batch_size"] == first["batch_size"]


def test_verbose_sets_the_log_level():
    logger = logging.getLogger("autobatch")
    try:
        assert main(["examples", "-vv"]) == 0
        assert logger.level == logging.DEBUG
        assert main(["examples"]) == 0
        assert logger.level == logging.WARNING
    finally:
        logger.setLevel(logging.NOTSET)


# -- examples, help -----------------------------------------------------------------------


def test_examples_lists_every_builtin_with_its_description(capsys):
    assert main(["examples"]) == 0
    out = capsys.readouterr().out
    for name, factory in EXAMPLES.items():
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert factory.__doc__.strip().splitlines()[0] in line


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "probe" in capsys.readouterr().out
    assert main(["probe", "--help"]) == 0
    assert "--memory-budget" in capsys.readouterr().out


# -- bad input: exit code 2, one line, no traceback ---------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], "choose a command"),
        (["frobnicate"], "invalid choice"),
        (["probe"], "TARGET"),
        (["probe", "digits"], "--memory-budget"),
        (["probe", "digits", "--memory-budget", "lots"], "'lots' does not parse as a size"),
        (["probe", "digits", "--memory-budget", "4MiB", "--headroom", "1.5"], "headroom=1.5"),
        (["probe", "digits", "--memory-budget", "4MiB", "--headroom", "x"], "invalid float"),
        (["probe", "digits", "--memory-budget", "4MiB", "--multiple-of", "0"], "multiple_of"),
        (["probe", "digits", "--device", "gpu", "--memory-budget", "4MiB"], "not a torch device"),
        (["probe", "no_such_example"], "digits, blobs, mlp, cnn, transformer"),
        (["probe", "no_such_module_abc:make"], "no module named 'no_such_module_abc'"),
        (["probe", "missing/tasks.py:make"], "does not exist"),
        (["tune", "digits", "--devices", "cpu,bogus"], "'bogus' is not a torch device"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, expected, capsys):
    assert main(args) == 2
    assert expected in _error_line(capsys)


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="CUDA is there, so --device cuda works"
)
def test_cuda_without_cuda_is_bad_input(capsys):
    assert main(["probe", "digits", "--device", "cuda"]) == 2
    assert "no CUDA device" in _error_line(capsys)
    assert main(["probe", "digits", "--device", "cuda", "--plan-for", "4MiB"]) == 2
    assert "a plan needs no card" in _error_line(capsys)


def test_a_reader_that_closes_the_pipe_ends_the_command_quietly(monkeypatch, capsys):
    read, write = os.pipe()
    os.close(read)  # ``autobatch examples | head -0``
    with os.fdopen(write, "w", buffering=1) as closed:
        monkeypatch.setattr(sys, "stdout", closed)
        assert main(["examples"]) == 141
        closed.write("more")  # stdout now goes nowhere, so the exit's flush cannot fail
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("attribute", "expected"),
    [
        ("wrong_type", "returned a dict; the function must return autobatch.Task"),
        ("forgot_return", "returned None"),
        ("fails", "raised ValueError: no data in /nowhere second line"),
        ("needs_argument", "requires (size)"),
        ("number", "of type int, not a function"),
        ("make_tsk", "did you mean 'make_task'?"),
    ],
)
def test_bad_file_targets(task_file, attribute, expected, capsys):
    assert main(["probe", f"{task_file}:{attribute}", "--memory-budget", "1MiB"]) == 2
    assert expected in _error_line(capsys)


def test_batch_size_one_that_does_not_fit_is_bad_input(task_file, capsys):
    assert main(["probe", f"{task_file}:make_task", "--memory-budget", "4KiB"]) == 2
    assert "batch size 1 does not fit" in _error_line(capsys)


def test_module_that_fails_to_import(tmp_path, monkeypatch, capsys):
    (tmp_path / "broken_tasks_mod.py").write_text("import not_installed_package_xyz\n")
    monkeypatch.chdir(tmp_path)
    assert main(["probe", "broken_tasks_mod:make", "--memory-budget", "1MiB"]) == 2
    line = _error_line(capsys)
    assert "not_installed_package_xyz" in line and "ModuleNotFoundError" in line
    assert "broken_tasks_mod" not in sys.modules


def test_file_with_syntax_error(tmp_path, capsys):
    path = tmp_path / "syntax.py"
    path.write_text("def make(:\n")
    assert main(["probe", f"{path}:make", "--memory-budget", "1MiB"]) == 2
    assert "SyntaxError" in _error_line(capsys)


# -- load_task ----------------------------------------------------------------------------


def test_load_task_builtin_and_module_forms():
    assert load_task("digits").name == "digits"
    assert load_task("autobatch.examples:digits").name == "digits"


def test_load_task_file_imports_its_neighbours(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "neighbour_width_mod.py").write_text("WIDTH = 24\n")
    (tmp_path / "with_neighbour.py").write_text(
        TASK_FILE.replace("nn.Linear(16, 32)", "nn.Linear(16, WIDTH)")
        .replace("nn.Linear(32, 4)", "nn.Linear(WIDTH, 4)")
        .replace(
            "from autobatch import Task",
            "from autobatch import Task\nfrom neighbour_width_mod import WIDTH",
        )
    )
    try:
        task = load_task(f"{tmp_path / 'with_neighbour.py'}:make_task")
    finally:
        sys.modules.pop("neighbour_width_mod", None)
    assert isinstance(task, Task) and task.model()[0].out_features == 24
    assert str(tmp_path) not in sys.path


def test_load_task_module_from_current_directory(task_file, monkeypatch):
    monkeypatch.chdir(task_file.parent)
    try:
        assert load_task("my_tasks:make_task").name == "file-task"
    finally:
        sys.modules.pop("my_tasks", None)


def test_load_task_errors_keep_the_cause(task_file):
    with pytest.raises(InvalidInputError) as info:
        load_task(f"{task_file}:fails")
    assert isinstance(info.value.__cause__, ValueError)


# -- end to end ---------------------------------------------------------------------------


def test_console_entry_point_exit_codes(task_file, tmp_path):
    env = {**os.environ, "AUTOBATCH_CACHE_DIR": str(tmp_path / "cache")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "autobatch.cli", "probe"]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*command, *args], capture_output=True, text=True, env=env, timeout=120
        )

    bad = run("digits", "--memory-budget", "lots")
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.strip().startswith("autobatch: error: ")
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr

    good = run(f"{task_file}:make_task", "--memory-budget", "1MiB", "--json")
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["batch_size"] >= 1
