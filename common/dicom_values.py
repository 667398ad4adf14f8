"""Header values of a just-read DICOM dataset, parsed straight from the file's bytes where exact.

pydicom converts an element on its first access (value validation, character-set decoding,
``DSfloat``/``IS``/``UID`` objects). FedCT reads some twenty per file, which made that
conversion a large share of its per-file cost on uncompressed CT (measured in
docs/benchmarks.md, Ingestion). The values it reads are numbers (DS, IS), UIDs (UI) and short
codes or names (CS, LO, SH); when their bytes are plain printable ASCII (every character set
DICOM allows agrees on those bytes) they are parsed here into what pydicom would give:
``float``/``int`` (a list of them for several values), or the stripped string. Anything else
(another VR, an already converted element, non-ASCII or escape bytes, a value that does not
parse) is left to pydicom, so the result never differs.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement, empty_value_for_VR
from pydicom.dataset import Dataset

_NUMBER = {"DS": float, "IS": int}
_TEXT = {"UI", "CS", "LO", "SH"}


@cache
def _tag_and_vr(keyword: str) -> tuple[int, str]:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(f"{keyword!r} is not a DICOM keyword")
    return tag, dictionary_VR(tag)


def header_value(ds: Dataset, keyword: str, default: Any = None) -> Any:
    """``ds.get(keyword, default)``, without pydicom's conversion cost where the value allows."""
    tag, vr = _tag_and_vr(keyword)
    elem = ds.get_item(tag)
    if elem is None:
        return default
    if isinstance(elem, RawDataElement) and elem.VR in (None, vr):
        parsed = _parse(elem.value, vr)
        if parsed is not _UNPARSED:
            return parsed
    return ds.get(keyword, default)


_UNPARSED = object()


def _parse(raw: Any, vr: str) -> Any:
    if not isinstance(raw, bytes) or not (vr in _NUMBER or vr in _TEXT):
        return _UNPARSED
    if not raw:
        return empty_value_for_VR(vr)
    # ASCII without ISO 2022 escapes decodes alike in every character set DICOM allows
    if not raw.isascii() or b"\x1b" in raw:
        return _UNPARSED
    text = raw.decode("ascii").rstrip("\x00 ")  # DICOM's padding, as pydicom strips it
    if vr in _TEXT:
        return _UNPARSED if "\\" in text else text  # several values: pydicom's MultiValue
    try:
        values = [_NUMBER[vr](part) for part in text.split("\\")]
    except ValueError:
        return _UNPARSED  # pydicom decides (it accepts "12.0" as an IS, may warn, ...)
    if not all(math.isfinite(v) for v in values):
        return _UNPARSED
    return values[0] if len(values) == 1 else values
