"""The user's own code, named in a recipe: ``"mypkg.nets:resnet20"`` or ``"path/to/nets.py:resnet20"``.

A recipe's ``model.factory`` and ``data.factory`` name a function to import and call.
The part before the colon is a module importable from the current folder (or the
Python path), or a ``.py`` file (relative to the current folder); the part after
it is a name in that module, dotted for an attribute of one (``Nets.small``).

A factory named in a *file* (a checkpoint's or compact file's metadata, a run folder's
``config.yaml``, a resume point) is code chosen by whoever wrote the file: it is called
only when the user trusts it (:func:`check_trusted`). The user's own recipe, named on the
command line or passed in Python, is trusted as the user's code is.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import reprlib
import sys
import zlib
from pathlib import Path
from typing import Any, Callable, Collection, Union

__all__ = ["FactoryError", "Trust", "UntrustedFactoryError", "absolute", "call_factory", "check_trusted",
           "import_factory", "is_factory"]

Trust = Union[bool, Collection[str]]
"""Which factories a file may name: ``True`` any, ``False`` none, or these specs (the user's own recipe's)."""


class FactoryError(ValueError):
    """A factory that cannot be imported or called; one line naming the recipe field."""


class UntrustedFactoryError(FactoryError):
    """A file names a factory the user did not trust; nothing was imported or called."""


def is_factory(spec: str) -> bool:
    """Whether ``spec`` names a function (``module:name``) rather than a registry entry."""
    return ":" in spec


def check_trusted(spec: str | None, trust: Trust, source: str, field: str = "model") -> None:
    """Refuse, before anything is imported, a factory that a file names and the user did not trust.

    A registry name (``lenet_300_100``) needs no trust: it calls only prunet's own builders.

    Args:
        spec: what the file asks to build (``model`` in its metadata, ``model.factory`` / ``data.factory``
            of a recipe it holds); None or a registry name passes.
        trust: ``True`` (the user said ``--trust-factory`` / ``trust_factory=True``), ``False``,
            or the specs the user's own recipe names.
        source: the file, for the message.
        field: what the file calls the spec, for the message.

    Raises:
        UntrustedFactoryError: the spec names a function and is not trusted.

    Example:
        >>> check_trusted("lenet_300_100", False, "final.prunet")
        >>> check_trusted("subprocess:run", False, "final.prunet")
        Traceback (most recent call last):
        ...
        prunet.factory.UntrustedFactoryError: final.prunet names model 'subprocess:run', code that building ...
    """
    if not spec or not is_factory(spec) or trust is True or (trust and spec in trust):
        return
    shown = spec if len(spec) <= 120 else spec[:117] + "..."
    own = ", or load into your own model: prunet.load(path, model=...)" if field == "model" else ""
    raise UntrustedFactoryError(
        f"{source} names {field} {shown!r}, code that building it would run; prunet runs no code a file names "
        f"unless you trust the file: pass --trust-factory (trust_factory=True){own}")


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
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # the user's code, sys.exit included: its error is told with where it came from
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
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        raise FactoryError(f"{field}: importing {part} raised {type(e).__name__}: {e}") from e


def _file_module(path: Path, field: str):
    """A ``.py`` file as a module: under its own name (its stem) where that name finds it, else a private one.

    Under its own name, with its folder at the end of ``sys.path``, what it defines pickles: a
    ``DataLoader`` worker started by ``spawn`` or ``forkserver`` imports the module by that name
    and finds it through the ``sys.path`` it inherits (appended, so the folder's other files never
    shadow a module of the standard library or an installed package). A stem that is not a
    module name, or that another module already takes, gets a private name instead: it works
    everywhere but in such workers (``data.workers: 0``, or a worker started by ``fork``).
    """
    if not path.is_file():
        raise FactoryError(f"{field}: no file {path} (relative to {os.getcwd()})")
    path = path.resolve()
    name = path.stem
    loaded = sys.modules.get(name)
    if loaded is not None and _is_file(loaded, path):
        return loaded
    private = f"prunet_factory_{zlib.crc32(str(path).encode()):08x}"
    if private in sys.modules:
        return sys.modules[private]
    if name.isidentifier() and loaded is None:
        spec = _find(name)
        if spec is None:  # no other module takes the name: its folder goes at the end of the path
            sys.path.append(str(path.parent))
            spec = _find(name)
        if spec is not None and spec.origin and Path(spec.origin).resolve() == path:
            return _exec(name, spec, path, field)
    return _exec(private, importlib.util.spec_from_file_location(private, path), path, field)


def _find(name: str):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def _is_file(module, path: Path) -> bool:
    file = getattr(module, "__file__", None)
    return bool(file) and Path(file).resolve() == path


def _exec(name: str, spec, path: Path, field: str):
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as e:
        sys.modules.pop(name, None)
        if isinstance(e, KeyboardInterrupt):
            raise
        raise FactoryError(f"{field}: importing {path} raised {type(e).__name__}: {e}") from e
    return module


def absolute(spec: str) -> str:
    """``spec`` with a relative ``.py`` path made absolute (from the current folder), so it names the same file
    from anywhere: recipes store it so, and the checkpoints and resume points written from them."""
    module_part, sep, name = spec.rpartition(":")
    if sep and module_part.endswith(".py"):
        return f"{Path(module_part).expanduser().resolve()}:{name}"
    return spec


_SHORT = reprlib.Repr()  # keyword arguments to Repr() came in Python 3.12
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 3, 4, 4, 40, 40


def _kwargs(kwargs: dict[str, Any]) -> str:
    """The arguments, shortened: a value can be huge (a YAML alias bomb is 9^9 elements), its message not."""
    text = ", ".join(f"{k}={_SHORT.repr(v)}" for k, v in list(kwargs.items())[:8])
    text += ", ..." if len(kwargs) > 8 else ""
    return text if len(text) <= 160 else text[:156] + " ..."
