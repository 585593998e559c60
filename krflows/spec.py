r"""Targets named by a string: a registered name, ``path/file.py:attr`` or ``package.module:attr``.

:func:`resolve_target` is what ``krflows fit --model.target SPEC`` and
:class:`~krflows.lightning.KRFlowModule` (``target="..."``) call, so that a checkpoint, which
stores the string, rebuilds the same target when it is loaded. The object a spec names may be

* a callable ``log_prob(x: (n, d)) -> (n,)`` (``dim`` is then required, unless the object has
  an integer ``.dim``),
* a :class:`~krflows.targets.Target` instance, or a ``Target`` subclass (built with the
  options as keyword arguments),
* a Pyro model: a callable that, run under ``pyro.poutine.trace`` with the options as
  keyword arguments, samples latent sites. It becomes
  :func:`krflows.pyro.potential_from_model` (its unconstrained latent space; ``unpack`` maps
  points to the sites).

Pyro is imported only to tell a model from a log density; this module sits beside
:mod:`krflows.lightning` and the command line, above the core.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
import warnings

import torch

from krflows.targets import TARGETS, Target, as_target, get_target

__all__ = ["resolve_target", "import_object", "is_pyro_model"]


def import_object(spec: str) -> object:
    """The object named by ``"path/to/file.py:attr"`` or ``"package.module:attr"``.

    ``attr`` may be dotted (``"module:Class.attr"``). A file path is read relative to the
    current directory; the file is imported as a module of its own (its name hashed from the
    absolute path), once per process.

    Raises:
        ValueError: the file or module is not found, cannot be imported, or lacks ``attr``;
            the message names the spec and, for a missing attribute, what the module defines.

    Example:
        >>> import_object("krflows.targets:Banana").__name__
        'Banana'
    """
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise ValueError(f"a target spec is path/to/file.py:NAME or package.module:NAME, got {spec!r}")
    if where.endswith(".py") or "/" in where or os.sep in where:
        module = _import_file(where, spec)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            hint = ""
            local = where.replace(".", os.sep) + ".py"
            if os.path.isfile(local):  # a file here: the krflows script does not import from the cwd
                hint = f"; for the file {local} in this directory, give the path: {local}:{attr}"
            raise ValueError(f"cannot import module {where!r} of the target {spec!r}: {err}{hint}") from err
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(k for k, v in vars(module).items()
                           if not k.startswith("_") and (callable(v) or isinstance(v, Target))
                           and getattr(v, "__module__", module.__name__) == module.__name__)
            raise ValueError(f"{where} has no attribute {attr!r} (the target {spec!r}); it defines: "
                             f"{', '.join(names) or 'no callable'}")
        obj = getattr(obj, part)
    return obj


def _import_file(path: str, spec: str):
    full = os.path.abspath(path)
    if not os.path.isfile(full):
        raise ValueError(f"target file not found: {path} (the target {spec!r}; relative paths are read "
                         f"from the current directory {os.getcwd()})")
    name = "krflows_user_" + hashlib.sha1(full.encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, full)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise ValueError(f"importing the target file {path} failed: {type(err).__name__}: {err}") from err
    return module


def is_pyro_model(obj: object, options: dict | None = None) -> bool:
    """Whether ``obj(**options)`` run under ``pyro.poutine.trace`` samples latent sites.

    A callable that needs an argument the options do not give (a log density ``f(x)``) is not
    run and is not a model. Errors of a run are raised.
    """
    if not callable(obj) or isinstance(obj, type | Target):
        return False
    try:
        inspect.signature(obj).bind(**(options or {}))
    except TypeError:
        return False
    except ValueError:  # no signature (a builtin): not a Python model
        return False
    try:
        from pyro import poutine
    except ImportError:
        return False
    trace = poutine.block(poutine.trace(obj).get_trace)(**(options or {}))
    return any(site["type"] == "sample" and not site["is_observed"] for site in trace.nodes.values())


def resolve_target(spec: str, options: dict | None = None, dim: int | None = None) -> Target:
    r"""Builds the target named by ``spec``: a registered name or an importable object.

    Arguments:
        spec: a key of :data:`krflows.targets.TARGETS` (``"banana"``), or
            ``"path/to/file.py:NAME"`` / ``"package.module:NAME"`` naming a log-density
            callable, a :class:`~krflows.targets.Target` (instance or class) or a Pyro model.
        options: keyword arguments of a registered target, a ``Target`` class or a Pyro model.
        dim: the dimension of a log-density callable (required unless it has ``.dim``);
            checked against the target's own otherwise.

    Returns:
        A :class:`~krflows.targets.Target`; a Pyro model gives a
        :class:`~krflows.pyro.ModelPotential`.

    Raises:
        ValueError: with a message that names the spec and what was expected (file or
            attribute not found, not callable, a missing ``dim``, a wrong return shape).

    Example:
        >>> resolve_target("banana").dim
        2
        >>> resolve_target("krflows.targets:Funnel", {"dim": 4}).dim
        4
    """
    options = dict(options or {})
    if ":" not in spec:
        try:
            target = get_target(spec, **options)
        except ValueError as err:
            if not str(err).startswith("unknown target"):
                raise
            raise ValueError(f"unknown target {spec!r}; choose one of {sorted(TARGETS)}, or name your own: "
                             f"path/to/file.py:NAME or package.module:NAME") from None
        return _check_dim(target, dim, spec)
    obj = import_object(spec)
    if isinstance(obj, type) and issubclass(obj, Target):
        return _check_dim(obj(**options), dim, spec)
    if isinstance(obj, Target | torch.distributions.Distribution):
        _no_options(options, spec, "a target object")
        return _check_dim(as_target(obj), dim, spec)
    if not callable(obj) and not callable(getattr(obj, "log_prob", None)):
        raise ValueError(f"the target {spec!r} is a {type(obj).__name__}, not a log-density callable "
                         f"log_prob(x) -> (n,), a krflows Target or a Pyro model")
    if is_pyro_model(obj, options):
        return _check_dim(_potential(obj, options, spec), dim, spec)
    _no_options(options, spec, "a log-density callable")
    own = getattr(obj, "dim", None)
    if dim is None and not (isinstance(own, int) and not isinstance(own, bool)):
        raise ValueError(f"the target {spec!r} is a log-density callable without a .dim: give its "
                         f"dimension, dim=N (on the command line --model.dim N)")
    target = as_target(obj, dim=dim)
    _probe(target, spec)
    return target


def _potential(model, options: dict, spec: str) -> Target:
    """The model's potential, vectorized over a batch of points where the model broadcasts,
    else one model run per point (with a warning)."""
    from krflows.pyro import potential_from_model

    potential = potential_from_model(model, **options)
    try:
        potential.log_prob(torch.zeros(2, potential.dim, dtype=potential.dtype))
    except Exception as err:  # noqa: BLE001 - any failure of the batched run: fall back, then probe
        warnings.warn(f"the Pyro model {spec!r} does not broadcast over a batch of points "
                      f"({type(err).__name__}: {str(err).splitlines()[0]}): its potential runs the model "
                      f"once per point, which is slower; put its observations in a pyro.plate to vectorize",
                      stacklevel=3)
        potential = potential_from_model(model, vectorize=False, **options)
        _probe(potential, spec)
    return potential


def _check_dim(target: Target, dim: int | None, spec: str) -> Target:
    if dim is not None and target.dim != dim:
        raise ValueError(f"the target {spec!r} has dimension {target.dim}, but dim={dim} was given")
    return target


def _no_options(options: dict, spec: str, what: str) -> None:
    if options:
        raise ValueError(f"the target {spec!r} is {what}, which takes no options, got {sorted(options)} "
                         f"(options go to registered targets, Target classes and Pyro models)")


def _probe(target: Target, spec: str) -> None:
    """Evaluates a callable target once on a batch ``(2, d)``, so that a wrong signature or
    return shape is reported now, naming the spec, rather than at the first training step."""
    x = torch.zeros(2, target.dim, dtype=torch.get_default_dtype())
    try:
        target.log_prob(x)
    except ValueError as err:
        raise ValueError(f"the target {spec!r}: {err}") from err
    except Exception as err:  # noqa: BLE001 - any failure of the user's code, reported with the spec
        raise ValueError(f"the target {spec!r} failed on a batch x of shape (2, {target.dim}); expected "
                         f"log_prob(x) -> (2,): {type(err).__name__}: {err}") from err
