"""TorchScript from a registered ONNX graph, for the tools that load TorchScript (QuPath's WSInfer and
bioimage.io extensions, through Deep Java Library's PyTorch)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np


def save_traced(module: Any, example: np.ndarray, dest: Path) -> Any:
    """Trace ``module`` (a torch module around :class:`zoo.engines.torch_graph.OnnxGraph`) on a batch of 2 made from
    ``example``, save it to ``dest`` and return it loaded back from there with ``torch.jit.load`` (what the
    consumers load), so callers check the saved file, not the module in memory.

    Tracing records shapes the graph computes from its input; a batch of 2 keeps a batch size of 1 from
    being baked in, and :func:`batch_sizes_agree` checks that no batch size was.
    """
    import torch

    pair = np.concatenate([example[:1], example[1:2] if len(example) > 1 else example[:1]])
    with torch.no_grad(), warnings.catch_warnings():
        # the graph's constants (clip bounds, fixed shapes) become TorchScript constants, as meant
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(module, torch.from_numpy(np.ascontiguousarray(pair)), check_trace=False)
        traced.save(str(dest))
    return torch.jit.load(str(dest))


def batch_sizes_agree(loaded: Any, example: np.ndarray, atol: float = 1e-4) -> float:
    """Largest difference between ``loaded`` run on each sample of ``example`` alone and on batches of 1, 2 and 3
    of them (a traced graph that baked in a batch size fails here, or gives other numbers).

    Raises:
        RuntimeError: the TorchScript cannot run one of those batch sizes.
    """
    import torch

    one = np.ascontiguousarray(example[:1])
    with torch.no_grad():
        ref = loaded(torch.from_numpy(one)).numpy()
        worst = 0.0
        for n in (1, 2, 3):
            y = loaded(torch.from_numpy(np.ascontiguousarray(np.repeat(one, n, axis=0)))).numpy()
            worst = max(worst, float(np.abs(y - ref).max()))
    return worst
