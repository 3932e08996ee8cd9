"""Turn a command-line TARGET into a Task: a built-in example, ``module:function`` or
``path/to/file.py:function``.

The function is called with no arguments and returns an :class:`autobatch.Task` (or another
:class:`autobatch.Workload`); a module-level one works too. Every way this can go wrong raises
:class:`InvalidInputError` with a one-line message that names the target and the fix; the
original exception, where there is one, is kept as ``__cause__`` for ``--verbose`` output.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from autobatch.errors import InvalidInputError
from autobatch.examples import EXAMPLES, example
from autobatch.workload import Workload

_FORMS = "a built-in example, package.module:function or path/to/file.py:function"


def load_task(target: str) -> Workload:
    """The Task (or other Workload) that ``target`` names.

    ``target`` is the name of a built-in example (``"digits"``; see
    ``autobatch.examples.EXAMPLES``), ``"package.module:function"`` (importable from the
    current directory or the environment) or ``"path/to/file.py:function"`` (loaded by path,
    with the file's folder on ``sys.path`` while it is imported and the function runs, so it
    can import its neighbours).

    Example::

        task = load_task("digits")
        task = load_task("my_project.tasks:make_task")
        task = load_task("experiments/cifar.py:task")
    """
    if not isinstance(target, str) or not target.strip():
        raise InvalidInputError(f"the target must be {_FORMS}; got {target!r}")
    target = target.strip()
    location, sep, attribute = target.rpartition(":")
    if not sep:
        return _builtin(target)
    if not location or not attribute:
        raise InvalidInputError(
            f"target {target!r} needs both parts around ':', e.g. my_tasks:make_task or "
            "path/to/file.py:make_task"
        )
    if _is_path(location):
        path = Path(location).expanduser()
        folder = path.resolve().parent
        with _on_sys_path(folder):
            module = _import_file(path, target)
            return _build(module, attribute, target)
    # Like `python -m`, resolve module targets from the current directory as well.
    with _on_sys_path(Path.cwd()):
        module = _import_module(location, target)
        return _build(module, attribute, target)


def _builtin(name: str) -> Workload:
    if name in EXAMPLES:
        return example(name)
    if _is_path(name):
        raise InvalidInputError(
            f"target {name!r} names a file but no function; write it as "
            f"{name}:function_name, where the function returns an autobatch.Task"
        )
    raise InvalidInputError(
        f"{name!r} is not a built-in example ({', '.join(EXAMPLES)}); for your own task give "
        "package.module:function or path/to/file.py:function"
    )


def _is_path(location: str) -> bool:
    return location.endswith(".py") or "/" in location or os.sep in location


@contextlib.contextmanager
def _on_sys_path(folder: Path) -> Iterator[None]:
    entry = str(folder)
    if entry in sys.path or (entry == os.getcwd() and "" in sys.path):
        yield
        return
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)


def _describe(exc: BaseException) -> str:
    """``Type: message`` on one line."""
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _import_module(name: str, target: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (name == missing or name.startswith(missing + ".")):
            raise InvalidInputError(
                f"target {target!r}: no module named {name!r}; the module must be importable "
                f"(installed, or under the current directory {os.getcwd()}) or be given as a "
                "path to a .py file, e.g. path/to/tasks.py:make_task"
            ) from exc
        raise InvalidInputError(
            f"target {target!r}: importing {name!r} failed: {_describe(exc)}; install what it "
            "imports"
        ) from exc
    except Exception as exc:  # any error in the user's module: report it, don't crash
        raise InvalidInputError(
            f"target {target!r}: importing {name!r} raised {_describe(exc)}"
        ) from exc


def _module_name(path: Path) -> str:
    # A private name: a file called random.py or test.py must not replace a real module.
    stem = re.sub(r"\W", "_", path.stem)
    return f"_autobatch_target_{stem}_{abs(hash(str(path.resolve()))):x}"


def _import_file(path: Path, target: str) -> ModuleType:
    if not path.exists():
        raise InvalidInputError(
            f"target {target!r}: file {str(path)!r} does not exist "
            f"(relative to the current directory {os.getcwd()})"
        )
    if not path.is_file() or path.suffix != ".py":
        raise InvalidInputError(
            f"target {target!r}: {str(path)!r} is not a .py file; give path/to/file.py:function"
        )
    name = _module_name(path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise InvalidInputError(f"target {target!r}: cannot load {str(path)!r} as Python")
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs, as an import would: dataclasses and pickling look it up.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # any error in the user's file: report it, don't crash
        del sys.modules[name]
        raise InvalidInputError(
            f"target {target!r}: running {str(path)!r} raised {_describe(exc)}"
        ) from exc
    return module


def _candidates(module: ModuleType) -> list[str]:
    """Names in ``module`` that could be a target: its own public functions and workloads."""
    names = []
    for name, value in vars(module).items():
        if name.startswith("_"):
            continue
        if isinstance(value, Workload) or (
            inspect.isfunction(value) and value.__module__ == module.__name__
        ):
            names.append(name)
    return names


def _build(module: ModuleType, attribute: str, target: str) -> Workload:
    try:
        obj = getattr(module, attribute)
    except AttributeError:
        candidates = _candidates(module)
        close = difflib.get_close_matches(attribute, candidates, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        found = ", ".join(candidates) if candidates else "no functions or Task objects"
        raise InvalidInputError(
            f"target {target!r}: the module has no {attribute!r}; {hint}it defines: {found}"
        ) from None
    if isinstance(obj, Workload):
        return obj
    if not callable(obj):
        raise InvalidInputError(
            f"target {target!r} is of type {type(obj).__name__}, not a function; point it at a "
            "function that returns an autobatch.Task (or at a Task object)"
        )
    _check_no_required_arguments(obj, target)
    try:
        task = obj()
    except InvalidInputError as exc:  # the Task's own validation: its message says the fix
        raise InvalidInputError(f"target {target!r}: {exc}") from exc
    except Exception as exc:  # any error in the user's function: report it, don't crash
        raise InvalidInputError(
            f"target {target!r}: building the task raised {_describe(exc)}"
        ) from exc
    if not isinstance(task, Workload):
        raise InvalidInputError(
            f"target {target!r} returned {_kind(task)}; the function must return "
            "autobatch.Task(model=..., train_data=..., loss=...) or another autobatch.Workload"
        )
    return task


def _check_no_required_arguments(obj: Any, target: str) -> None:
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):  # a builtin or C callable without a signature: just call it
        return
    required = [
        p.name
        for p in signature.parameters.values()
        if p.default is p.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    if required:
        raise InvalidInputError(
            f"target {target!r} is called with no arguments, but it requires "
            f"({', '.join(required)}); give them defaults or wrap it in a function without any"
        )


def _kind(value: Any) -> str:
    if value is None:
        return "None (is a 'return' missing?)"
    return f"a {type(value).__module__}.{type(value).__qualname__}".replace(" builtins.", " ")
