"""Deterministic train/validation split by patient, so no patient is on both sides."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Hashable, Mapping

from fedct.common.errors import ConfigError


def patient_split(
    strata: Mapping[str, Hashable], *, val_fraction: float = 0.2, salt: str = "fedct"
) -> dict[str, str]:
    """Assign each patient key to ``"train"`` or ``"val"``.

    ``strata`` maps a patient to its stratum (e.g. the set of labels it has), so each class keeps
    about the same share on both sides. Within a stratum patients are ordered by a salted hash
    (stable across runs and machines, unlike ``hash()``) and the first ``round(f * n)`` go to
    validation; a stratum of two or more patients always gives at least one to each side.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"validation fraction must be in [0, 1), got {val_fraction}")
    groups: dict[Hashable, list[str]] = defaultdict(list)
    for patient, stratum in strata.items():
        groups[stratum].append(patient)
    split: dict[str, str] = {}
    for patients in groups.values():
        patients.sort(key=lambda p: hashlib.sha256(f"{salt}:{p}".encode()).hexdigest())
        n_val = round(val_fraction * len(patients))
        if val_fraction > 0 and len(patients) >= 2:
            n_val = min(max(n_val, 1), len(patients) - 1)
        for i, patient in enumerate(patients):
            split[patient] = "val" if i < n_val else "train"
    return split
