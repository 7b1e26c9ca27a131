"""Numpy arrays in JSON as the ``json_numpy`` package (github.com/Crimson-Crow/json-numpy) writes them, which
OpenVLA's ``vla-scripts/deploy.py`` and its clients use: an array (or numpy scalar) becomes
``{"__numpy__": base64 of its C-order bytes, "dtype": numpy's array-protocol descr such as "|u1" or "<f4",
"shape": [..]}``; a scalar has shape ``[]``. Written here (a few lines) rather than depended on; the decoder also
checks what it reads, since it reads what clients send."""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any

import numpy as np
from numpy.lib.format import descr_to_dtype, dtype_to_descr

NUMPY_KEY = "__numpy__"
# numbers and booleans only: an object or structured dtype from a request is never decoded
_DECODABLE_KINDS = "biuf"


def default(obj: Any) -> dict:
    """``json.dumps``'s ``default``: a numpy array or scalar as its ``__numpy__`` record."""
    if isinstance(obj, (np.ndarray, np.generic)):
        array = np.ascontiguousarray(obj)
        return {
            NUMPY_KEY: base64.b64encode(array.tobytes()).decode("ascii"),
            "dtype": dtype_to_descr(array.dtype),
            "shape": list(np.shape(obj)),
        }
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def decode_array(record: dict) -> np.ndarray | np.generic:
    """A ``__numpy__`` record back to its array (a numpy scalar for shape ``[]``); ValueError if malformed."""
    try:
        dtype = descr_to_dtype(record["dtype"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"a __numpy__ value needs a numpy dtype descr such as '|u1', got {record.get('dtype')!r}"
        ) from None
    if dtype.kind not in _DECODABLE_KINDS or dtype.fields is not None:
        raise ValueError(f"a __numpy__ value of dtype {record['dtype']!r}: only numbers and booleans are accepted")
    shape = record.get("shape")
    sizes_ok = isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)
    if not sizes_ok:
        raise ValueError(f"a __numpy__ value needs its shape as a list of sizes, got {shape!r}")
    try:
        data = base64.b64decode(record[NUMPY_KEY], validate=True)
    except (TypeError, binascii.Error):
        raise ValueError("a __numpy__ value's data is not base64") from None
    if len(data) != dtype.itemsize * math.prod(shape):
        raise ValueError(f"a __numpy__ value of {len(data)} bytes does not hold {record['dtype']} {shape}")
    array = np.frombuffer(bytearray(data), dtype).reshape(shape)  # a bytearray: the array is writable
    return array if shape else array[()]


def object_hook(obj: dict) -> Any:
    return decode_array(obj) if NUMPY_KEY in obj else obj


def dumps(obj: Any) -> str:
    return json.dumps(obj, default=default)


def loads(text: str | bytes) -> Any:
    """JSON with ``__numpy__`` records decoded; ValueError (``json.JSONDecodeError`` is one) if malformed."""
    return json.loads(text, object_hook=object_hook)
