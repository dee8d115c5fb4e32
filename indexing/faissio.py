"""Reading FAISS index files the way the index dir contract stores them (trainer.clip.formats.index): the one
definition the builder, the grower and the searcher share.

    index = read_index(INDEX_DIR/builds/<id>/image.index)      # memory-mapped where faiss allows

An index merged on disk (image.ivfdata next to image.index) memory-maps its inverted lists itself: it is read with
IO_FLAG_READ_ONLY | IO_FLAG_ONDISK_SAME_DIR, so the lists are found next to the index wherever the dir moved. Not
with IO_FLAG_MMAP: faiss 1.15 then skips the on-disk lists' mapping and the first search segfaults. Every other
index is read with IO_FLAG_MMAP_IFC / IO_FLAG_MMAP (zero-copy flat codes and IVF lists) where that works. Reads
only; faiss's C printf of the path rewrite goes to stderr (stdout is for results).
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import faiss

from trainer.clip.formats.index import IVFDATA_FILE, IndexFormatError


@contextlib.contextmanager
def c_stdout_to_stderr():
    """faiss's C++ printf (on-disk lists: path rewrites, resizing) to stderr for the duration."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def read_index(path: str | Path, mmap: bool = True, same_dir: bool = True) -> faiss.Index:
    """An index file as a searcher opens it (see the module docstring). same_dir=False (the builder, which wrote
    the file in place): trust the lists path recorded inside it. IndexFormatError when on-disk lists are missing
    or cut short (faiss would crash on them)."""
    path, ro = Path(path), getattr(faiss, "IO_FLAG_READ_ONLY", 0)
    if (path.parent / IVFDATA_FILE).is_file():
        with c_stdout_to_stderr():
            index = faiss.read_index(str(path), ro | (faiss.IO_FLAG_ONDISK_SAME_DIR if same_dir else 0))
        check_ondisk(index, path.parent)
        return index
    flags = [getattr(faiss, f) | ro for f in ("IO_FLAG_MMAP_IFC", "IO_FLAG_MMAP") if hasattr(faiss, f)] if mmap else []
    for flag in flags:
        try:
            return faiss.read_index(str(path), flag)
        except RuntimeError:
            continue
    return faiss.read_index(str(path))


def check_ondisk(index: faiss.Index, folder: Path) -> None:
    """The on-disk lists must be this folder's image.ivfdata, whole."""
    try:
        lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    except RuntimeError:
        return
    if isinstance(lists, faiss.OnDiskInvertedLists):
        name = Path(lists.filename)
        if name.name != IVFDATA_FILE or not name.is_file() or name.stat().st_size < lists.totsize:
            raise IndexFormatError(f"{folder}: the index's inverted lists point to {name.name!r} ({lists.totsize} "
                                   f"bytes); expected a whole {IVFDATA_FILE} next to it (rebuild with "
                                   f"`clipforge index`)")
