"""A GGUF model's header, read through fsspec (any URL), and the check that llama.cpp could load it: a
readable header and every tensor's data inside the file. Only the header is read, never the weights
(gguf-py's GGUFReader memory-maps a whole local file); the format's constants are gguf-py's."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

from runner.errors import ModelError

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # llama.cpp refuses version 1 and any newer than it knows
MAX_DIMS = 4  # GGML_MAX_DIMS
_CHUNK = 1 << 20
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


def _value_sizes() -> dict[int, int]:
    """Bytes of each GGUF value type with a fixed size (uint8 .. float64, bool); STRING and ARRAY carry their
    own lengths."""
    import numpy as np
    from gguf.gguf_reader import GGUFReader

    return {int(t): np.dtype(d).itemsize for t, d in GGUFReader.gguf_scalar_to_np.items()}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]
    ggml_type: int
    offset: int  # from the start of the data section


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    alignment: int
    tensors: tuple[TensorInfo, ...]
    data_start: int  # the end of the tensor infos, rounded up to `alignment`
    file_size: int


class _Short(Exception):
    """The file ends before the bytes its header says come next."""


class _Reader:
    """Little-endian reads from a file position on, a chunk at a time, never past the file's end."""

    def __init__(self, f, offset: int, size: int):
        self.f, self.size = f, size
        self.base, self.buf, self.pos = offset, b"", 0
        f.seek(offset)

    def tell(self) -> int:
        return self.base + self.pos

    def take(self, n: int) -> bytes:
        if self.tell() + n > self.size:
            raise _Short
        if self.pos + n > len(self.buf):
            rest = self.buf[self.pos:]
            self.base, self.pos = self.tell(), 0
            self.buf = rest + self.f.read(max(n, _CHUNK) - len(rest))
            if len(self.buf) < n:  # the file shrank since its size was taken
                raise _Short
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def skip(self, n: int) -> None:
        if self.tell() + n > self.size:
            raise _Short
        if self.pos + n <= len(self.buf):
            self.pos += n
            return
        self.base, self.buf, self.pos = self.tell() + n, b"", 0
        self.f.seek(self.base)

    def u32(self) -> int:
        return _U32.unpack(self.take(4))[0]

    def u64(self) -> int:
        return _U64.unpack(self.take(8))[0]

    def string(self) -> bytes:
        return self.take(self.u64())


def check_gguf(url: str, storage_options: dict[str, Any], key: str) -> GGUFHeader:
    """Read the header of the GGUF at `url` and check that every tensor's data lies inside the file;
    raises ModelError, one line naming `key` and `url`, when llama.cpp could not load it."""
    from fsspec.core import url_to_fs

    where = f"{key}: {url}"
    try:
        fs, path = url_to_fs(url, **storage_options)
        with fs.open(path, "rb") as f:
            header = read_header(f, where)
    except FileNotFoundError:
        raise ModelError(f"{where} does not exist") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"{key}: cannot read {url} ({e})") from None
    check_tensor_data(header, where)
    return header


