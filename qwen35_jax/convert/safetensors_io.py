"""Minimal safetensors reader/writer on numpy (bfloat16 through ml_dtypes), tensor by tensor.

The format: an 8-byte little-endian header length, a JSON header mapping each name to
{dtype, shape, data_offsets: [begin, end]} (relative to the end of the header), then the bytes.
Reading memory-maps the file, so a tensor costs memory only when it is copied out. Every read
checks that the tensor's bytes lie inside the file, so a truncated shard is reported by name.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
from collections.abc import Iterator

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
CODES = {v: k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
    """A shard that cannot be read: names the file and what is wrong."""


class SafetensorsFile:
    """Read-only, memory-mapped view of one .safetensors file."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{self.path}: truncated (no header length)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise SafetensorsError(f"{self.path}: truncated (header of {n} bytes)")
            try:
                header = json.loads(f.read(n))
            except json.JSONDecodeError as e:
                raise SafetensorsError(f"{self.path}: corrupt header ({e})") from None
        header.pop("__metadata__", None)
        self.header: dict[str, dict] = header
        self.data_start = 8 + n  # byte offset of the tensor data (after the header)
        self.size = size  # file size in bytes
        self._mmap: mmap.mmap | None = None

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        """The tensor as a numpy array backed by the mapped file (copy it to keep it)."""
        info = self.header[name]
        if info["dtype"] not in DTYPES:
            raise SafetensorsError(f"{self.path}: {name} has unsupported dtype {info['dtype']}")
        dtype = DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        if self.data_start + end > self.size:
            raise SafetensorsError(
                f"{self.path}: truncated: tensor {name} needs bytes up to "
                f"{self.data_start + end}, the file has {self.size}"
            )
        count = int(np.prod(info["shape"], dtype=np.int64))
        if (end - begin) != count * dtype.itemsize:
            raise SafetensorsError(f"{self.path}: {name}: byte length does not match its shape")
        if self._mmap is None:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = np.frombuffer(self._mmap, dtype=dtype, count=count, offset=self.data_start + begin)
        return buf.reshape(info["shape"])

    def close(self) -> None:
        if self._mmap is not None:
            with contextlib.suppress(BufferError):  # an array still views the map
                self._mmap.close()
            self._mmap = None


def write_safetensors(
    path: str | os.PathLike, tensors: Iterator[tuple[str, np.ndarray]] | dict, metadata=None
) -> None:
    """Write tensors (name -> array) to `path` in the safetensors format."""
    items = list(tensors.items() if isinstance(tensors, dict) else tensors)
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, arr in items:
        arr = np.asarray(arr)
        if arr.dtype not in CODES:
            raise SafetensorsError(f"{path}: {name} has unsupported dtype {arr.dtype}")
        header[name] = {
            "dtype": CODES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, arr in items:
            f.write(np.ascontiguousarray(arr).tobytes())
