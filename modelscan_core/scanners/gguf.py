"""GGUF (llama.cpp, Ollama, llama-cpp-python): the header and metadata, read with strict bounds.

Layout (v1-v3): `GGUF`, version (u32), tensor count, metadata count, then metadata
(key string, value type u32, value) and tensor infos (name, dims, type, offset), then the
aligned tensor data. v1 uses 32-bit counts and lengths, v2 and v3 64-bit; v3 files may be
big-endian (after the magic everything is byte-swapped, which the version shows).

What runs at load time is the chat template: llama-cpp-python renders
`tokenizer.chat_template` (and the named `tokenizer.chat_template.<name>`) with Jinja2, and
before 0.2.72 in an unsandboxed environment (CVE-2024-34359). Every template is analysed
by `jinja_template` with Jinja2's parser, never rendered, in each form a reader gives it:
llama.cpp (whose metadata llama-cpp-python reads) keeps keys and strings as C strings, so
`tokenizer.chat_template\0x` is the template key and a template ends at its first NUL; it
turns an array value into one text (`["a", "b"]`, quotes escaped) before the renderer sees
it; the `gguf` package keeps keys and strings whole. Each reading is analysed. Tensor data is never read: tensor
infos are checked against the file size arithmetically, so a 10 GB file costs a few reads.

The same analysis reads the templates of Hugging Face models (`chat_template` in
`tokenizer_config.json` or `chat_template.json`, and `chat_template.jinja`): transformers
renders them in Jinja's sandbox, which the `str.format` escapes get out of.

A count or length whose byte size wraps 64-bit arithmetic, or a tensor with more than
ggml's four dimensions, is what the llama.cpp GGUF parser overflows of 2024 were built from:
HIGH, besides the error.

Every count and length is checked against the bytes that remain before it is used, arrays
nest at most `MAX_DEPTH` deep, and metadata beyond `MAX_METADATA` bytes is not read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import BinaryIO

from modelscan_core.detect import Rule
from modelscan_core.model import Severity
from modelscan_core.scanners import Format, ScannerSettings
from modelscan_core.scanners.interface import Item, ScanContext, ScanFailed, Scanner

MAGIC = b"GGUF"
MAX_DEPTH = 4  # arrays of arrays (llama.cpp itself refuses nesting)
MAX_METADATA = 512 * 1024 * 1024
MAX_KEY = 64 * 1024
MAX_TEMPLATE = 4 * 1024 * 1024  # a chat template longer than this is not analysed (incomplete)
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32

TEMPLATE_KEY = "tokenizer.chat_template"

# value types
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_SCALAR_SIZE = {UINT8: 1, INT8: 1, UINT16: 2, INT16: 2, UINT32: 4, INT32: 4, FLOAT32: 4, BOOL: 1, UINT64: 8, INT64: 8,
                FLOAT64: 8}
#: ggml tensor types: (elements per block, bytes per block), as ggml defines them
GGML_BLOCKS = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 40), 10: (256, 84),
    11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292), 16: (256, 66), 17: (256, 74),
    18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2),
    26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66), 39: (32, 17),
    40: (64, 36), 41: (128, 18),
}


class GgufError(ValueError):
    """The bytes are not a GGUF file llama.cpp would read; `incomplete` when a limit stopped us."""

    def __init__(self, message: str, incomplete: bool = False, overflow: str = ""):
        super().__init__(message)
        self.incomplete = incomplete
        self.overflow = overflow  # the llama.cpp parser bug such a value was built to trigger, if any


#: a count or length whose byte size reaches 2**63 wraps llama.cpp's size arithmetic (`n + 1`,
#: `n * sizeof(...)`) into a small allocation that the read then overflows: the GGUF parser
#: heap overflows of CVE-2024-21825, 21836, 21802 and 23605 (TALOS-2024-1912..1916). A
#: truncated or merely corrupt file does not produce such values by accident.
_WRAP = 1 << 63


def _check_wrap(value: int, unit: int, what: str, cve: str) -> None:
    if value * unit >= _WRAP:
        raise GgufError(f"{what} of {value} wraps llama.cpp's size arithmetic", overflow=f"{what} ({cve})")


def sniff_gguf(head: bytes, name: str, stream: BinaryIO) -> bool:
    return head.startswith(MAGIC) and len(head) >= 8


@dataclass
class Template:
    """One template value, with every text a reader makes of it: (how, text)."""

    key: str
    offset: int
    readings: list[tuple[str, str]]


@dataclass
class GgufHeader:
    version: int
    byteorder: str
    tensor_count: int
    kv_count: int
    templates: list[Template] = field(default_factory=list)
    #: (key, length, offset) of templates too long to analyse: no published template comes near
    #: the limit, and padding is how a payload would be pushed past an analyser
    oversized: list[tuple[str, int, int]] = field(default_factory=list)
    alignment: int = DEFAULT_ALIGNMENT
    data_start: int = 0


class _Reader:
    """Sequential reads over a seekable stream in 1 MiB windows, never past `size`."""

    CHUNK = 1 << 20

    def __init__(self, stream: BinaryIO, size: int):
        self.stream, self.size = stream, size
        self.pos = 0
        self.buf = b""
        self.base = 0

    def _fill(self, n: int) -> int:
        if self.pos + n > self.size:
            raise GgufError(f"truncated: {n} bytes needed at offset {self.pos}, the file ends at {self.size}")
        off = self.pos - self.base
        if off < 0 or off + n > len(self.buf):
            self.stream.seek(self.pos)
            self.buf = self.stream.read(min(max(n, self.CHUNK), self.size - self.pos))
            self.base = self.pos
            if len(self.buf) < n:
                raise GgufError(f"short read at offset {self.pos}")
            off = 0
        return off

    def unpack(self, st: struct.Struct) -> int:
        off = self._fill(st.size)
        self.pos += st.size
        return st.unpack_from(self.buf, off)[0]

    def read(self, n: int) -> bytes:
        off = self._fill(n)
        self.pos += n
        return self.buf[off : off + n]

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GgufError(f"a value of {n} bytes at offset {self.pos} runs past the end of the file ({self.size})")
        self.pos += n

    def skip_strings(self, count: int, length: struct.Struct) -> None:
        """Step over `count` length-prefixed strings (a vocabulary and its merges: 400k of them)
        in a tight loop per window; a length past the file shows as a position past its end."""
        width, unpack_from, size = length.size, length.unpack_from, self.size
        while count:
            off = self._fill(width)
            buf = self.buf
            last = len(buf) - width  # the last offset where a whole length is in the window
            done = 0
            for done in range(count):
                if off > last:
                    break
                off += width + unpack_from(buf, off)[0]
            else:
                done = count
            count -= done
            self.pos = self.base + off
            if self.pos > size:
                _check_wrap(self.pos - size, 2, "a string length in an array", "CVE-2024-21825")
                raise GgufError(f"a string array runs past the end of the file ({size})")


def read_header(stream: BinaryIO, size: int, header: GgufHeader | None = None) -> GgufHeader:
    """Parse the header, metadata and tensor infos. Templates found before an error are kept
    in `header.templates` (pass a header in to see them when this raises)."""
    r = _Reader(stream, size)
    if r.read(4) != MAGIC:
        raise GgufError("no GGUF magic")
    raw_version = r.read(4)
    version = int.from_bytes(raw_version, "little")
    order = "<"
    if version not in (1, 2, 3):
        if int.from_bytes(raw_version, "big") in (2, 3):
            order, version = ">", int.from_bytes(raw_version, "big")
        else:
            raise GgufError(f"GGUF version {version} is not one llama.cpp reads (1-3)")
    count = struct.Struct(order + ("I" if version == 1 else "Q"))
    u32 = struct.Struct(order + "I")
    if header is None:
        header = GgufHeader(version, "little" if order == "<" else "big", 0, 0)
    header.version, header.byteorder = version, "little" if order == "<" else "big"
    header.tensor_count = r.unpack(count)
    header.kv_count = r.unpack(count)
    _check_wrap(header.tensor_count, 512, "a tensor count", "CVE-2024-21836")
    _check_wrap(header.kv_count, 64, "a metadata count", "CVE-2024-21802")
    # every entry takes some bytes: a count larger than the file can hold is a lie
    if header.kv_count > (size - r.pos) // (count.size + 4 + 1):
        raise GgufError(f"{header.kv_count} metadata entries cannot fit in {size} bytes")
    if header.tensor_count > (size - r.pos) // (count.size + 4 + 4 + 8):
        raise GgufError(f"{header.tensor_count} tensors cannot fit in {size} bytes")
    for _ in range(header.kv_count):
        key = _key(r, count)
        vtype = r.unpack(u32)
        c_key = key.split("\0", 1)[0]  # llama.cpp compares and stores keys as C strings
        if c_key == TEMPLATE_KEY or c_key.startswith(TEMPLATE_KEY + "."):
            if vtype == STRING:
                _template(r, count, key, header)
                continue
            if vtype == ARRAY:
                # llama.cpp turns a non-string value into text (`["...", ...]`) before the
                # loader renders it: every string in it is a template too
                _template_array(r, count, u32, key, header)
                continue
        if c_key == "general.alignment" and vtype == UINT32:
            header.alignment = r.unpack(u32)
            if header.alignment == 0 or header.alignment & (header.alignment - 1):
                raise GgufError(f"general.alignment {header.alignment} is not a power of two")
            continue
        _skip_value(r, vtype, count, u32, 0)
        if r.pos > MAX_METADATA:
            raise GgufError(f"metadata larger than {MAX_METADATA} bytes; the rest was not read", incomplete=True)
    _tensors(r, header, count, u32, order)
    return header


def _key(r: _Reader, count: struct.Struct) -> str:
    n = r.unpack(count)
    _check_wrap(n, 2, "a key length", "CVE-2024-21825")
    if n > MAX_KEY:
        raise GgufError(f"metadata key of {n} bytes at offset {r.pos}")
    return r.read(n).decode("utf-8", "replace")


def _string(r: _Reader, count: struct.Struct, key: str, header: GgufHeader) -> tuple[int, str | None]:
    """A template string, or None (skipped, noted in `header.oversized`) when it is too long."""
    n = r.unpack(count)
    offset = r.pos
    _check_wrap(n, 2, "a string length", "CVE-2024-21825")
    if n > MAX_TEMPLATE:
        r.skip(n)
        header.oversized.append((_shown(key), n, offset))
        return offset, None
    return offset, r.read(n).decode("utf-8", "replace")


def _readings(text: str) -> list[tuple[str, str]]:
    """The whole text (the gguf package), and the text up to its first NUL (llama.cpp's C string)."""
    if "\0" not in text:
        return [("", text)]
    return [(" as llama.cpp reads it (up to its first NUL)", text.split("\0", 1)[0]), (" whole", text)]


def _template(r: _Reader, count: struct.Struct, key: str, header: GgufHeader) -> None:
    offset, text = _string(r, count, key, header)
    if text is not None:
        header.templates.append(Template(_shown(key), offset, _readings(text)))


def _template_array(r: _Reader, count: struct.Struct, u32: struct.Struct, key: str, header: GgufHeader) -> None:
    start = r.pos
    itype = r.unpack(u32)
    if itype != STRING:
        r.pos = start
        _skip_value(r, ARRAY, count, u32, 0)
        return
    n = r.unpack(count)
    if n > (r.size - r.pos) // count.size:
        raise GgufError(f"{_shown(key)}: array of {n} strings cannot fit in the file")
    items: list[str] = []
    offset = r.pos
    for i in range(n):
        _item_offset, text = _string(r, count, f"{key}[{i}]", header)
        if text is None:
            r.pos = start
            _skip_value(r, ARRAY, count, u32, 0)
            return
        items.append(text)
        if r.pos - offset > MAX_TEMPLATE:
            header.oversized.append((_shown(key), r.pos - offset, offset))
            r.pos = start
            _skip_value(r, ARRAY, count, u32, 0)
            return
    # llama.cpp's gguf_kv_to_str: what llama-cpp-python renders; the gguf package gives the items
    joined = "[" + ", ".join('"' + t.split("\0", 1)[0].replace("\\", "\\\\").replace('"', '\\"') + '"' for t in items) + "]"
    readings = [(" as llama.cpp joins the array", joined)]
    readings += [(f" item {i}", text) for i, text in enumerate(items)]
    header.templates.append(Template(_shown(key), offset, readings))


def _shown(key: str) -> str:
    return key if "\0" not in key else repr(key)


def _skip_value(r: _Reader, vtype: int, count: struct.Struct, u32: struct.Struct, depth: int) -> None:
    if vtype in _SCALAR_SIZE:
        r.skip(_SCALAR_SIZE[vtype])
    elif vtype == STRING:
        n = r.unpack(count)
        _check_wrap(n, 2, "a string length", "CVE-2024-21825")
        r.skip(n)
    elif vtype == ARRAY:
        if depth >= MAX_DEPTH:
            raise GgufError(f"arrays nested deeper than {MAX_DEPTH} at offset {r.pos}")
        itype = r.unpack(u32)
        n = r.unpack(count)
        minimum = _SCALAR_SIZE.get(itype, count.size if itype == STRING else 4 + count.size)
        if itype not in _SCALAR_SIZE and itype not in (STRING, ARRAY):
            raise GgufError(f"array of unknown value type {itype} at offset {r.pos}")
        _check_wrap(n, max(minimum, 8), "an array length", "CVE-2024-23605")
        if n > (r.size - r.pos) // minimum:
            raise GgufError(f"array of {n} items at offset {r.pos} cannot fit in the file")
        if itype in _SCALAR_SIZE:
            r.skip(n * minimum)
        elif itype == STRING:
            r.skip_strings(n, count)
        else:
            for _ in range(n):
                _skip_value(r, ARRAY, count, u32, depth + 1)
    else:
        raise GgufError(f"unknown metadata value type {vtype} at offset {r.pos}")


def _tensors(r: _Reader, header: GgufHeader, count: struct.Struct, u32: struct.Struct, order: str) -> None:
    infos = []
    for _ in range(header.tensor_count):
        n = r.unpack(count)
        _check_wrap(n, 2, "a tensor name length", "CVE-2024-21825")
        if n > MAX_KEY:
            raise GgufError(f"tensor name of {n} bytes at offset {r.pos}")
        name = r.read(n).decode("utf-8", "replace")
        n_dims = r.unpack(u32)
        if n_dims > MAX_DIMS:
            raise GgufError(f"tensor {name!r} has {n_dims} dimensions (ggml allows {MAX_DIMS})",
                            overflow=f"{n_dims} dimensions, written past ggml's {MAX_DIMS} (CVE-2024-23496)")
        dims = [r.unpack(count) for _ in range(n_dims)]
        product = 1
        for d in dims:
            product *= d
        _check_wrap(product, 1, f"tensor {name!r}'s element count", "ggml_nbytes overflow")
        ggml_type = r.unpack(u32)
        offset = r.unpack(struct.Struct(order + "Q"))
        infos.append((name, dims, ggml_type, offset))
    align = header.alignment
    header.data_start = -(-r.pos // align) * align
    room = r.size - header.data_start
    for name, dims, ggml_type, offset in infos:
        block = GGML_BLOCKS.get(ggml_type)
        if block is None:
            continue  # a newer ggml type: its size is unknown here, and its bytes are data anyway
        elements = 1
        for d in dims:
            elements *= d
        nbytes = elements // block[0] * block[1]
        if offset + nbytes > room:
            raise GgufError(f"tensor {name!r} ({nbytes} bytes at data offset {offset}) runs past the end of the file: "
                            "truncated or corrupt")


class GgufScanner(Scanner):
    name = "modelscan.scanners.GgufScan"
    formats = ("gguf",)

    def scan(self, item: Item, ctx: ScanContext) -> None:
        header = GgufHeader(0, "little", 0, 0)
        failure: GgufError | None = None
        try:
            read_header(item.stream, item.size, header)
        except GgufError as exc:
            failure = exc
            if exc.overflow:
                ctx.report("gguf/parser-overflow", Severity.HIGH,
                           f"GGUF header holds {exc.overflow}: a value built to overflow llama.cpp's GGUF parser "
                           "(memory corruption while the file is opened)", module="llama.cpp", operator="gguf_init")
        for template in header.templates:  # those read before a failure count too
            self._template(template, ctx)
        for key, length, offset in header.oversized:
            ctx.report("gguf/chat-template-oversized", Severity.HIGH,
                       f"{key} is a template of {length} bytes, more than the {MAX_TEMPLATE} analysed: published chat "
                       "templates are a few kilobytes, and padding is how a payload is pushed past an analyser",
                       module="jinja2", operator="chat_template", offset=offset)
            ctx.error(f"GGUF: {key} ({length} bytes) was not analysed", incomplete=True)
        if failure is not None:
            raise ScanFailed(f"GGUF: {failure}", incomplete=failure.incomplete)

    def _template(self, template: Template, ctx: ScanContext, rule: str = "gguf/chat-template-",
                  renders: str = "a loader that renders it outside a sandbox runs it") -> None:
        """Every reading is analysed; a reading Jinja2 cannot parse is one no loader renders, so the
        template is an error only when no reading parses."""
        from modelscan_core.scanners.jinja_template import TemplateUnreadable, analyse

        failures: list[str] = []
        seen: set[tuple[str, str]] = set()
        for how, text in template.readings:
            try:
                issues = analyse(text)
            except TemplateUnreadable as exc:
                failures.append(f"{how.strip() or 'as stored'}: {exc}")
                if exc.too_deep and ("depth", "") not in seen:
                    seen.add(("depth", ""))
                    ctx.report(rule + "too-deep", Severity.HIGH,
                               f"{template.key}{how} nests expressions deeper than the analyser's parser reaches; "
                               "Jinja2 renders it in a loader with more stack left, and no published template nests "
                               "so deep", module="jinja2", operator="nesting", offset=template.offset)
                continue
            for issue in issues:
                if (issue.rule_id, issue.what) in seen:
                    continue
                seen.add((issue.rule_id, issue.what))
                ctx.report(
                    rule + issue.rule_id.split("/", 1)[1],
                    issue.severity,
                    f"{template.key}{how} {issue.description}; {renders}",
                    module="jinja2",
                    operator=issue.what,
                    offset=template.offset,
                )
        if len(failures) == len(template.readings):
            ctx.error(f"{template.key} is not a template Jinja2 can parse ({'; '.join(failures)}); it was not analysed")


class ChatTemplateScanner(GgufScanner):
    """The chat templates of a Hugging Face model: `chat_template` in `tokenizer_config.json` (a
    string, or a list of `{name, template}`), in a processor's `chat_template.json`, and the
    `chat_template.jinja` files transformers writes since templates left the JSON. transformers
    renders them in Jinja's sandbox, so what matters there are the sandbox escapes (the
    `str.format` family, CVE-2024-56326 and CVE-2025-27516), which the same analysis reports."""

    formats = ("chat_template_json", "chat_template_jinja")
    _RULE = "hf/chat-template-"
    _RENDERS = "transformers renders it (apply_chat_template)"

    def scan(self, item: Item, ctx: ScanContext) -> None:
        item.stream.seek(0)
        if item.format == "chat_template_jinja":
            if item.size > MAX_TEMPLATE:
                self._oversized(item.source, item.size, ctx)
                return
            text = item.stream.read().decode("utf-8", "replace")
            self._template(Template("template", 0, _readings(text)), ctx, self._RULE, self._RENDERS)
            return
        from modelscan_core.scanners.jsondoc import load

        for key, text in _hf_templates(load(item, "a tokenizer config")):
            if len(text.encode("utf-8", "surrogatepass")) > MAX_TEMPLATE:
                self._oversized(key, len(text), ctx)
                continue
            self._template(Template(key, 0, _readings(text)), ctx, self._RULE, self._RENDERS)

    def _oversized(self, key: str, length: int, ctx: ScanContext) -> None:
        ctx.report(self._RULE + "oversized", Severity.HIGH,
                   f"{key} is a template of {length} bytes, more than the {MAX_TEMPLATE} analysed: published chat "
                   "templates are a few kilobytes, and padding is how a payload is pushed past an analyser",
                   module="jinja2", operator="chat_template")
        ctx.error(f"{key} ({length} bytes) was not analysed", incomplete=True)


def _hf_templates(doc) -> list[tuple[str, str]]:
    """(where, text) of every template a tokenizer or processor config holds."""
    value = doc.get("chat_template") if isinstance(doc, dict) else None
    if isinstance(value, str):
        return [("chat_template", value)]
    out = []
    if isinstance(value, list):
        for i, entry in enumerate(value):
            if isinstance(entry, dict) and isinstance(entry.get("template"), str):
                out.append((f"chat_template[{entry.get('name', i)!s}]", entry["template"]))
    return out


def sniff_hf_template_json(head: bytes, name: str, stream: BinaryIO) -> bool:
    """A JSON document with a top-level `chat_template` (tokenizer_config.json, chat_template.json)."""
    from modelscan_core.scanners.jsondoc import TOO_LARGE, document

    doc = document(head, stream, (b'"chat_template"',))
    return doc is TOO_LARGE or bool(_hf_templates(doc))


def sniff_jinja_file(head: bytes, name: str, stream: BinaryIO) -> bool:
    """`chat_template.jinja`, the file transformers keeps a model's template in (other `.jinja`
    files are code generators' templates, torch inductor's among them: not a model's)."""
    return name.endswith(".jinja") and "chat" in name and b"\x00" not in head


FORMATS = (
    Format("gguf", "GgufScanner", "gguf", rules=(Rule(priority=40, magics=(MAGIC,), sniff=sniff_gguf),), extensions=(".gguf",)),
    # text documents, after every binary format (the JSON ones share the family of Keras's configs)
    Format("chat_template_json", "ChatTemplateScanner", "gguf",
           rules=(Rule(priority=620, sniff=sniff_hf_template_json, family="json"),)),
    Format("chat_template_jinja", "ChatTemplateScanner", "gguf", rules=(Rule(priority=630, sniff=sniff_jinja_file),)),
)

SETTINGS = (ScannerSettings("gguf", "modelscan.scanners.GgufScan", {"enabled": True, "supported_extensions": [".gguf"]}),)
