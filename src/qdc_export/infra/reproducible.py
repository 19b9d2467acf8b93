"""Byte-reproducible artifacts: the same model, options and seed give the same files.

Two things in a ``torch.export.save`` archive change from run to run although the program does not:

- ``.data/serialization_id``: PyTorch's zip writer stores a time+random id in every archive;
- node metadata ``from_node``: provenance records that include ``graph_id`` = ``id()`` of a Python
  graph object (a memory address);
- node ``stack_trace`` of a re-exported GraphModule (the compensation fold re-exports the quantized graph):
  it names the graph's generated code ``<eval_with_key>.N``, N counting the graphs compiled so far in the
  process, so a second identical build in one process differs;
- stack traces name source files by absolute path, so the same build from another checkout folder (or
  another site-packages) differed (measured: /work/wt-base vs /work/main).

:func:`save_program` drops ``from_node`` (debug provenance, not needed to load or run the program), removes
the counter and the machine's path prefixes from stack traces, saves, and replaces the serialization id by one derived from the archive's other records (their
names, sizes and CRC-32s), so identical programs give identical bytes and different ones keep
different ids. The ONNX file is already deterministic (checked by tests/test_reproducible.py)."""

from __future__ import annotations

import hashlib
import re
import struct
import zipfile
import zlib
from pathlib import Path

import torch

_ID_RECORD = ".data/serialization_id"
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # signature .. extra field length (30 bytes)
_LOCAL_SIG, _CENTRAL_SIG, _DESCRIPTOR_SIG = 0x04034B50, 0x02014B50, 0x08074B50


_GENERATED_CODE_COUNTER = re.compile(r"<eval_with_key>\.\d+")
_TRACE_FILE = re.compile(r'File "([^"]+)"')
_CHECKOUT = str(Path(__file__).resolve().parents[3]) + "/"  # the folder holding src/qdc_export


def _portable_file(path: str) -> str:
    """A stack-trace file name without the machine's prefix: the checkout's folder, or an install's
    site-packages, so the same build gives the same bytes wherever the package and its dependencies live."""
    if path.startswith(_CHECKOUT):
        return path[len(_CHECKOUT):]
    marker = "site-packages/"
    return path.split(marker, 1)[1] if marker in path else path


def strip_provenance(program: torch.export.ExportedProgram) -> None:
    """Drop ``from_node`` (it holds ``id()`` of graph objects) and the per-process counter in stack traces from
    every node, in place."""
    for module in program.graph_module.modules():
        graph = getattr(module, "graph", None)
        if isinstance(graph, torch.fx.Graph):
            for node in graph.nodes:
                node.meta.pop("from_node", None)
                trace = node.meta.get("stack_trace")
                if isinstance(trace, str):
                    trace = _GENERATED_CODE_COUNTER.sub("<eval_with_key>", trace)
                    node.meta["stack_trace"] = _TRACE_FILE.sub(lambda m: f'File "{_portable_file(m[1])}"', trace)


def save_program(program: torch.export.ExportedProgram, path: Path) -> None:
    strip_provenance(program)
    torch.export.save(program, str(path))
    normalize_serialization_id(Path(path))


def normalize_serialization_id(path: Path) -> None:
    """Rewrite the archive's serialization id in place (same length, CRC-32s patched)."""
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        start_dir = archive.start_dir
        target = next((i for i in infos if i.filename.endswith(_ID_RECORD)), None)
        if target is None or target.compress_type != zipfile.ZIP_STORED:
            return
        digest = hashlib.sha256("\n".join(f"{i.filename}:{i.file_size}:{i.CRC}" for i in infos
                                          if i is not target).encode()).hexdigest()
    new_id = str(int(digest, 16)).zfill(target.file_size)[: target.file_size].encode()
    crc = struct.pack("<I", zlib.crc32(new_id))
    with open(path, "r+b") as handle:
        handle.seek(target.header_offset)
        fields = _LOCAL_HEADER.unpack(handle.read(_LOCAL_HEADER.size))
        if fields[0] != _LOCAL_SIG:
            raise ValueError(f"{path}: unexpected zip layout (no local header for {target.filename})")
        flags, name_len, extra_len = fields[2], fields[9], fields[10]
        data_at = target.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        handle.seek(data_at)
        handle.write(new_id)
        if flags & 0x08:  # CRC in the data descriptor after the data (optional signature)
            (first,) = struct.unpack("<I", handle.read(4))
            handle.seek(data_at + target.file_size + (4 if first == _DESCRIPTOR_SIG else 0))
        else:
            handle.seek(target.header_offset + 14)
        handle.write(crc)
        # the central directory's copy of the CRC
        handle.seek(start_dir)
        while True:
            entry = handle.read(46)
            if len(entry) < 46 or struct.unpack("<I", entry[:4])[0] != _CENTRAL_SIG:
                raise ValueError(f"{path}: {target.filename} not found in the zip central directory")
            name_len, extra_len, comment_len = struct.unpack("<HHH", entry[28:34])
            name = handle.read(name_len).decode("utf-8")
            if name == target.filename:
                handle.seek(handle.tell() - name_len - 46 + 16)
                handle.write(crc)
                return
            handle.seek(extra_len + comment_len, 1)
