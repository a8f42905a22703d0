"""Containers: zip (generic, npz, PyTorch), tar, 7z and single compressed streams.

Each hands what it holds back to the engine (`ScanContext.scan_member`), so nesting and
limits live in one place and members are named `outer:inner/path`. Stored zip members and
tar members are windows on the file (never copied); compressed bytes go through
`sources.spool`, which enforces the byte and ratio limits while decompressing.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from modelscan_core import detect
from modelscan_core.detect import Rule
from modelscan_core.model import Severity
from modelscan_core.scanners import Format, ScannerSettings
from modelscan_core.scanners.interface import Item, ScanContext, Scanner, ScanFailed
from modelscan_core.scanners.paths import escapes, link_escapes
from modelscan_core.sources import ziparchive
from modelscan_core.sources.window import Window

if TYPE_CHECKING:  # imported where used: the registry imports this module for every scan
    import tarfile

    from modelscan_core.sources import spool

_CODEC_EXTENSIONS = {
    "gzip": (".gz", ".gzip", ".tgz"),
    "bz2": (".bz2", ".tbz2"),
    "xz": (".xz", ".txz"),
    "lzma": (".lzma",),
    "zlib": (".z", ".zlib"),
    "lz4": (".lz4",),
}


def basename(source: str) -> str:
    """The file name part of a display name (`a/b.zip:c/d.pkl` -> `d.pkl`)."""
    return re.split(r"[/:]", source)[-1]


def _limit_error(ctx: ScanContext, what: str, spooled: spool.Spooled) -> None:
    if spooled.limit is not None:
        ctx.error(f"{what}: decompression stopped at {spooled.size} bytes by {spooled.limit}; the rest was not scanned",
                  "MODEL_SCAN", incomplete=True)
    if spooled.error is not None:
        ctx.error(f"{what}: {spooled.error}; only the {spooled.size} bytes before the damage were scanned", "MODEL_SCAN")


def _distinct(name: str, counts: dict[str, int]) -> str:
    """Every copy of a duplicated name is scanned; the second one shows as `name#2`."""
    n = counts.get(name, 0) + 1
    counts[name] = n
    return name if n == 1 else f"{name}#{n}"


# -- zip -------------------------------------------------------------------------


class ZipScanner(Scanner):
    """Zip archives, read as PyTorch's miniz reader and Python's zipfile would read them."""

    name = "modelscan.scanners.ZipArchiveScan"
    formats = ("zip", "pytorch_zip")

    def scan(self, item: Item, ctx: ScanContext) -> None:
        try:
            listing = ziparchive.read_listing(item.stream, size=item.size)
        except ziparchive.ZipFormatError as exc:
            raise ScanFailed(f"zip archive cannot be read: {exc}", "NESTED_ZIP") from None
        torch = item.format == "pytorch_zip"
        if listing.prefix:
            self._prefix(item, ctx, listing.prefix)
        root = _torch_root(listing) if torch else None
        counts: dict[str, int] = {}
        for member in listing.members:
            if member.name.endswith("/") and member.size == 0:
                continue
            label = _distinct(member.name + (f" ({member.why})" if member.why else ""), counts)
            if root is not None and _is_storage(member.name, root):
                self._storage(item, ctx, member, label)  # raw tensor bytes to torch.load
                continue
            self._member(item, ctx, member, label, torch=torch)

    def _prefix(self, item: Item, ctx: ScanContext, prefix: int) -> None:
        """torch.load reads a file that does not start with a local header as a legacy pickle;
        zipfile ignores the bytes. A pickle there is read as every loader reads it: from offset
        0 to its STOP, wherever that is, since the archive can be an operand of the pickle
        (keras pickles a model as the .keras zip's bytes). Other bytes are scanned as what they are."""
        whole = Window(item.stream, 0, item.size)
        head = whole.read(detect.HEAD)
        whole.seek(0)
        if "pickle" in detect.detect_all(head, "", whole):
            ctx.scan_member("<bytes before the archive>", lambda: Window(item.stream, 0, item.size), item.size, "pickle")
        else:
            ctx.scan_member("<bytes before the archive>", lambda: Window(item.stream, 0, prefix), prefix)

    def _storage(self, item: Item, ctx: ScanContext, member: ziparchive.ZipMember, label: str) -> None:
        """A storage is raw bytes to torch.load, but a tool that unpickles every member of the
        archive (pickle.loads of each) runs one that is a pickle: report it when it names or
        calls anything, and scan it as the pickle it is. Tensor data breaks off at once."""
        from modelscan_core.model import Severity
        from modelscan_core.scanners.pickle.vm import PickleVM

        if member.method == 0:
            length = min(member.compressed_size, max(0, item.size - member.data_offset))
            opener = lambda: Window(item.stream, member.data_offset, length)  # noqa: E731
        else:
            codec = {8: "deflate", 12: "bz2"}.get(member.method)
            if codec is None:
                ctx.error(f"{label}: compression method {member.method} is not supported; member not scanned", "NESTED_ZIP")
                return
            spooled = spool.spool_codec(Window(item.stream, member.data_offset, member.compressed_size), codec, ctx)
            _limit_error(ctx, label, spooled)
            length, opener = spooled.size, (lambda: spooled.stream)
        stream = opener()
        facts = PickleVM(stream, size=length, memo_budget=ctx.limits.max_memo_values).run()
        named = [g for g in facts.globals if _dotted(g.module) and _dotted(g.name)]
        if not (named or facts.calls):
            return
        ctx.report(
            "torch/hidden-pickle",
            Severity.HIGH,
            f"{label} is read by torch.load as raw tensor bytes, but it is a pickle that imports {len(named)} name(s) "
            f"and makes {facts.calls} call(s): a tool that unpickles every member of the archive runs it",
            offset=member.data_offset,
        )
        ctx.scan_member(label, opener, length, "pickle")

    def _member(self, item: Item, ctx: ScanContext, member: ziparchive.ZipMember, label: str, *, torch: bool) -> None:
        window = Window(item.stream, member.data_offset, member.compressed_size)
        if member.data_offset + member.compressed_size > item.size:
            ctx.error(f"{label}: data runs past the end of the archive; scanning what is there", "NESTED_ZIP")
            window = Window(item.stream, member.data_offset, max(0, item.size - member.data_offset))
        # torch.load unpickles data.pkl (TorchScript: constants.pkl too) whatever it looks like
        hint = "pickle" if torch and member.name.lower().endswith(".pkl") else None
        if member.method == 0:
            if torch and hint is None and not _torch_worth_scanning(window, member.name):
                return
            length = min(member.compressed_size, max(0, item.size - member.data_offset))
            ctx.scan_member(label, lambda: Window(item.stream, member.data_offset, length), length, hint)
            return
        codec = {8: "deflate", 12: "bz2"}.get(member.method)
        if codec is None:
            ctx.error(f"{label}: compression method {member.method} is not supported; member not scanned", "NESTED_ZIP")
            return
        from modelscan_core.sources import spool

        spooled = spool.spool_codec(window, codec, ctx)
        _limit_error(ctx, label, spooled)
        if torch and hint is None and not _torch_worth_scanning(spooled.stream, member.name):
            spooled.stream.close()
            return
        ctx.scan_member(label, lambda: spooled.stream, spooled.size, hint)


def _dotted(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


def _torch_root(listing: ziparchive.ZipListing) -> str:
    for member in listing.members:
        if member.name.endswith(("/data.pkl", "/byteorder", "/version")) and member.name.count("/") == 1:
            return member.name.split("/", 1)[0]
    return listing.members[0].name.split("/", 1)[0] if listing.members else ""


_STORAGE = re.compile(r"data/\d+\Z")


def _is_storage(name: str, root: str) -> bool:
    """`<root>/data/<key>`: a storage torch.load reads as raw bytes, never as a pickle."""
    prefix = root + "/"
    return name.startswith(prefix) and bool(_STORAGE.match(name[len(prefix):]))


#: opcodes a real pickle has right after PROTO (raw tensor bytes rarely do)
_AFTER_PROTO = frozenset(b"\x95\x8a}](cK)\x8c\x80NXqJM\x88\x89Gh\x93Uq")


def _torch_worth_scanning(stream, name: str) -> bool:
    """In a torch archive, scan members that are something by content; stay off raw tensors.

    Under `<root>/data/` (torch.export weights and constants) a 'pickle' must look like one
    torch would write (PROTO then a usual opcode) so raw float bytes are not read as opcodes.
    """
    stream.seek(0)
    head = stream.read(detect.HEAD)
    stream.seek(0)
    fmt = detect.detect(head, name, stream)
    if fmt is None:
        return False
    parts = name.split("/")
    if fmt == "pickle" and len(parts) > 2 and parts[1] == "data" and head[:1] == b"\x80":
        # (protocol 0/1 pickles are recognised by running the VM: already strict)
        return len(head) > 2 and 2 <= head[1] <= 5 and head[2] in _AFTER_PROTO
    return True


# -- tar --------------------------------------------------------------------------

LEGACY_TORCH_TAR = {"storages", "tensors", "pickle"}


class TarScanner(Scanner):
    """tar (plain; compressed tars arrive here decompressed) and torch's legacy tar format."""

    name = "modelscan.scanners.TarArchiveScan"
    formats = ("tar",)

    def scan(self, item: Item, ctx: ScanContext) -> None:
        import tarfile

        item.stream.seek(0)
        try:
            archive = tarfile.open(fileobj=item.stream, mode="r:")
            members = archive.getmembers()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ScanFailed(f"tar archive cannot be read: {exc}", "NESTED_ZIP") from None
        names = {m.name for m in members}
        legacy = LEGACY_TORCH_TAR <= names
        counts: dict[str, int] = {}
        for member in members:
            _report_escape(member, ctx)
            if not member.isreg():
                continue
            label = _distinct(member.name, counts)
            offset, size = member.offset_data, member.size
            if member.issparse():
                ctx.error(f"{label}: sparse tar member not scanned", "NESTED_ZIP")
                continue
            available = max(0, min(size, item.size - offset))
            if available < size:
                ctx.error(f"{label}: tar member is truncated; scanning the {available} bytes present", "NESTED_ZIP")
            hint = None
            if legacy:
                hint = {"storages": "pytorch_tar_storages", "tensors": "pytorch_tar_tensors", "pickle": "pickle",
                        "sys_info": "pickle"}.get(member.name)
            ctx.scan_member(label, lambda o=offset, n=available: Window(item.stream, o, n), available, hint)


def _report_escape(member: tarfile.TarInfo, ctx: ScanContext) -> None:
    """A member that extraction would write, or link, outside the target directory (what
    tarfile's 'data' filter refuses and older extractors, `keras.utils.get_file` among them, did not)."""
    why = escapes(member.name)
    if why is None and member.issym():
        why = link_escapes(member.name, member.linkname)
    elif why is None and member.islnk():
        why = escapes(member.linkname) and f"a hard link to {member.linkname!r}"
    if why:
        ctx.report("archive/path-escape", Severity.HIGH, f"tar member {member.name!r} is {why}: extracting the archive "
                   "writes outside the target directory", module="tarfile", operator=member.name)


# -- 7z ---------------------------------------------------------------------------


class SevenZipScanner(Scanner):
    """7z archives (nullifAI hid PyTorch files in them), extracted one member at a time."""

    name = "modelscan.scanners.SevenZipArchiveScan"
    formats = ("7z",)

    def scan(self, item: Item, ctx: ScanContext) -> None:
        import py7zr
        from py7zr.io import Py7zIO, WriterFactory

        from modelscan_core.sources import spool

        item.stream.seek(0)
        counts: dict[str, int] = {}

        class Member(Py7zIO):
            def __init__(self, filename: str):
                self.filename = filename
                self.sink = spool._Sink(ctx, None, None)

            def write(self, s) -> int:
                self.sink.write(bytes(s))
                return len(s)

            def read(self, size=None) -> bytes:
                return b""

            def seek(self, offset: int, whence: int = 0) -> int:
                return 0

            def flush(self) -> None:
                pass

            def size(self) -> int:
                return self.sink.size

            def close(self) -> None:
                done = self.sink.finish()
                label = _distinct(self.filename, counts)
                _limit_error(ctx, label, done)
                ctx.scan_member(label, lambda: done.stream, done.size)

        class Factory(WriterFactory):
            def create(self, filename: str) -> Py7zIO:
                return Member(filename)

        try:
            with py7zr.SevenZipFile(item.stream, mode="r") as archive:
                if archive.needs_password():
                    raise ScanFailed("7z archive is encrypted; its members cannot be scanned", "NESTED_ZIP")
                archive.extractall(factory=Factory())
        except ScanFailed:
            raise
        except Exception as exc:  # py7zr raises many types for damaged archives
            raise ScanFailed(f"7z archive cannot be read: {type(exc).__name__}: {exc}", "NESTED_ZIP") from None


# -- single compressed streams ------------------------------------------------------


class CompressedScanner(Scanner):
    """gzip, bz2, xz, lzma, zlib, lz4 (compressed joblib files, .tar.gz, .pkl.gz, ...)."""

    name = "modelscan.scanners.CompressedStreamScan"
    formats = ("gzip", "bz2", "xz", "lzma", "zlib", "lz4", "joblib_zfile")

    def scan(self, item: Item, ctx: ScanContext) -> None:
        from modelscan_core.sources import spool

        codec = item.format
        raw = Window(item.stream, 0, item.size)
        if codec == "joblib_zfile":
            # joblib <= 0.9: b"ZF", the length in hex padded to 19 bytes, maybe a space, zlib data
            head = raw.read(22)
            start = 21 + (1 if head[21:22] == b" " else 0)
            raw = Window(item.stream, start, item.size - start)
            codec = "zlib"
        spooled = spool.spool_codec(raw, codec, ctx)
        inner = _inner_name(basename(item.source), item.format)
        _limit_error(ctx, inner, spooled)
        ctx.scan_member(inner, lambda: spooled.stream, spooled.size)


def _inner_name(name: str, fmt: str) -> str:
    lowered = name.lower()
    for ext in _CODEC_EXTENSIONS.get(fmt, ()):
        if lowered.endswith(ext) and len(name) > len(ext):
            stem = name[: -len(ext)]
            return stem + ".tar" if ext.startswith(".t") and ext != ".tar" and len(ext) > 3 else stem
    return f"{name}[{fmt}]" if name else f"[{fmt}]"


_ZIP = (b"PK\x03\x04", b"PK\x05\x06")
_S = "modelscan_core.sources.sniff:"

FORMATS = (
    # torch's zip before the generic zip; both after Keras's (keras_v3 is a zip too)
    Format("pytorch_zip", "ZipScanner", "pytorch",
           rules=(Rule(priority=200, magics=_ZIP, sniff=_S + "torch_zip", family="zip"),
                  # a zip after other bytes (zipfile opens it; torch.load reads the file as a legacy pickle)
                  Rule(priority=900, sniff=_S + "torch_zip", family="zip")),
           extensions=(".pt2",)),
    Format("zip", "ZipScanner", "archives",
           rules=(Rule(priority=210, magics=_ZIP, sniff=_S + "zip_any", family="zip"),
                  Rule(priority=910, sniff=_S + "zip_any", family="zip"))),
    Format("7z", "SevenZipScanner", "archives", rules=(Rule(priority=400, magics=(b"7z\xbc\xaf\x27\x1c",), sniff=_S + "sevenzip"),)),
    Format("gzip", "CompressedScanner", "archives", rules=(Rule(priority=410, magics=(b"\x1f\x8b",), sniff=_S + "gzip"),)),
    Format("bz2", "CompressedScanner", "archives", rules=(Rule(priority=420, magics=(b"BZh",), sniff=_S + "bzip2"),)),
    Format("xz", "CompressedScanner", "archives", rules=(Rule(priority=430, magics=(b"\xfd7zXZ\x00",), sniff=_S + "xz"),)),
    Format("lzma", "CompressedScanner", "archives", rules=(Rule(priority=440, magics=(b"\x5d\x00",), sniff=_S + "lzma_alone"),)),
    Format("zlib", "CompressedScanner", "archives", rules=(Rule(priority=450, magics=(b"\x78",), sniff=_S + "zlib_stream"),)),
    Format("lz4", "CompressedScanner", "archives", rules=(Rule(priority=460, magics=(b"\x04\x22\x4d\x18",), sniff=_S + "lz4_frame"),)),
    Format("joblib_zfile", "CompressedScanner", "archives", rules=(Rule(priority=470, magics=(b"ZF",), sniff=_S + "joblib_zfile"),)),
    Format("tar", "TarScanner", "archives", rules=(Rule(priority=500, sniff=_S + "tar"),)),
)

#: no table in modelscan's settings: `[scanners.archives] enabled = false` switches them off
SETTINGS = (ScannerSettings("archives", "archives", {"enabled": True}),)