def read_header(f, where: str) -> GGUFHeader:
    """The header of the open binary file `f`; `where` starts each error's line."""
    f.seek(0, 2)
    size = f.tell()
    f.seek(0)
    magic = f.read(4)
    if not magic:
        raise ModelError(f"{where} is empty (an incomplete download?)")
    if magic != MAGIC:
        raise ModelError(f"{where} is not a GGUF file (magic {magic!r})")
    r, part = _Reader(f, 4, size), "its counts"
    try:
        version = r.u32()
        if version not in VERSIONS:
            raise ModelError(f"{where} is GGUF version {version}; llama.cpp reads versions "
                             f"{' and '.join(map(str, VERSIONS))}")
        n_tensors, n_kv = r.u64(), r.u64()
        part = "its key-value metadata"
        alignment = _read_kvs(r, n_kv, where)
        part = "its tensor infos"
        tensors = tuple(_tensor_info(r, where) for _ in range(n_tensors))
    except _Short:
        raise ModelError(f"{where} ends inside its header (in {part}, after {size} bytes; an incomplete "
                         "download?)") from None
    data_start = -(-r.tell() // alignment) * alignment
    return GGUFHeader(version, alignment, tensors, data_start, size)


def _read_kvs(r: _Reader, n_kv: int, where: str) -> int:
    """Skip every key-value pair; returns general.alignment, or the default when it is absent."""
    from gguf.constants import GGUF_DEFAULT_ALIGNMENT, GGUFValueType

    alignment, fixed = GGUF_DEFAULT_ALIGNMENT, _value_sizes()
    for _ in range(n_kv):
        key, vtype = r.string(), r.u32()
        if key == b"general.alignment" and vtype == GGUFValueType.UINT32:
            alignment = r.u32()
            if alignment == 0 or alignment & (alignment - 1):
                raise ModelError(f"{where} is not a loadable GGUF: general.alignment is {alignment}, "
                                 "not a power of two")
        else:
            _skip_value(r, vtype, fixed, where)
    return alignment


def _skip_value(r: _Reader, vtype: int, fixed: dict[int, int], where: str) -> None:
    from gguf.constants import GGUFValueType

    if vtype in fixed:
        r.skip(fixed[vtype])
    elif vtype == GGUFValueType.STRING:
        r.skip(r.u64())
    elif vtype == GGUFValueType.ARRAY:
        item, n = r.u32(), r.u64()
        if item in fixed:
            r.skip(n * fixed[item])
        else:
            for _ in range(n):  # strings (or nested arrays) each carry their own length
                _skip_value(r, item, fixed, where)
    else:
        raise ModelError(f"{where} is not a loadable GGUF: unknown metadata value type {vtype} at byte "
                         f"{r.tell() - 4}")


def _tensor_info(r: _Reader, where: str) -> TensorInfo:
    name = r.string().decode("utf-8", "replace")
    n_dims = r.u32()
    if n_dims > MAX_DIMS:
        raise ModelError(f"{where} is not a loadable GGUF: tensor {name} has {n_dims} dimensions "
                         f"(ggml allows at most {MAX_DIMS})")
    dims = tuple(r.u64() for _ in range(n_dims))
    return TensorInfo(name, dims, r.u32(), r.u64())


def ggml_type_sizes() -> dict[int, tuple[int, int]]:
    """ggml type -> (values per block, bytes per block), as llama.cpp's own gguf-py package lists them."""
    from gguf.constants import GGML_QUANT_SIZES

    return {int(t): sizes for t, sizes in GGML_QUANT_SIZES.items()}


def tensor_nbytes(t: TensorInfo, sizes: dict[int, tuple[int, int]]) -> int | None:
    """Bytes of the tensor's data; None for a ggml type this gguf package does not know."""
    if t.ggml_type not in sizes:
        return None
    block, block_bytes = sizes[t.ggml_type]
    return math.prod(t.dims) // block * block_bytes


def check_tensor_data(h: GGUFHeader, where: str) -> None:
    """Every tensor's data must end inside the file (for an unknown type, at least start inside it), and
    its rows must be whole blocks of its type."""
    sizes = ggml_type_sizes()
    for t in h.tensors:
        start = h.data_start + t.offset
        nbytes = tensor_nbytes(t, sizes)
        if nbytes is None:
            if start > h.file_size:
                raise ModelError(f"{where} is cut short: tensor {t.name} starts at byte {start} but the file "
                                 f"has {h.file_size} (an incomplete download?)")
            continue
        block = sizes[t.ggml_type][0]
        if t.dims and t.dims[0] % block:
            raise ModelError(f"{where} is not a loadable GGUF: tensor {t.name} has rows of {t.dims[0]} values, "
                             f"not a multiple of its type's block of {block}")
        if start + nbytes > h.file_size:
            raise ModelError(f"{where} is cut short: tensor {t.name} needs bytes up to {start + nbytes} but "
                             f"the file has {h.file_size} (an incomplete download?)")
