"""The GGUF container: a fast header parser and exact-size tensor reads.

Why not ``gguf.GGUFReader``: it builds a numpy memmap view for every value of every metadata
array, and the vocabulary and merge lists hold ~100k strings, so opening SmolLM2-135M took ~2 s of
a 3 s start-up budget. This parser walks the same layout with ``struct`` over an mmap (tens of ms),
bounds-checks every read so a damaged file gives a ``ModelLoadError`` naming the file, and keeps the
``gguf`` package's enums and block sizes as the source of truth. Nothing stays mapped afterwards.

Layout (little endian): magic ``GGUF``, u32 version, u64 tensor count, u64 metadata count, metadata
(key string, u32 type, value), tensor infos (name, u32 n_dims, u64 dims[n_dims] with ne0 = the
innermost/column count first, u32 ggml type, u64 offset into the aligned data section), data.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from edgellm.loader.errors import ModelLoadError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4

_SCALARS: dict[int, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor's entry: ``shape`` is in torch order (rows first), ``offset`` is absolute in the file."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    offset: int
    nbytes: int | None  # None when the type id is unknown to the gguf package

    @property
    def type_name(self) -> str:
        try:
            return GGMLQuantizationType(self.ggml_type).name
        except ValueError:
            return f"type id {self.ggml_type}"


@dataclass
class GGUFHeader:
    """Everything in a GGUF file except the tensor bytes."""

    path: str
    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensorInfo]
    data_offset: int
    file_size: int


class _Truncated(Exception):
    def __init__(self, needed: int) -> None:
        self.needed = needed


class _Cursor:
    """Bounds-checked little-endian reads over a buffer."""

    def __init__(self, buf: mmap.mmap, size: int) -> None:
        self.buf, self.size, self.pos = buf, size, 0

    def _need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Truncated(self.pos + max(n, 0))

    def u32(self) -> int:
        self._need(4)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self) -> int:
        self._need(8)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self) -> str:
        n = self.u64()
        self._need(n)
        s = self.buf[self.pos : self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return s

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self._need(size)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def value(self, vtype: int) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        fmt = _SCALARS.get(vtype)
        if fmt is not None:
            return self.scalar(fmt)
        if vtype == GGUFValueType.ARRAY:
            return self.array()
        raise ValueError(f"unknown metadata value type {vtype} at byte {self.pos}")

    def array(self) -> Any:
        itype = self.u32()
        count = self.u64()
        fmt = _SCALARS.get(itype)
        if fmt is not None:  # numeric arrays in one go
            dtype = np.dtype(fmt)
            self._need(count * dtype.itemsize)
            out = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
            self.pos += count * dtype.itemsize
            return out
        if itype == GGUFValueType.STRING:
            return self._strings(count)
        if count > self.size:  # every item takes at least one byte
            raise _Truncated(self.pos + count)
        return [self.value(itype) for _ in range(count)]

    def _strings(self, count: int) -> list[str]:
        if count * 8 > self.size - self.pos:
            raise _Truncated(self.pos + count * 8)
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        out = []
        append = out.append
        for _ in range(count):
            if pos + 8 > size:
                raise _Truncated(pos + 8)
            (n,) = unpack(buf, pos)
            end = pos + 8 + n
            if end > size:
                raise _Truncated(end)
            append(buf[pos + 8 : end].decode("utf-8", errors="replace"))
            pos = end
        self.pos = pos
        return out


def tensor_nbytes(ggml_type: int, shape: tuple[int, ...]) -> int | None:
    """Bytes of a tensor of ``shape`` stored as ``ggml_type`` (None if the type is unknown)."""
    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        return None
    n = 1
    for d in shape:
        n *= d
    return n // block * type_size


def read_header(path: str) -> GGUFHeader:
    """Parse metadata and tensor infos of the GGUF file at ``path``; raise ModelLoadError if it is damaged.

    >>> h = read_header("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
    >>> h.metadata["general.architecture"], len(h.tensors)  # doctest: +SKIP
    ('llama', 272)
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(4)
            if head != GGUF_MAGIC:
                raise ModelLoadError(
                    f"{path}: not a GGUF file (starts with {head!r}, expected {GGUF_MAGIC!r})"
                )
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot open GGUF file: {e.strerror or e}") from None
    try:
        return _parse(path, _Cursor(buf, size))
    except _Truncated as t:
        raise ModelLoadError(
            f"{path}: truncated GGUF header: expected at least {t.needed} bytes, found {size}"
        ) from None
    except (ValueError, UnicodeDecodeError, OverflowError) as e:
        raise ModelLoadError(f"{path}: corrupt GGUF header: {e}") from None
    finally:
        buf.close()


def _parse(path: str, cur: _Cursor) -> GGUFHeader:
    cur.pos = 4
    version = cur.u32()
    if version not in SUPPORTED_VERSIONS:
        hint = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
        raise ModelLoadError(f"{path}: unsupported GGUF version {version}{hint}; supported: 2, 3")
    n_tensors, n_kv = cur.u64(), cur.u64()
    if n_tensors > cur.size or n_kv > cur.size:
        raise ValueError(f"implausible counts: {n_tensors} tensors, {n_kv} metadata entries")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.u32())
    raw: list[tuple[str, int, tuple[int, ...], int]] = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.u32()
        if n_dims > MAX_DIMS:
            raise ValueError(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
        ne = tuple(cur.u64() for _ in range(n_dims))
        ggml_type = cur.u32()
        raw.append((name, ggml_type, tuple(reversed(ne)), cur.u64()))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"general.alignment {alignment} is not a power of two")
    data_offset = -(-cur.pos // alignment) * alignment
    tensors = [
        GGUFTensorInfo(name, t, shape, data_offset + off, tensor_nbytes(t, shape))
        for name, t, shape, off in raw
    ]
    header = GGUFHeader(path, version, metadata, tensors, data_offset, cur.size)
    _check_data_fits(header)
    return header


def _check_data_fits(h: GGUFHeader) -> None:
    end = max((t.offset + (t.nbytes or 0) for t in h.tensors), default=h.data_offset)
    if end > h.file_size:
        raise ModelLoadError(
            f"{h.path}: truncated: expected {end} bytes, found {h.file_size} "
            f"({end - h.file_size} bytes of tensor data missing)"
        )
    names = [t.name for t in h.tensors]
    if len(set(names)) != len(names):
        raise ModelLoadError(f"{h.path}: corrupt GGUF: duplicate tensor names")


def read_tensor_bytes(f: BinaryIO, info: GGUFTensorInfo, path: str) -> torch.Tensor:
    """Read one tensor's raw bytes into a fresh uint8 tensor (owning memory, no mapping kept)."""
    assert info.nbytes is not None
    out = torch.empty(info.nbytes, dtype=torch.uint8)
    f.seek(info.offset)
    got = f.readinto(out.numpy())
    if got != info.nbytes:
        raise ModelLoadError(
            f"{path}: truncated: tensor {info.name} needs {info.nbytes} bytes at {info.offset}, read {got}"
        )
    return out
