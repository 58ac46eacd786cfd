"""Inference engines: the only package that imports onnxruntime, OpenVINO or torch to run a model.

Every engine is one module with the same two functions:

* ``unavailable(precision, device) -> str | None``: why it cannot run ``precision`` here (None: it can);
* ``load(path, entry, options, normalise) -> Engine``: the pinned ONNX file, loaded and checked against the
  entry's input/output names, ready to run (:class:`zoo.engines.common.Engine`).

:class:`zoo.engines.model.OnnxModel` is what the rest of zoo holds: one network of an entry on one engine at
one precision, with the registry's normalisation in front and the output checks behind.
:func:`zoo.engines.select.select` decides the engine and precision of a run from the entry, the machine and
the verification results.

Adding an engine is a module here and one line in :data:`ENGINES`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: engine name -> the module that runs it (imported only when that engine is used)
ENGINES: dict[str, str] = {
    "onnxruntime": "zoo.engines.onnxruntime_engine",
    "openvino": "zoo.engines.openvino_engine",
    "torch": "zoo.engines.torch_engine",
}


def engine_module(name: str) -> ModuleType:
    """The module of engine ``name``.

    Raises:
        KeyError: not an engine name (see :data:`ENGINES`).
    """
    return importlib.import_module(ENGINES[name])
