"""The user's own code, named in a recipe: ``"mypkg.nets:resnet20"`` or ``"path/to/nets.py:resnet20"``.

A recipe's ``model.factory`` and ``data.factory`` name a function to import and call.
The part before the colon is a module importable from the current folder (or the
Python path), or a ``.py`` file (relative to the current folder); the part after
it is a name in that module, dotted for an attribute of one (``Nets.small``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Callable

__all__ = ["FactoryError", "absolute", "call_factory", "import_factory", "is_factory"]


class FactoryError(ValueError):
    """A factory that cannot be imported or called; one line naming the recipe field."""


def is_factory(spec: str) -> bool:
    """Whether ``spec`` names a function (``module:name``) rather than a registry entry."""
    return ":" in spec


def import_factory(spec: str, field: str = "factory") -> Callable[..., Any]:
    """The callable ``spec`` names.

    Args:
        spec: ``"package.module:function"`` or ``"file.py:function"``.
        field: the recipe field it came from, for error messages (e.g. ``"model.factory"``).

    Raises:
        FactoryError: a malformed spec, a module that cannot be imported, a missing name, not a callable.
    """
    module_part, sep, name = spec.rpartition(":")
    if not sep or not module_part or not name:
        raise FactoryError(f"{field}: {spec!r} is not MODULE:FUNCTION (e.g. mypkg.nets:resnet20 or nets.py:resnet20)")
    module = _module(module_part, field)
    target: Any = module
    for part in name.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise FactoryError(f"{field}: {module_part} has no {name!r}") from None
    if not callable(target):
        raise FactoryError(f"{field}: {spec} is a {type(target).__name__}, not a function")
    return target


def call_factory(spec: str, kwargs: dict[str, Any], field: str = "factory") -> Any:
    """``import_factory(spec)(**kwargs)``, an exception in the user's function told in one line."""
    fn = import_factory(spec, field)
    try:
        return fn(**kwargs)
    except Exception as e:  # the user's code: any error is theirs, told with where it came from
        detail = str(e).splitlines()[0] if str(e) else ""
        raise FactoryError(f"{field}: {spec}({_kwargs(kwargs)}) raised {type(e).__name__}"
                           f"{f': {detail}' if detail else ''}") from e


def _module(part: str, field: str):
    if part.endswith(".py"):
        return _file_module(Path(part).expanduser(), field)
    # The current folder, as `python -m` would have it (the `prunet` script does not).
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(part)
    except ModuleNotFoundError as e:
        raise FactoryError(f"{field}: cannot import {part} (no module named {e.name!r}; run from the folder "
                           f"holding it or add it to PYTHONPATH)") from None
    except Exception as e:
        raise FactoryError(f"{field}: importing {part} raised {type(e).__name__}: {e}") from e


def _file_module(path: Path, field: str):
    """A ``.py`` file as the module named by its stem, its folder on ``sys.path``.

    Imported under its own name (not a made-up one) so that what it defines pickles: a
    ``DataLoader`` worker started by ``spawn`` or ``forkserver`` imports the module by that
    name, and finds it through ``sys.path``, which it inherits.
    """
    if not path.is_file():
        raise FactoryError(f"{field}: no file {path} (relative to {os.getcwd()})")
    path = path.resolve()
    name = path.stem
    loaded = sys.modules.get(name)
    if loaded is not None:
        if Path(getattr(loaded, "__file__", "") or "").resolve() == path:
            return loaded
        raise FactoryError(f"{field}: {path} would be imported as module {name!r}, but another module of that "
                           f"name is loaded ({getattr(loaded, '__file__', None) or 'built in'}); rename the file")
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    try:
        module = importlib.import_module(name)
    except Exception as e:
        sys.modules.pop(name, None)
        raise FactoryError(f"{field}: importing {path} raised {type(e).__name__}: {e}") from e
    if Path(getattr(module, "__file__", "") or "").resolve() != path:
        raise FactoryError(f"{field}: {path} would be imported as module {name!r}, but that name finds "
                           f"{module.__file__} first; rename the file")
    return module


def absolute(spec: str) -> str:
    """``spec`` with a relative ``.py`` path made absolute (from the current folder), so it names the same file
    from anywhere: recipes store it so, and the checkpoints and resume points written from them."""
    module_part, sep, name = spec.rpartition(":")
    if sep and module_part.endswith(".py") and not Path(module_part).is_absolute():
        return f"{Path(module_part).expanduser().absolute()}:{name}"
    return spec


def _kwargs(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
