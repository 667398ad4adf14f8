"""The FedAvg weighted mean of validated updates, summed straight from the received bytes.

Flower's FedAvg (``aggregate_arrayrecords``) decodes every update into a new array, multiplies
it into another temporary and adds that to the sum: about eight passes over each update's bytes
plus two allocations of its size, in one thread. FedCT already reads every update through a
zero-copy view to validate it, so for FedAvg and FedProx (whose aggregation is exactly that
weighted mean) it sums the views directly: one fused multiply-add per update (PyTorch's
``add_(alpha=)``, on every core), in float32 whatever dtype crossed the wire. The result equals
Flower's up to float32 rounding (tested). Other strategies keep Flower's own aggregation.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
import torch

from fedct.common.weights import Weights


class WeightedMean:
    """``sum(w_i * update_i) / sum(w_i)`` over updates added one at a time, holding one model.

    The weights are normalised up front (as Flower does), so :meth:`add` needs the total.
    """

    def __init__(self, reference: Mapping[str, np.ndarray], total_weight: float) -> None:
        if total_weight <= 0:
            raise ValueError(f"total weight must be positive, got {total_weight}")
        self.total = float(total_weight)
        self.sum = {k: np.zeros(v.shape, dtype=np.float32) for k, v in reference.items()}
        self._tensors = {k: torch.from_numpy(v) for k, v in self.sum.items()}

    def add(self, update: Mapping[str, np.ndarray], weight: float) -> None:
        """Add ``weight * update`` (read-only views of any float dtype are fine)."""
        factor = float(weight) / self.total
        with warnings.catch_warnings():
            # the views are read-only (they are the received bytes); they are only read here
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for key, acc in self._tensors.items():
                acc.add_(torch.from_numpy(np.asarray(update[key])), alpha=factor)

    def result(self) -> Weights:
        return self.sum
