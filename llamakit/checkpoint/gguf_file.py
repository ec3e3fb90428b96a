"""The GGUF container: a header, key-value metadata, tensor descriptions, then the tensors' data, aligned.

Read here rather than with gguf.GGUFReader, which builds numpy views for every string of a vocabulary: 7 s for
Llama 3's 128,256 tokens and 280,147 merges, where walking the bytes takes a fraction of a second. The layout is
llama.cpp's docs/gguf.md (versions 2 and 3, little-endian); the gguf package supplies the type numbering and
block sizes, and the tests check this reader against GGUFReader.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from llamakit.errors import CheckpointError

MAGIC = b"GGUF"
STRING, ARRAY = 8, 9  # GGUFValueType numbers of the two kinds that are not fixed-size scalars
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
FLOATS = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (outermost first): (out, in) for a matrix
    offset: int  # from the start of the file
    nbytes: int


@dataclass(frozen=True)
class GGUFContents:
    path: Path
    meta: dict[str, object]
    tensors: dict[str, TensorInfo]

    def data(self, name: str) -> np.ndarray:
        """A tensor's data, memory-mapped copy-on-write (the file is never modified): floats (F32, F16) in their
        shape, anything else as rows of raw bytes, (out, bytes per row), as gguf.quants.dequantize takes them."""
        info = self.tensors[name]
        raw = np.memmap(self.path, dtype=np.uint8, mode="c", offset=info.offset, shape=(info.nbytes,))
        if info.type in FLOATS:
            return raw.view(FLOATS[info.type]).reshape(info.shape)
        return raw.reshape(gguf.quant_shape_to_byte_shape(info.shape, info.type))


class _Cursor:
    def __init__(self, buf: mmap.mmap):
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        if self.pos + n > len(self.buf):
            raise ValueError("a string runs past the end of the file")
        self.pos += n
        return self.buf[self.pos - n:self.pos].decode("utf-8")

    def strings(self, count: int) -> list[str]:
        """`count` strings in a row (a vocabulary: the loop is inlined, it runs for every token and merge)."""
        buf, pos, out = self.buf, self.pos, []
        for _ in range(count):
            (n,) = struct.unpack_from("<Q", buf, pos)
            out.append(buf[pos + 8:pos + 8 + n].decode("utf-8"))
            pos += 8 + n
        if pos > len(buf):
            raise ValueError("a string runs past the end of the file")
        self.pos = pos
        return out

    def value(self, kind: int):
        if kind == STRING:
            return self.string()
        if kind != ARRAY:
            return self.scalar(SCALARS[kind])
        item, count = self.scalar("<I"), self.scalar("<Q")
        if item == STRING:
            return self.strings(count)
        dtype = np.dtype(SCALARS[item].replace("?", "b1"))  # KeyError for nested arrays: not in llama files
        values = np.frombuffer(self.buf, dtype, count, self.pos).tolist()
        self.pos += count * dtype.itemsize
        return values


def read_contents(path: Path) -> GGUFContents:
    """Metadata and tensor descriptions; a CheckpointError names a truncated, damaged or unsupported file."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(path, buf)
    except (ValueError, KeyError, struct.error, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read as GGUF ({type(e).__name__}: {e}); the file is truncated or "
                              "damaged") from None


def _parse(path: Path, buf: mmap.mmap) -> GGUFContents:
    c = _Cursor(buf)
    if bytes(buf[:4]) != MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (no GGUF magic)")
    c.pos = 4
    version = c.scalar("<I")
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 and 3 are; a huge number means a "
                              "big-endian file); convert it again with a current llama.cpp")
    n_tensors, n_keys = c.scalar("<Q"), c.scalar("<Q")
    meta = {}
    for _ in range(n_keys):
        key = c.string()
        meta[key] = c.value(c.scalar("<I"))
    described = []
    for _ in range(n_tensors):
        name = c.string()
        dims = [c.scalar("<Q") for _ in range(c.scalar("<I"))]
        described.append((name, gguf.GGMLQuantizationType(c.scalar("<I")), tuple(reversed(dims)), c.scalar("<Q")))
    alignment = meta.get("general.alignment", 32)
    start = -(-c.pos // alignment) * alignment
    tensors = {}
    for name, kind, shape, offset in described:
        block, size = gguf.GGML_QUANT_SIZES[kind]
        info = TensorInfo(name, kind, shape, start + offset, int(np.prod(shape)) // block * size)
        if info.offset + info.nbytes > len(buf):
            raise CheckpointError(f"{path}: tensor {name} ends at byte {info.offset + info.nbytes:,} but the file has "
                                  f"{len(buf):,}; the file is truncated (an interrupted download or copy)")
        tensors[name] = info
    return GGUFContents(path, meta, tensors)


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == MAGIC
