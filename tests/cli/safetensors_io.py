"""Minimal safetensors reader/writer (Python stdlib only) for the CLI tests.

Tensors are (dtype, shape, flat list of numbers); dtypes F64 F32 F16 BF16 I32 I64.
"""
import json
import struct

_FORMATS = {"F64": "d", "F32": "f", "F16": "e", "I32": "i", "I64": "q"}
SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I64": 8}


def _to_bf16_bits(v):
    u = struct.unpack("<I", struct.pack("<f", v))[0]
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return ((u >> 16) | 0x40) & 0xFFFF
    u += 0x7FFF + ((u >> 16) & 1)
    return (u >> 16) & 0xFFFF


def encode(dtype, values):
    if dtype == "BF16":
        return struct.pack("<%dH" % len(values), *[_to_bf16_bits(v) for v in values])
    return struct.pack("<%d%s" % (len(values), _FORMATS[dtype]), *values)


def decode(dtype, raw):
    n = len(raw) // SIZES[dtype]
    if dtype == "BF16":
        bits = struct.unpack("<%dH" % n, raw)
        return [struct.unpack("<f", struct.pack("<I", b << 16))[0] for b in bits]
    return list(struct.unpack("<%d%s" % (n, _FORMATS[dtype]), raw))


def round_to(dtype, values):
    """The values as the file stores them (floats rounded to dtype)."""
    return decode(dtype, encode(dtype, values))


def serialize(tensors, metadata=None):
    """tensors: {name: (dtype, shape, values)} in insertion order; returns bytes."""
    header, blobs, offset = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, (dtype, shape, values) in tensors.items():
        blob = encode(dtype, values)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def write(path, tensors, metadata=None):
    with open(path, "wb") as f:
        f.write(serialize(tensors, metadata))


def read(path):
    """Returns ({name: (dtype, shape, values)}, metadata)."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    base = 8 + n
    metadata = header.pop("__metadata__", {})
    tensors = {}
    for name, info in header.items():
        b, e = info["data_offsets"]
        tensors[name] = (info["dtype"], info["shape"], decode(info["dtype"], data[base + b:base + e]))
    return tensors, metadata
