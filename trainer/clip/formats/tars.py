"""The one tar writer of WebDataset samples: a sample {"__key__": KEY, EXT: value} becomes members KEY.EXT.

Values: bytes as they are, str as UTF-8, dict / list as JSON. Members carry mtime 0 and a fixed owner, so the same
samples always give the same bytes. Plain `tarfile` (webdataset's TarWriter would import torch into every crawl
worker: ~600 MB each).
"""
from __future__ import annotations

import io
import json
import tarfile
from typing import IO


def encode(value) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (dict, list)):
        return json.dumps(value).encode("utf-8")
    raise TypeError(f"cannot store a {type(value).__name__} in a tar member")


class TarSink:
    """Streaming writer: `sink = TarSink(f); sink.write(sample); sink.close()` (closes the tar stream, not f)."""

    def __init__(self, fileobj: IO[bytes]):
        self.tar = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT)
        self.count = 0

    def write(self, sample: dict) -> None:
        key = sample["__key__"]
        for ext in sorted(k for k in sample if not k.startswith("__")):
            data = encode(sample[ext])
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "clipforge", "clipforge"
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> None:
        self.tar.close()
