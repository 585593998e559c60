r"""One-call saving and loading of a :class:`~krflows.KRFlow`: its configuration and weights in one file.

The file is a :func:`torch.save` archive of plain Python values and tensors only, so
:func:`load` reads it with ``torch.load(weights_only=True)`` (no code runs on loading)::

    {"format": "krflows.KRFlow", "format_version": 1,
     "krflows_version": "0.1.0", "torch_version": "2.5.1",
     "config": {"dim": 3, "family": "spline", "family_options": {"bins": 8, ...},
                "layers": 4, "hidden": [64, 64], "order": None, "affine_stage": True,
                "compile": None, "dtype": "float32"},
     "state_dict": {...}}

``config`` holds the constructor arguments, read back from the flow
(:func:`flow_config`), and :func:`flow_from_config` rebuilds an untrained flow from it.
Only the built-in families (:data:`~krflows.transforms.monotone.FAMILIES`) are rebuilt
by name; a flow with a family of your own cannot be saved this way (save its
``state_dict`` and rebuild it with the family yourself). Lightning checkpoints of
:class:`~krflows.lightning.KRFlowModule` carry the same ``config``, so a module trained
with an injected flow reloads with ``KRFlowModule.load_from_checkpoint(path)``.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch

from krflows.flows import KRFlow
from krflows.transforms.monotone import FAMILIES

__all__ = ["save", "load", "flow_config", "flow_from_config", "FORMAT_VERSION"]

FORMAT = "krflows.KRFlow"
#: the version of the file layout this krflows writes; it reads this one and older ones
FORMAT_VERSION = 1
_PLAIN = (bool, int, float, str, type(None))


def _plain(value: Any, what: str) -> Any:
    """``value`` as plain Python (for ``weights_only`` loading), or ``ValueError`` naming ``what``."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v, what) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, what) for k, v in value.items()}
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # NumPy and torch scalars
        return value.item()
    raise ValueError(f"cannot save {what}={value!r} ({type(value).__name__}): only plain numbers, "
                     f"strings, booleans, None, lists and dicts of them can be stored")


def flow_config(flow: KRFlow) -> dict:
    r"""The constructor configuration of ``flow`` as plain Python values.

    Read back from the flow's structure (family, conditioner widths, variable order,
    affine stage, compile options, dtype), so it is also right for a flow built with a
    family instance such as ``Spline(bins=4, affine=False)``.

    Arguments:
        flow: a :class:`~krflows.KRFlow` (not a subclass) with a built-in family.

    Returns:
        ``{"dim", "family", "family_options", "layers", "hidden", "order", "affine_stage",
        "compile", "dtype"}`` (the constructor's keywords); see :func:`flow_from_config`.

    Example:
        >>> cfg = flow_config(KRFlow(2, family="bernstein", layers=1, hidden=(8,), degree=4))
        >>> cfg["family"], cfg["family_options"]["degree"], cfg["hidden"], cfg["dtype"]
        ('bernstein', 4, [8], 'float32')
    """
    if type(flow) is not KRFlow:
        raise ValueError(f"krflows.save stores a krflows.KRFlow, got {type(flow).__name__}: a subclass "
                         f"or another module is not rebuilt from a configuration (torch.save its state_dict)")
    family = flow.family
    name = next((key for key, cls in FAMILIES.items() if type(family) is cls), None)
    if name is None:
        raise ValueError(f"cannot save a flow with the custom family {type(family).__name__}: only the "
                         f"built-in families {sorted(FAMILIES)} are rebuilt from a file; save "
                         f"flow.state_dict() and rebuild the flow with your family to load it")
    options = {p: _plain(getattr(family, p), f"family option {p}")
               for p in inspect.signature(type(family)).parameters}
    if len(flow.conditioners):
        hidden = [layer.out_features for layer in flow.conditioners[0].hidden[::2]]
    else:  # no layer: the widths are never used
        hidden = list(inspect.signature(KRFlow).parameters["hidden"].default)
    compile_options = flow._compile_options
    return {
        "dim": flow.dim,
        "family": name,
        "family_options": options,
        "layers": len(flow.conditioners),
        "hidden": hidden,
        "order": None if flow.order is None else flow.order.tolist(),
        "affine_stage": flow.affine is not None,
        "compile": None if compile_options is None else _plain(compile_options, "compile options"),
        "dtype": str(flow.dtype).removeprefix("torch."),
    }


