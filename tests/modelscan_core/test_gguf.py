"""GGUF: chat templates analysed with Jinja2's parser, metadata read with strict bounds.

Benign files are written by the real `gguf` package with the chat templates real models
publish (tests/modelscan_core/data/chat_templates.json); malicious ones carry the template
payloads of CVE-2024-34359 and the ways of spelling them. Nothing is ever rendered.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from pathlib import Path

import numpy as np
import pytest

from modelscan_core import scan_path
from modelscan_core.model import Severity

gguf = pytest.importorskip("gguf")
logging.getLogger("gguf").setLevel(logging.ERROR)

TEMPLATES = {k: v for k, v in json.loads((Path(__file__).parent / "data" / "chat_templates.json").read_text()).items()
             if not k.startswith("_")}
#: 162 more published templates (llama.cpp's, axolotl's, unsloth's collections), see its `_source`
CORPUS = {k: v for k, v in json.loads((Path(__file__).parent / "data" / "chat_templates_corpus.json").read_text()).items()
          if not k.startswith("_")}


def write_gguf(path: Path, template: str | None = None, *, named: dict[str, str] | None = None, big_endian: bool = False,
               vocab: int = 64) -> Path:
    endian = gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE
    w = gguf.GGUFWriter(str(path), "llama", endianess=endian)
    w.add_name("test model")
    w.add_context_length(4096)
    w.add_token_list([f"tok{i}" for i in range(vocab)])
    w.add_token_scores([0.0] * vocab)
    if named:
        choices = [{"name": n, "template": t} for n, t in named.items()]
        if template is not None:
            choices.append({"name": "default", "template": template})
        w.add_chat_template(choices)
    elif template is not None:
        w.add_chat_template(template)
    w.add_tensor("token_embd.weight", np.ones((vocab, 8), dtype=np.float32))
    w.add_tensor("output.weight", np.ones((vocab, 8), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _string(s: bytes, width: str) -> bytes:
    return struct.pack("<" + width, len(s)) + s


def write_old_gguf(path: Path, version: int, template: str, extra: bytes = b"") -> Path:
    """GGUF v1 (32-bit counts and lengths) or v2, which the gguf package no longer writes."""
    width = "I" if version == 1 else "Q"
    kv = [(b"general.architecture", 8, _string(b"llama", width)), (b"tokenizer.chat_template", 8, _string(template.encode(), width))]
    out = b"GGUF" + struct.pack("<I", version) + struct.pack("<" + width * 2, 0, len(kv))
    for key, vtype, value in kv:
        out += _string(key, width) + struct.pack("<I", vtype) + value
    path.write_bytes(out + extra)
    return path


@pytest.fixture(autouse=True)
def analyse_every_template(monkeypatch):
    """Published templates known clean are not parsed in production (known_chat_templates.txt);
    here every template goes through the analyser."""
    from modelscan_core.scanners import jinja_template

    monkeypatch.setattr(jinja_template, "_KNOWN", frozenset())


# -- benign --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_published_chat_templates_are_clean(tmp_path, name):
    report = scan_path(write_gguf(tmp_path / f"{name}.gguf", TEMPLATES[name]))
    assert report.files[0].format == "gguf"
    assert report.exit_code == 0, [(f.severity.name, f.description) for f in report.findings()] or report.all_errors()


def test_a_corpus_of_published_templates_is_clean(tmp_path):
    """One file carrying every template of the corpus as a named template (`tokenizer.chat_template.<n>`):
    tool-calling, reasoning, multimodal and agent templates of some 60 model families."""
    assert len(CORPUS) >= 150
    names = {f"t{i}": text for i, text in enumerate(CORPUS.values())}
    report = scan_path(write_gguf(tmp_path / "corpus.gguf", named=names))
    findings = [(list(CORPUS)[int(f.description.split()[0].rsplit(".t", 1)[1])], f.severity.name, f.description)
                for f in report.findings()]
    assert report.exit_code == 0, findings or report.all_errors()


def test_big_endian_file_with_named_templates_and_a_vocabulary_is_clean(tmp_path):
    path = write_gguf(tmp_path / "be.gguf", TEMPLATES["llama-3.1-8b-instruct"], big_endian=True, vocab=5000,
                      named={"tool_use": TEMPLATES["command-r-plus-tool-use"], "rag": TEMPLATES["qwen2.5-instruct-tools"]})
    report = scan_path(path)
    assert report.exit_code == 0 and report.files[0].verdict.value == "clean"


@pytest.mark.parametrize("version", [1, 2])
def test_old_versions_are_read(tmp_path, version):
    clean = scan_path(write_old_gguf(tmp_path / f"v{version}.gguf", version, TEMPLATES["chatml-openhermes-2.5"]))
    assert clean.exit_code == 0
    evil = scan_path(write_old_gguf(tmp_path / f"v{version}e.gguf", version, "{{ lipsum.__globals__.os.popen('id').read() }}"))
    assert evil.files[0].max_severity == Severity.CRITICAL


def test_gguf_is_recognised_by_content(tmp_path):
    path = write_gguf(tmp_path / "blob", "{{ cycler.__init__.__globals__.os.popen('id').read() }}")
    report = scan_path(path)
    assert report.files[0].format == "gguf" and report.exit_code == 1


# -- malicious templates ---------------------------------------------------------------------

ATTACKS = {
    "cve-2024-34359": "{% for x in ().__class__.__base__.__subclasses__() %}{% if 'warning' in x.__name__ %}"
                      "{{ x()._module.__builtins__['__import__']('os').popen('touch /tmp/pwned') }}{% endif %}{% endfor %}",
    "cycler-globals": "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "joiner": "{{ joiner.__init__.__globals__.os.popen('id') }}",
    "namespace": "{{ namespace.__init__.__globals__['os'].system('id') }}",
    "lipsum": "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "lipsum-as-value": "{% set f = lipsum %}{{ f|attr('x') }}",
    "self-context": "{{ self._TemplateReference__context.cycler.__init__.__globals__.os }}",
    "request-flask": "{{ request.application.__self__._get_data_for_json.__globals__['json'] }}",
    "config-flask": "{{ config.__class__.__init__.__globals__['os'].popen('id') }}",
    "raise-exception-globals": "{{ raise_exception.__globals__['__builtins__']['exec']('import os') }}",
    "attr-filter": "{{ ()|attr('__class__')|attr('__base__')|attr('__subclasses__')() }}",
    "getitem": "{{ ()['__class__']['__base__'] }}",
    "tilde": "{{ ()|attr('__cla' ~ 'ss__') }}",
    "plus": "{% set a = '__glob' + 'als__' %}{{ cycler.__init__[a] }}",
    "join": "{{ x|attr(['_', '_', 'class', '_', '_']|join) }}",
    "join-method": "{{ x|attr(''.join(['__', 'class', '__'])) }}",
    "format-filter": "{{ x|attr('%c%cclass%c%c'|format(95, 95, 95, 95)) }}",
    "format-method": "{{ x|attr('{0}{0}class{0}{0}'.format('_')) }}",
    "percent": "{{ x|attr('%s%sclass%s%s' % ('_', '_', '_', '_')) }}",
    "replace": "{{ x|attr('xxclassxx'|replace('x', '_')) }}",
    "reverse": "{{ x|attr('__ssalc__'|reverse) }}",
    "slice-reverse": "{{ x|attr('__ssalc__'[::-1]) }}",
    "lower": "{{ x|attr('__CLASS__'|lower) }}",
    "multiply": "{{ x|attr('_' * 2 ~ 'class' ~ '_' * 2) }}",
    "hex-escape": "{{ x['\\x5f\\x5fclass\\x5f\\x5f'] }}",
    "unicode-escape": "{{ x['\\u005f\\u005fglobals\\u005f\\u005f'] }}",
    "dict-key": "{{ x|attr(dict(__class__=1)|first) }}",
    "dict-literal-key": "{{ x|attr({'__subclasses__': 0}|list|first) }}",
    "dict-items": "{% for k, v in {'a': '__mro__'}.items() %}{{ x[v] }}{% endfor %}",
    "split": "{{ x|attr('a,__class__'.split(',')[1]) }}",
    "set-block": "{% set k %}__glo{{ 'bals' }}__{% endset %}{{ x[k] }}",
    "macro-argument": "{% macro g(o, a) %}{{ o[a] }}{% endmacro %}{{ g(cycler, '__init__') }}",
    "caller-argument": "{% macro m() %}{{ caller('__class__') }}{% endmacro %}{% call(a) m() %}{{ x[a] }}{% endcall %}",
    "loop-variable": "{% for k in ['__subclasses__'] %}{{ x[k] }}{% endfor %}",
    "namespace-attribute": "{% set ns = namespace() %}{% set ns.k = '__import__' %}{{ x[ns.k] }}",
    "with-block": "{% with k = '__class__' %}{{ x[k] }}{% endwith %}",
    "map-attribute": "{{ messages|map(attribute='__class__')|list }}",
    "map-attr-filter": "{{ messages|map('attr', '__class__')|list }}",
    "selectattr": "{{ messages|selectattr('__class__.__name__')|list }}",
    "str-format-fields": "{{ '{0.__class__.__mro__}'.format(messages) }}",
    "generator-frame": "{{ (messages|map('upper')).gi_frame.f_back.f_globals }}",
    "builtins-name": "{{ __builtins__.__import__('os') }}",
    "harvested-underscores": "{% set u = (messages|string)[5] %}{{ x|attr(u ~ u ~ 'class' ~ u ~ u) }}",
    "include": "{% include '/etc/passwd' %}",
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_template_payloads_are_reported(tmp_path, name):
    report = scan_path(write_gguf(tmp_path / f"{name}.gguf", ATTACKS[name]))
    expected = Severity.HIGH if name in ("harvested-underscores", "include") else Severity.CRITICAL
    assert report.files[0].max_severity == expected, [(f.severity.name, f.description) for f in report.findings()]
    assert report.exit_code == 1
    assert all(f.rule_id.startswith("gguf/chat-template") for f in report.findings())


#: Escapes that never spell an internal name: the template computes it at render time, or takes it
#: from a token the file defines, or uses a private attribute. Each one renders, in a plain
#: `jinja2.Environment` with the context llama-cpp-python gives (`eos_token` from the file's
#: vocabulary), to a Python object of the renderer (test_computed_escapes_really_escape).
_U = "{% set u = (()|select|string)[24] %}"  # "<generator object select_or_reject ...>"[24] == "_"
COMPUTED_ESCAPES = {
    "set-variable-key": _U + "{% set c = u*2 ~ 'class' ~ u*2 %}{{ ()[c] }}",
    "harvest-dict-items": "{% set u = ({}.items()|string)[4] %}{% set n = [u,u,'class',u,u]|join %}{{ ()[n] }}",
    "map-attribute-variable": _U + "{% set n = u~u~'class'~u~u %}{{ [()]|map(attribute=n)|first }}",
    "selectattr-variable": _U + "{% set n = u~u~'class'~u~u %}{{ ([()]|selectattr(n)|list)[0][n] }}",
    "sort-attribute-variable": _U + "{% set n = u~u~'class'~u~u %}{{ [(), ()]|sort(attribute=n)|map(attribute=n)|first }}",
    "groupby-variable": _U + "{% set n = u~u~'class'~u~u %}{{ [()]|groupby(n)|list }}",
    "join-method-variable": _U + "{% set n = ''.join([u,u,'class',u,u]) %}{{ ()[n] }}",
    "set-block-key": _U + "{% set k %}{{u}}{{u}}class{{u}}{{u}}{% endset %}{{ ()[k] }}",
    "with-block-key": "{% with k = (()|select|string)[24] * 2 ~ 'class' ~ (()|select|string)[24] * 2 %}{{ ()[k] }}{% endwith %}",
    "for-target-key": "{% for k in [(()|select|string)[24] * 2 ~ 'class__'] %}{{ ()[k] }}{% endfor %}",
    "dict-attribute-key": _U + "{% set d = {'k': u*2 ~ 'class' ~ u*2} %}{{ ()[d.k] }}",
    "namespace-constructor": "{% set ns = namespace(k='_'~'_class_'~'_') %}{{ ()[ns.k] }}",
    "macro-varargs": "{% macro g() %}{{ ()[varargs[0]] }}{% endmacro %}{{ g('_'~'_class_'~'_') }}",
    "macro-kwargs": "{% macro g() %}{{ ()[kwargs.k] }}{% endmacro %}{{ g(k='_'~'_class_'~'_') }}",
    "macro-alias": "{% macro g(a) %}{{ ()[a] }}{% endmacro %}{% set h = g %}{{ h('_'~'_class_'~'_') }}",
    "macro-name-as-string": "{% macro __class__() %}{% endmacro %}{% set s = (__class__|string) %}{{ ()[s[8:17]] }}",
    "macro-argument-names": "{% macro m(__class__=1) %}{% endmacro %}{{ ()[m.arguments[0]] }}",
    "loop-cycle": "{% for x in [1] %}{{ ()[loop.cycle('_'~'_class_'~'_')] }}{% endfor %}",
    "list-pop": "{% set l = ['a', '__cl' ~ 'ass__'] %}{{ ()[l.pop()] }}",
    "index-known-at-render": "{% set l = ['a', '__cl' ~ 'ass__'] %}{{ ()[l[messages|length]] }}",
    "chr-from-data-length": "{% set u = '%c'|format(messages|length * 95) %}{{ ()[u*2 ~ 'class' ~ u*2] }}",
    "eos-token-key": "{{ ()[eos_token] }}",
    "eos-token-slices": "{% set e = eos_token %}{{ ()[e[:9]] }}",
    "format-through-attr": "{{ ('{0.__cl' ~ 'ass__}')|attr('format') }}",
    "format-stored": "{% set f = '{0.__class__}'.format %}{{ f(()) }}",
    "format-map-fields": "{{ '{x.__class__}'.format_map({'x': ()}) }}",
    "loop-private-iterator": "{% for x in [1] %}{{ loop._iterator }}{% endfor %}",
    "caller-private-function": "{% macro m() %}{{ caller._func }}{% endmacro %}{% call m() %}x{% endcall %}",
    "macro-private-environment": "{% macro m() %}{% endmacro %}{{ m._environment }}",
    "undefined-private-exception": "{{ nothing._undefined_exception }}",
    # containers changed by their own methods after the template wrote them as literals
    "dict-update": _U + "{% set d = {'k': 'content'} %}{{ d.update({'k': u*2~'class'~u*2}) or '' }}{{ ()[d.k] }}",
    "list-append": _U + "{% set l = ['content'] %}{{ l.append(u*2~'class'~u*2) or '' }}{{ ()[l|last] }}",
    "list-append-alias": _U + "{% set l = ['content'] %}{% set f = l.append %}{{ f(u*2~'class'~u*2) or '' }}{{ ()[l|last] }}",
    "list-append-through-attr": _U + "{% set l = ['c'] %}{{ (l|attr('append'))(u*2~'class'~u*2) or '' }}{{ ()[l|last] }}",
    "namespace-list-extend": _U + "{% set ns = namespace(l=['c']) %}{{ ns.l.extend([u*2~'class'~u*2]) or '' }}{{ ()[ns.l|last] }}",
    "data-list-insert": _U + "{{ messages.insert(0, u*2~'class'~u*2) or '' }}{{ ()[messages|first] }}",
    "dict-double-star": _U + "{{ ()[dict(a=1, **{u*2~'class'~u*2: 1})|list|last] }}",
}


def _render_plain(template: str) -> str:
    """What a loader with an unsandboxed environment makes of a template (our own fixtures only)."""
    import jinja2

    context = {"messages": [{"role": "user", "content": "hi"}], "eos_token": "__class__", "bos_token": "<s>",
               "add_generation_prompt": True}
    return jinja2.Environment().from_string(template).render(**context)


@pytest.mark.parametrize("name", sorted(COMPUTED_ESCAPES))
def test_computed_escapes_really_escape(name):
    out = _render_plain(COMPUTED_ESCAPES[name])
    assert any(marker in out for marker in ("<class ", "<function ", "<jinja2.", "_iterator", "<built-in method format")), out


@pytest.mark.parametrize("name", sorted(COMPUTED_ESCAPES))
def test_computed_escapes_are_reported(tmp_path, name):
    report = scan_path(write_gguf(tmp_path / f"{name}.gguf", COMPUTED_ESCAPES[name]))
    assert report.files[0].max_severity >= Severity.HIGH, [(f.severity.name, f.description) for f in report.findings()]
    assert report.exit_code == 1


def test_a_name_the_template_builds_is_critical_when_it_spells_a_dunder(tmp_path):
    report = scan_path(write_gguf(tmp_path / "ns.gguf", COMPUTED_ESCAPES["namespace-constructor"]))
    assert report.files[0].max_severity == Severity.CRITICAL


def test_data_keys_loop_counters_and_literal_keys_stay_clean(tmp_path):
    """The lookups real templates make: literal keys, keys and items of the data, indexes computed
    from numbers, namespace fields, macro parameters fed with data."""
    template = (
        "{% set ns = namespace(i=0, roles=[]) %}{% set role_map = {'user': 'U', 'assistant': 'A'} %}"
        "{% macro field(obj, key) %}{{ obj[key] }}{% endmacro %}"
        "{% for m in messages %}{% set ns.i = ns.i + 1 %}{% set ns.roles = ns.roles + [m.role] %}"
        "{{ role_map[m['role']] }}{{ messages[loop.index0 - 1]['content'] if loop.index0 > 0 }}"
        "{{ messages[ns.i - 1].content }}{{ field(m, 'content') }}{% endfor %}"
        "{% for tool in tools %}{% for name, spec in tool.function.parameters.properties|items %}"
        "{% for k in spec if k not in ['type', 'description'] %}{{ spec[k]|tojson }}{% endfor %}"
        "{{ spec[name] }}{% endfor %}{% endfor %}"
        "{% for i in range(messages|length - 1, -1, -1) %}{{ messages[i].role }}{% endfor %}"
    )
    report = scan_path(write_gguf(tmp_path / "real.gguf", template))
    assert report.exit_code == 0, [(f.severity.name, f.description) for f in report.findings()]


def test_a_payload_in_a_named_template_of_a_big_endian_file(tmp_path):
    path = write_gguf(tmp_path / "named.gguf", TEMPLATES["qwen2-instruct"], big_endian=True,
                      named={"tool_use": ATTACKS["cycler-globals"]})
    found = scan_path(path).findings()
    assert found and max(f.severity for f in found) == Severity.CRITICAL
    assert all("tokenizer.chat_template.tool_use" in f.description for f in found)


def test_the_payload_is_hidden_inside_a_real_template(tmp_path):
    template = TEMPLATES["llama-3.2-3b-instruct"].replace("{{- system_message }}", "{{- system_message }}"
                                                          "{{ raise_exception.__globals__ }}")
    assert scan_path(write_gguf(tmp_path / "mixed.gguf", template)).files[0].max_severity == Severity.CRITICAL


# -- strict bounds -----------------------------------------------------------------------------


def test_a_template_jinja_cannot_parse_is_an_error_not_clean(tmp_path):
    report = scan_path(write_gguf(tmp_path / "bad.gguf", "{% for x in %}"))
    assert report.files[0].verdict.value == "error" and report.exit_code == 2


def test_truncated_tensor_data_is_an_error(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", TEMPLATES["phi-3-mini"])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    report = scan_path(path)
    assert report.files[0].verdict.value == "error"
    assert "runs past the end" in report.all_errors()[0].description


@pytest.mark.parametrize("cut", [6, 20, 60])
def test_truncated_metadata_is_an_error(tmp_path, cut):
    path = write_gguf(tmp_path / "t.gguf", TEMPLATES["phi-3-mini"])
    path.write_bytes(path.read_bytes()[:cut])
    assert scan_path(path).files[0].verdict.value == "error"


def test_a_finding_before_broken_metadata_is_kept(tmp_path):
    path = write_old_gguf(tmp_path / "k.gguf", 2, ATTACKS["cycler-globals"], extra=b"")
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack("<Q", 3)  # claims a third entry that is not there
    path.write_bytes(bytes(data))
    report = scan_path(path)
    assert report.files[0].max_severity == Severity.CRITICAL and report.all_errors()


@pytest.mark.parametrize("field,value", [("kv_count", 2**40), ("tensor_count", 2**50)])
def test_counts_larger_than_the_file_are_refused_before_use(tmp_path, field, value):
    path = write_old_gguf(tmp_path / "c.gguf", 3, "hi")
    data = bytearray(path.read_bytes())
    offset = 16 if field == "kv_count" else 8
    data[offset : offset + 8] = struct.pack("<Q", value)
    path.write_bytes(bytes(data))
    report = scan_path(path)
    assert report.files[0].verdict.value == "error"
    assert "cannot fit" in report.all_errors()[0].description


def test_string_longer_than_the_file_and_deep_arrays_are_errors(tmp_path):
    long_string = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _string(b"k", "Q") + struct.pack("<IQ", 8, 2**60)
    (tmp_path / "s.gguf").write_bytes(long_string)
    assert scan_path(tmp_path / "s.gguf").files[0].verdict.value == "error"
    nested = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _string(b"k", "Q") + struct.pack("<I", 9)
    nested += (struct.pack("<IQ", 9, 1)) * 8 + struct.pack("<IQ", 4, 0)
    (tmp_path / "n.gguf").write_bytes(nested)
    report = scan_path(tmp_path / "n.gguf")
    assert report.files[0].verdict.value == "error" and "nested" in report.all_errors()[0].description


def test_a_string_array_whose_item_runs_past_the_file_is_an_error(tmp_path):
    items = [b"a", b"bb", b"ccc"]
    value = struct.pack("<IQ", 8, len(items) + 1) + b"".join(_string(i, "Q") for i in items) + struct.pack("<Q", 2**40)
    (tmp_path / "a.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _string(b"tokenizer.ggml.tokens", "Q")
                                      + struct.pack("<I", 9) + value)
    report = scan_path(tmp_path / "a.gguf")
    assert report.files[0].verdict.value == "error" and "past the end" in report.all_errors()[0].description


def test_unknown_version_is_an_error(tmp_path):
    (tmp_path / "v.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 7, 0, 0))
    assert scan_path(tmp_path / "v.gguf").files[0].verdict.value == "error"


def test_a_template_stored_as_an_array_of_strings_is_analysed(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "arr.gguf"), "llama")
    w.add_array("tokenizer.chat_template", [TEMPLATES["phi-3-mini"], ATTACKS["lipsum"]])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    found = scan_path(tmp_path / "arr.gguf").findings()
    assert found and max(f.severity for f in found) == Severity.CRITICAL
    assert all(f.description.startswith("tokenizer.chat_template ") for f in found)


# -- what llama.cpp makes of the metadata (llama-cpp-python reads it through llama.cpp) --------


def _raw_gguf(path: Path, entries: list[tuple[bytes, int, bytes]]) -> Path:
    """A v3 GGUF with exactly these (key, type, encoded value) entries and no tensors."""
    out = b"GGUF" + struct.pack("<IQQ", 3, 0, len(entries))
    for key, vtype, value in entries:
        out += _string(key, "Q") + struct.pack("<I", vtype) + value
    path.write_bytes(out)
    return path


def test_a_template_key_with_a_nul_suffix_is_the_template_for_llama_cpp(tmp_path):
    """llama.cpp keeps keys as C strings: `tokenizer.chat_template\0x` is `tokenizer.chat_template`
    there (and comes first), while the gguf package sees another key."""
    path = _raw_gguf(tmp_path / "nulkey.gguf", [
        (b"tokenizer.chat_template\x00shadow", 8, _string(ATTACKS["cycler-globals"].encode(), "Q")),
        (b"tokenizer.chat_template", 8, _string(TEMPLATES["chatml-openhermes-2.5"].encode(), "Q")),
    ])
    assert scan_path(path).files[0].max_severity == Severity.CRITICAL


def test_a_template_is_read_up_to_its_first_nul_as_llama_cpp_does(tmp_path):
    """What follows a NUL is invisible to llama.cpp; a tail Jinja cannot parse must not turn the
    payload before it into a mere parse error."""
    text = ATTACKS["cycler-globals"] + "\x00{% for broken %}"
    path = _raw_gguf(tmp_path / "nulval.gguf", [(b"tokenizer.chat_template", 8, _string(text.encode(), "Q"))])
    report = scan_path(path)
    assert report.files[0].max_severity == Severity.CRITICAL and report.exit_code == 1


def test_a_payload_split_across_array_items_is_read_as_llama_cpp_joins_them(tmp_path):
    """llama.cpp renders an array value as `["a", "b"]`: the separator lands inside a string literal
    the template slices away, so no item holds the payload (the first alone does not even parse)."""
    items = ["{{ (()|attr(('__ini' ~ '", "')[:5] ~ 't__'))|string }}"]
    joined = '["' + '", "'.join(items) + '"]'
    assert "__init__" in _render_plain(joined)
    value = struct.pack("<IQ", 8, len(items)) + b"".join(_string(i.encode(), "Q") for i in items)
    path = _raw_gguf(tmp_path / "split.gguf", [(b"tokenizer.chat_template", 9, value)])
    report = scan_path(path)
    assert report.files[0].max_severity == Severity.CRITICAL, (report.findings(), report.all_errors())



# -- published templates known clean ------------------------------------------------------------


@pytest.mark.slow
def test_the_known_template_list_is_what_the_analyser_finds_clean_in_the_corpus():
    """Every digest vouches for a corpus template that the analyser itself finds clean now."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "scripts" / "gen_known_templates.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_file_with_a_known_template_is_scanned_without_importing_jinja2(tmp_path):
    import subprocess
    import sys

    from modelscan_core.scanners import jinja_template

    jinja_template._KNOWN = None  # the shipped list, as a fresh process reads it
    assert any(hashlib.sha256(t.encode()).hexdigest() in jinja_template._known_clean() for t in TEMPLATES.values())
    path = write_gguf(tmp_path / "known.gguf", TEMPLATES["llama-3.1-8b-instruct"])
    edited = write_gguf(tmp_path / "edited.gguf", TEMPLATES["llama-3.1-8b-instruct"] + "{{ cycler.__init__ }}")
    code = ("import sys; from modelscan_core import scan_path; r = scan_path(sys.argv[1]); "
            "print(r.exit_code, 'jinja2' in sys.modules)")
    known = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert known.stdout.split() == ["0", "False"], known.stderr
    changed = subprocess.run([sys.executable, "-c", code, str(edited)], capture_output=True, text=True)
    assert changed.stdout.split() == ["1", "True"], changed.stderr
