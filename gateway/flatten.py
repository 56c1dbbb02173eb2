"""Merge an image's layers into one clean tar stream, in a single streaming pass.

Why streaming and top-down: unpacking every layer to disk and then squashing the tree
(the original's pipeline) writes and re-reads every file; on this machine writing 18k
files costs 10-17 s of system time alone.  Instead the layers are read *from the top
layer down*: the first time a path is seen it is final (later layers win), so it is
emitted at once and every older version is skipped without ever being written.
Whiteouts and opaque whiteouts only hide entries of lower layers, so they are recorded
when a layer ends and consulted for the layers below it.  The output is one tar stream
that ``tar2sqfs`` packs while we produce it (see ``gateway.convert``): gzip inflate runs
in its own inflater process (ISA-L's ``igzip``, else ``pigz``), compression in tar2sqfs's
worker threads, so both cores work at once and no file of the image ever touches the disk.
File bodies go from the inflater's pipe to the tar2sqfs pipe with ``splice`` (1 MiB pipe
buffers), never through Python.

Measured here (bench/pull.py, cold cache, download included, medians): the 3-layer
debootstrap Debian image (92 MB compressed) in 0.91 s against 1.38 s for the floor
(extract to tmpfs + mksquashfs zstd-3) and 11.2 s for the original's skopeo/umoci/mksquashfs
pipeline (docs/performance.md has the stage profile, and the same for a 1 GB image);
earlier, with pigz, a 2.1 GB 3-layer image in 15.2 s against 14.3 s and 157 s.  Lower
layers are inflated ahead while the upper ones stream (``gateway.inflate.Prefetch``),
which keeps both cores busy while tar2sqfs's single reader works through directories of
small files.

Where the parts live: ``gateway.tarread`` parses a layer's tar stream (strict headers,
exact reads, the size budget), ``gateway.inflate`` opens a blob as its uncompressed
stream and inflates lower layers ahead, ``gateway.tarwrite`` writes the sanitised headers
and feeds the output pipe; this module applies the layers: whiteouts, the tree of what
was emitted, the bounds on it.  Hardlinks whose target an upper layer replaced or deleted
keep their old content (a second pass over that one layer, see ``Flattener._replay``).

Safety rules of the merge (each entry is untrusted; the reader's own are listed in
``gateway.tarread``), either neutralised or refused with a ``ShifterError`` naming the
layer and the path:

* an entry below a symlink or file of its own layer, or below a lower layer's
  symlink/file that an upper layer writes through, is refused ("written through");
  nothing is ever resolved through a symlink, so no link can redirect a write;
* hardlinks must name an earlier regular file or symlink of the image, inside the root;
* whiteouts naming ``.``/``..``/nothing are refused; ``.wh..wh..opq`` hides the lower
  layers' content of its directory; other ``.wh..wh.*`` (aufs metadata) are dropped;
* device nodes and fifos are dropped; setuid/setgid bits cleared; owner forced to root;
  every file and directory made world-readable (``a+rX``, as the original did);
* pax records other than path/linkpath/size/mtime are dropped, so xattrs
  (``SCHILY.xattr.security.capability`` and friends) never reach the image;
* the paths the merge remembers (emitted, implicit parents, whiteouts, hardlink targets)
  are capped in number (``MAX_PATHS``, ``MaxImagePaths``) and in total bytes
  (``INDEX_BYTES_PER_PATH`` times that): memory grows linearly in the entries, each
  costing its path's length plus a fixed overhead (docs/gateway.md, "Limits on hostile
  layers"); a directory may hold at most ``MAX_DIR_ENTRIES`` entries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from gateway.bounds import Deadline
from gateway.inflate import Prefetch, open_layer
from gateway.tarread import (
    WH,
    Budget,
    Entry,
    Layer,
    Reader,
    ancestors,
    fmt,
    normalise,
    padded,
    read_entries,
)
from gateway.tarwrite import Output, TarWriter, grow_pipe, sanitise_mode
from shifter.errors import ShifterError

__all__ = ["FlattenStats", "Flattener", "flatten"]

MAX_DIR_ENTRIES = 100_000  # see Flattener._count_child
MAX_PATHS = 4_000_000    # paths the merge remembers over all layers (MaxImagePaths)
INDEX_BYTES_PER_PATH = 128  # their total length, per path allowed: 512 MiB for the default


# kinds of emitted paths
_DIR, _IMPLICIT, _FILE, _SYMLINK, _DROPPED = 1, 2, 3, 4, 5
_NON_DIRS = (_FILE, _SYMLINK, _DROPPED)
_REGULAR = (b"0", b"\0", b"7")
_KIND_NAME = {_DIR: "directory", _IMPLICIT: "directory", _FILE: "file", _SYMLINK: "symlink",
              _DROPPED: "device node"}
_WH_META = b".wh..wh."
_OPAQUE = b".wh..wh..opq"


@dataclass
class FlattenStats:
    entries: int = 0
    dropped_devices: int = 0
    cleared_setid: int = 0
    dropped_xattrs: int = 0
    bytes_read: int = 0


class Flattener:
    """Top-down merge of layers into one sanitised tar stream (see the module docstring)."""

    def __init__(self, out_fd: int, max_bytes: int, max_paths: int | None = None,
                 max_index_bytes: int | None = None, deadline: Deadline | None = None) -> None:
        self.deadline = deadline
        self.max_paths = MAX_PATHS if max_paths is None else max_paths
        self.max_index_bytes = (self.max_paths * INDEX_BYTES_PER_PATH if max_index_bytes is None
                                else max_index_bytes)
        self.paths = 0          # paths remembered, and their total length (see _charge)
        self.index_bytes = 0
        self.out = Output(out_fd)
        self.writer = TarWriter(self.out)
        self.budget = Budget(max_bytes, deadline)
        self.stats = FlattenStats()
        self.emitted: dict[bytes, tuple[int, int]] = {}   # path -> (kind, layer number)
        self.whiteouts: set[bytes] = set()                 # from upper layers: hide path + subtree
        self.opaque: set[bytes] = set()                    # from upper layers: hide lower children
        self.whiteout_dirs: list[bytes] = []               # directories that may hold only whiteouts
        self.children: dict[bytes, int] = {}               # directory -> entries emitted in it
        # per layer, for hardlinks: path -> the regular file it names, files whose content
        # was not emitted, and links waiting for that content (see _replay)
        self.canonical: dict[bytes, bytes] = {}
        self.skipped: set[bytes] = set()
        self.deferred: dict[bytes, list[bytes]] = {}

    # -- the driver -------------------------------------------------------------------

    def run(self, layers: list[Layer], layer_done: Callable[[Layer], None] | None = None,
            scratch: str | None = None) -> FlattenStats:
        """Merge ``layers`` (bottom first, as in the manifest) and end the stream.

        With a ``scratch`` directory, lower layers are decompressed ahead (see Prefetch).
        """
        order = list(reversed(layers))
        prefetch = Prefetch(order[1:], scratch, self.budget.limit, self.deadline) if scratch else None
        try:
            for layer in order:
                self._await(layer)
                ahead = prefetch.take(layer) if prefetch else None
                with ahead if ahead is not None else open_layer(layer, self.deadline) as raw:
                    self._layer(Reader(raw, layer, self.budget))
                if layer_done is not None:
                    layer_done(layer)
        finally:
            if prefetch:
                prefetch.close()
        for path in self.whiteout_dirs:  # still without an entry of their own: create them
            if self.emitted[path][0] == _IMPLICIT:
                self.writer.header(path, 0o755, 0, 0, b"5")
                self.emitted[path] = (_DIR, self.emitted[path][1])
        self.writer.end()
        self.stats.bytes_read = self.budget.used
        return self.stats

    def _layer(self, reader: Reader) -> None:
        layer = reader.layer
        new_whiteouts: list[bytes] = []
        new_opaque: list[bytes] = []
        self.canonical = {}
        self.skipped = set()
        self.deferred = {}
        for entry in self._entries(reader):
            base = entry.path.rsplit(b"/", 1)[-1]
            if base.startswith(WH):
                self._whiteout(entry, base, layer, new_whiteouts, new_opaque)
                reader.copy(padded(entry.size), None)
                continue
            emit = self._decide(entry, layer)
            if not emit and (entry.kind in _REGULAR or entry.kind == b"1"):
                self._charge(entry.path, layer.number)  # kept as a hardlink target (canonical)
            if entry.kind in _REGULAR:
                self.canonical[entry.path] = entry.path
                if not emit:
                    self.skipped.add(entry.path)
            elif entry.kind == b"1":
                target = normalise(entry.link)
                if target:
                    self.canonical[entry.path] = self.canonical.get(target, target)
            if emit:
                self._emit(entry, layer, reader)
            else:
                reader.copy(padded(entry.size), None)
        reader.drain()
        if self.deferred:
            self._replay(layer)
        self.whiteouts.update(new_whiteouts)
        self.opaque.update(new_opaque)

    def _replay(self, layer: Layer) -> None:
        """Emit visible hardlinks whose target file this layer had hidden or shadowed.

        In overlay semantics such a link keeps the *old* content, which we skipped when
        we saw it; a second pass over this one layer copies it under the first link's name
        (rare: e.g. an upper layer deleted or replaced only one name of a hardlinked file).
        """
        with open_layer(layer, self.deadline) as raw:
            reader = Reader(raw, layer, self.budget)
            for entry in self._entries(reader):
                links = self.deferred.pop(entry.path, None) if entry.kind in _REGULAR else None
                if not links:
                    reader.copy(padded(entry.size), None)
                    continue
                first = links[0]
                self.writer.header(first, sanitise_mode(entry.mode, False), entry.size, entry.mtime, b"0")
                reader.copy(padded(entry.size), self.out)
                for other in links[1:]:
                    self.writer.header(other, 0o644, 0, entry.mtime, b"1", first)
                self.stats.entries += len(links)
                if not self.deferred:
                    break
            reader.drain()

    def _await(self, layer: Layer) -> None:
        """Block until ``layer``'s blob is downloaded and verified (its failure is raised),
        checking the pull's deadline twice a second."""
        while layer.ready is not None and not layer.ready(0.5):
            if self.deadline is not None and self.deadline.expired():
                raise self.deadline.error(f"downloading layer {layer.number}")

    # -- reading ----------------------------------------------------------------------


    # -- reading ----------------------------------------------------------------------

    def _entries(self, reader: Reader) -> Iterator[Entry]:
        return read_entries(reader)

    # -- merging ----------------------------------------------------------------------

    def _whiteout(self, entry: Entry, base: bytes, layer: Layer,
                  new_whiteouts: list[bytes], new_opaque: list[bytes]) -> None:
        parent = entry.path[:-len(base) - 1] if b"/" in entry.path else b""
        self._keep_parent(parent, layer.number)
        if base == _OPAQUE:
            new_opaque.append(parent)
            return
        if base.startswith(_WH_META):
            return  # aufs bookkeeping (.wh..wh.plnk, .wh..wh.aufs): never part of the image
        target = base[len(WH):]
        if target in (b"", b".", b".."):
            raise ShifterError(f"layer {layer.number}: whiteout names an invalid path: {fmt(entry.name)}")
        self._charge(entry.path, layer.number)
        new_whiteouts.append(parent + b"/" + target if parent else target)

    def _hidden(self, path: bytes, number: int) -> bool:
        """True when an upper layer hides ``path`` (whiteout, opaque parent, or a file or
        link replacing one of its parents); a parent replaced in the *same* layer is an
        attempt to write through a link and is refused."""
        if b"" in self.opaque:
            return True  # an upper layer made the root itself opaque
        for anc in ancestors(path):
            if anc in self.whiteouts or anc in self.opaque:
                return True
            seen = self.emitted.get(anc)
            if seen is not None and seen[0] in _NON_DIRS:
                if seen[1] == number:
                    raise ShifterError(
                        f"layer {number}: {fmt(path)} is written through the"
                        f" {_KIND_NAME[seen[0]]} {fmt(anc)}")
                return True  # an upper layer replaced the directory by a file or link
        return path in self.whiteouts

    def _decide(self, entry: Entry, layer: Layer) -> bool:
        """True when this entry is the visible version of its path and must be emitted."""
        if not entry.path:
            return False  # the root's attributes are ours (root, 0755), never a layer's
        number = layer.number
        if self._hidden(entry.path, number):
            return False
        seen = self.emitted.get(entry.path)
        if seen is None:
            return True
        kind, where = seen
        is_dir = entry.kind == b"5"
        if kind == _IMPLICIT:
            if is_dir:
                return True  # first explicit attributes for a directory an upper layer needed
            raise ShifterError(
                f"layer {where}: entries are written through {fmt(entry.path)}, which is a"
                f" {'symlink' if entry.kind == b'2' else 'non-directory'} in layer {number}")
        if where == number and not (is_dir and kind == _DIR):
            raise ShifterError(f"layer {number}: duplicate entry {fmt(entry.name)}")
        return False  # an upper layer's version wins

    def _keep_parent(self, parent: bytes, number: int) -> None:
        """A whiteout's directory exists in its layer even if nothing else is emitted in it."""
        if not parent or self._hidden(parent, number):
            return
        seen = self.emitted.get(parent)
        if seen is None:
            self._register(parent, _IMPLICIT, number)
            self.whiteout_dirs.append(parent)

    def _emit(self, entry: Entry, layer: Layer, reader: Reader) -> None:
        writer = self.writer
        stats = self.stats
        kind = entry.kind
        if entry.had_xattrs:
            stats.dropped_xattrs += 1
        if kind in (b"3", b"4", b"6"):
            stats.dropped_devices += 1
            reader.copy(padded(entry.size), None)
            self._register(entry.path, _DROPPED, layer.number)  # still hides lower versions
            return
        if entry.mode & 0o6000:
            stats.cleared_setid += 1
        if kind == b"5":
            writer.header(entry.path, sanitise_mode(entry.mode, True), 0, entry.mtime, b"5")
            reader.copy(padded(entry.size), None)
            self._register(entry.path, _DIR, layer.number)
        elif kind in (b"0", b"\0", b"7"):
            writer.header(entry.path, sanitise_mode(entry.mode, False), entry.size, entry.mtime, b"0")
            reader.copy(padded(entry.size), self.out)
            self._register(entry.path, _FILE, layer.number)
        elif kind == b"2":
            if not entry.link or len(entry.link) > 4095:
                raise ShifterError(f"layer {layer.number}: invalid symlink target for {fmt(entry.name)}")
            writer.header(entry.path, 0o777, 0, entry.mtime, b"2", entry.link)
            reader.copy(padded(entry.size), None)
            self._register(entry.path, _SYMLINK, layer.number)
        elif kind == b"1":
            target = normalise(entry.link)
            if target is None or not target:
                raise ShifterError(f"layer {layer.number}: hardlink {fmt(entry.name)} points outside"
                                   f" the image root: {fmt(entry.link)}")
            canonical = self.canonical.get(target, target)
            if canonical in self.skipped:  # the target's content here was hidden: copy it later
                self.deferred.setdefault(canonical, []).append(entry.path)
                self._register(entry.path, _FILE, layer.number)
                reader.copy(padded(entry.size), None)
                return
            seen = self.emitted.get(target)
            if seen is None or seen[0] not in (_FILE, _SYMLINK):
                what = "a missing target" if seen is None else f"a {_KIND_NAME[seen[0]]}"
                raise ShifterError(f"layer {layer.number}: hardlink {fmt(entry.name)} points to"
                                   f" {what}: {fmt(entry.link)}")
            writer.header(entry.path, 0o644, 0, entry.mtime, b"1", target)
            reader.copy(padded(entry.size), None)
            self._register(entry.path, seen[0], layer.number)
        else:
            raise ShifterError(f"layer {layer.number}: unsupported tar entry type {kind!r}"
                               f" for {fmt(entry.name)}")
        stats.entries += 1

    def _register(self, path: bytes, kind: int, number: int) -> None:
        if path not in self.emitted:
            self._count_child(path, number)
            self._charge(path, number)
        self.emitted[path] = (kind, number)
        for anc in ancestors(path):
            if anc not in self.emitted:
                self._count_child(anc, number)
                self._charge(anc, number)
                self.emitted[anc] = (_IMPLICIT, number)

    def _charge(self, path: bytes, number: int) -> None:
        """Count a path the merge keeps in memory: the caps on their number and total
        length are what make the merge's memory linear in the entries (MAX_PATHS,
        INDEX_BYTES_PER_PATH), whatever the nesting of the names."""
        self.paths += 1
        self.index_bytes += len(path)
        if self.paths > self.max_paths:
            raise ShifterError(f"layer {number}: the image has more than {self.max_paths} paths"
                               " (MaxImagePaths)")
        if self.index_bytes > self.max_index_bytes:
            raise ShifterError(f"layer {number}: the image's paths add up to more than"
                               f" {self.max_index_bytes} bytes (deeply nested names?)")

    def _count_child(self, path: bytes, number: int) -> None:
        """Refuse huge directories: tar2sqfs 1.2 scans a directory's whole child list for
        every entry it adds, so a directory of n entries costs O(n^2) (40,000 took 16 s)."""
        parent = path.rpartition(b"/")[0]
        count = self.children.get(parent, 0) + 1
        self.children[parent] = count
        if count > MAX_DIR_ENTRIES:
            raise ShifterError(f"layer {number}: directory {fmt(parent) or '/'} has more than"
                               f" {MAX_DIR_ENTRIES} entries")


def flatten(layers: list[Layer], out_fd: int, max_bytes: int,
            layer_done: Callable[[Layer], None] | None = None, scratch: str | None = None,
            deadline: Deadline | None = None, max_paths: int | None = None) -> FlattenStats:
    """Write the merged, sanitised tar stream of ``layers`` (bottom first) to ``out_fd``."""
    grow_pipe(out_fd)
    return Flattener(out_fd, max_bytes, max_paths, deadline=deadline).run(layers, layer_done, scratch)