def flow_from_config(config: dict, device: torch.device | str | None = None) -> KRFlow:
    """An untrained :class:`~krflows.KRFlow` built from a :func:`flow_config` dictionary
    (compiled again with the same options if the saved flow was compiled)."""
    dtype = getattr(torch, str(config["dtype"]), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must name a floating torch dtype, got {config['dtype']!r}")
    if config["family"] not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {config['family']!r}")
    family = FAMILIES[config["family"]](**config["family_options"])
    flow = KRFlow(config["dim"], family=family, layers=config["layers"], hidden=tuple(config["hidden"]),
                  order=config["order"], affine_stage=config["affine_stage"])
    flow = flow.to(device=device, dtype=dtype)
    if config["compile"] is not None:
        flow.compile(**config["compile"])
    return flow


def save(flow: KRFlow, path: str | os.PathLike) -> None:
    """Writes ``flow``'s configuration and weights to ``path`` (one file, see :mod:`krflows.io`).

    Arguments:
        flow: a :class:`~krflows.KRFlow` with a built-in family (else ``ValueError``).
        path: the file to write.

    Example:
        >>> import tempfile, krflows
        >>> flow = krflows.KRFlow(2, layers=1, hidden=(8,), order=[1, 0]).double()
        >>> path = tempfile.mkdtemp() + "/flow.pt"
        >>> krflows.save(flow, path)
        >>> same = krflows.load(path)
        >>> x = flow.sample((3,))
        >>> bool(torch.equal(same.log_prob(x), flow.log_prob(x))), same.order.tolist()
        (True, [1, 0])
    """
    from krflows import __version__

    config = flow_config(flow)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "krflows_version": __version__,
               "torch_version": str(torch.__version__), "config": config,
               "state_dict": {k: v.detach() for k, v in flow.state_dict().items()}}
    torch.save(payload, path)


def load(path: str | os.PathLike, map_location: Any = None) -> KRFlow:
    """Reads a flow written by :func:`save`, safely (``torch.load(weights_only=True)``).

    Arguments:
        path: the file.
        map_location: as in :func:`torch.load` (e.g. ``"cpu"``); the flow goes where its
            tensors land.

    Returns:
        the :class:`~krflows.KRFlow`, with the saved dtype, variable order and compile options.

    Raises:
        ValueError: ``"not a krflows flow file: <path>: <reason>"`` for a corrupt, truncated
            or foreign file; a file from a newer format version names both versions.
        FileNotFoundError: no such file (``IsADirectoryError``: a directory).
    """
    from krflows import __version__

    def refuse(reason: str) -> ValueError:
        return ValueError(f"not a krflows flow file: {path}: {reason}")

    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory, not a flow file (krflows.save writes one file)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such flow file: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - every reading failure is reported the same way
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if "deserialize object on a CUDA device" in first or "deserialize object on CUDA device" in first:
            # a valid file whose tensors cannot go where map_location says: not a corrupt file
            raise ValueError(f"cannot load {path} onto map_location={map_location!r}: {first}") from err
        raise refuse(f"{type(err).__name__}: {first}") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise refuse(f"expected format {FORMAT!r}, found {found!r}")
    version = payload.get("format_version")
    if not isinstance(version, int):
        raise refuse(f"format_version must be an int, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"{path} was written in krflows flow file format {version} (krflows "
                         f"{payload.get('krflows_version')}), but this krflows {__version__} reads "
                         f"format {FORMAT_VERSION} and older: upgrade krflows to load it")
    missing = [k for k in ("config", "state_dict") if not isinstance(payload.get(k), dict)]
    if missing:
        raise refuse(f"missing entries {missing}")
    state = payload["state_dict"]
    device = next((v.device for v in state.values() if isinstance(v, torch.Tensor)), None)
    try:
        flow = flow_from_config(payload["config"], device=device)
        flow.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        # the whole message: load_state_dict's first line only says "Error(s) in loading", the
        # missing keys and mismatched sizes follow it
        detail = " ".join(line.strip() for line in str(err).strip().splitlines())
        raise refuse(f"bad configuration or weights: {type(err).__name__}: {detail}") from err
    return flow
