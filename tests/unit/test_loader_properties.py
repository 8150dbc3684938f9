"""Property tests: no mutation of a valid Istio document crashes the loader.

Every valid document of the corpus is taken apart at random: a value of another type, a key
deleted, added or misspelt, a list duplicated or cut short, an enum or a duration made
nonsense, a scalar wrapped in a list, a spec put under another kind, any field the model knows
set to a value of about its shape. The raw YAML text of the corpus is corrupted character by
character too. Whatever comes in, ``load_text`` returns
either valid config or clean findings: each one names the file it was given and a line in it,
has a code and a message, and formats and serialises. Resources with errors are rejected and
never reach the config; a load without errors has every resource fully typed and analyzes
without raising; loading the same text twice gives the same findings.
"""

from __future__ import annotations

import base64
import copy
import json
import re
from collections import Counter
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from hypothesis import Phase, given, note, settings
from hypothesis import strategies as st

from libmesh._duration import Duration
from libmesh._frozen import FrozenMap
from libmesh.config import (
    KINDS,
    Code,
    Codes,
    Finding,
    LoadResult,
    Message,
    ObjectMeta,
    Resource,
    ResourceRef,
    analyze,
    load_text,
)
from libmesh.config._schema import Shape, TypeSpec, field_specs, fields_by_key

CORPUS = Path(__file__).parents[2].parent / "shared/istio-corpus/valid"

# Loading a document takes a few milliseconds: the file passes in about 15 seconds on two
# cores, which leaves time for Hypothesis to shrink failures within about 40. The explain
# phase (which lines only failing examples ran) is left out: it would triple that time.
PHASES = (Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink)
FAST = settings(max_examples=300, deadline=None, phases=PHASES)
THOROUGH = settings(max_examples=600, deadline=None, phases=PHASES)


def _corpus_texts() -> tuple[str, ...]:
    return tuple(path.read_text(encoding="utf-8") for path in sorted(CORPUS.glob("*.yaml")))


# Shortest first: Hypothesis shrinks a sample towards its first element, so a failure is
# reported on the smallest file or document that shows it.
CORPUS_TEXTS = tuple(sorted(_corpus_texts(), key=len))
CORPUS_DOCUMENTS = tuple(
    sorted(
        (
            doc
            for text in CORPUS_TEXTS
            for doc in yaml.safe_load_all(text)
            if isinstance(doc, dict) and doc.get("kind") in KINDS
        ),
        key=lambda doc: len(yaml.safe_dump(doc)),
    )
)

ENUM_LIKE = re.compile(r"[A-Z][A-Z0-9_]+")
DURATION_LIKE = re.compile(r"(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+")
ENUM_WORDS = sorted(
    {
        value
        for doc in CORPUS_DOCUMENTS
        for value in re.findall(r"'([A-Z][A-Z0-9_]+)'", repr(doc))
        if ENUM_LIKE.fullmatch(value)
    }
)

# -- values to put where they do not belong ------------------------------------------------------

huge_ints = st.sampled_from(
    [2**31, 2**32, 2**53 + 1, 2**63, 2**64, 10**30, -(2**31) - 1, -(2**63) - 1, -(10**30)]
)
negative_numbers = st.integers(max_value=-1) | st.floats(max_value=-0.0, allow_nan=False)
very_long_strings = st.builds(
    lambda char, length: char * length, st.characters(), st.integers(300, 20_000)
)
unicode_strings = st.text(st.characters(min_codepoint=0x80), min_size=1, max_size=20)
# Characters that trip up code written for ASCII: lone surrogates (YAML's "\ud800" escape),
# digits that str.isdigit() accepts but int() does not, invisible and combining characters.
unicode_edge_cases = st.sampled_from(
    [
        "\ud800",
        "x\udfff",
        "²",
        "8080²",
        "¹²³",
        "٣",
        "\uff11\uff12",
        "Ⅻ",
        "\u200b",
        "\u202eabc",
        "\ufeff",
        "e\u0301",
        "😀",
        "\u00a0",
        "ß",
        "İ",
        "\u2028",
        "\x85",
    ]
)
# Numbers as text in any script: every character is one str.isdigit() accepts (Arabic-Indic
# and full-width digits, but also superscripts and circled digits, which int() refuses).
digits_of_any_script = st.text(
    st.characters(categories=["Nd", "No"]).filter(str.isdigit), min_size=1, max_size=6
)
# Strings that Istio's validators parse further: hosts, addresses, CIDRs, regexes, URIs.
tricky_strings = st.sampled_from(
    [
        "",
        " ",
        "*",
        "*.",
        "**",
        ".",
        "..",
        "a..b",
        "-a",
        "a-",
        "*.*.com",
        "foo*.com",
        "A.B",
        "0.0.0.0",
        "0.0.0.0/0",
        "10.0.0.1/33",
        "256.1.1.1",
        "::1",
        "[::1]",
        "fe80::1%eth0",
        "::ffff:10.0.0.1/129",
        "1.2.3.4:80",
        "unix://",
        "unix:///var/run/x.sock",
        "http://",
        "https://example.com:99999/",
        "(",
        "[",
        "\\",
        "(?P<x>",
        "a{1000000}",
        "^$",
        "/",
        "//",
        "%",
        "%zz",
        "~",
        "v1",
        "-1",
        "0",
        "1e999",
        "null",
        "true",
        "<unnamed>",
        "default/name",
        "ns/*",
        "*/ns",
        "\x00",
        "a\nb",
        "é",
    ]
)
scalars_of_any_type = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    negative_numbers,
    huge_ints,
    st.floats(),
    st.text(max_size=20),
    unicode_strings,
    unicode_edge_cases,
    very_long_strings,
    tricky_strings,
)
values_of_any_type = st.recursive(
    scalars_of_any_type,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=10,
)
unknown_keys = st.one_of(
    st.text(max_size=15),
    unicode_edge_cases,
    st.sampled_from(["spec", "metadata", "name", "host", "status", "<<", "=", "~", "?"]),
    st.integers(),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False),
)
garbage_enums = st.one_of(
    st.sampled_from(ENUM_WORDS),
    st.text(max_size=12),
    st.from_regex(ENUM_LIKE, fullmatch=True),
    st.sampled_from(ENUM_WORDS).map(str.lower),
    st.sampled_from(ENUM_WORDS).map(lambda word: word + "_"),
)
garbage_durations = st.one_of(
    st.sampled_from(
        [
            "",
            "0",
            "00",
            "0s",
            "1",
            "1.5",
            "s",
            "1x",
            "1 s",
            " 1s",
            "1s ",
            "-1s",
            "+1s",
            "1h-30m",
            "1.s",
            ".5s",
            "1..5s",
            "1e3s",
            "1ns",
            "999us",
            "0.0000000001s",
            "1µs",
            "1μs",
            "\uff11s",
            "9223372036854775807ns",
            "9223372036854775808ns",
            "99999999999999999999h",
            "2562047h47m16.854775807s",
            "1" * 400 + "s",
            "inf",
            "nan",
        ]
    ),
    st.from_regex(r"-?\d{1,25}(\.\d{0,12})?(ns|us|ms|s|m|h|d|y)?", fullmatch=True),
    st.integers(),
    st.floats(),
)
numbers_out_of_range = st.one_of(
    huge_ints,
    st.sampled_from([-1, 0, 65535, 65536, 101, 2**32 - 1, -0.0, 0.5, 1e308]),
    st.floats(allow_nan=True, allow_infinity=True),
)

# -- mutating a document tree --------------------------------------------------------------------

TreePath = tuple[Any, ...]
Node = tuple[TreePath, Any, Any]  # path, value, parent (None at the root)


def _nodes(value: Any, path: TreePath = (), parent: Any = None) -> list[Node]:
    found = [(path, value, parent)]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _nodes(item, (*path, key), value)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _nodes(item, (*path, index), value)
    return found


def _in_spec_first(nodes: list[Node]) -> list[Node]:
    # Hypothesis favours the first elements of a sample; most of a resource is in its spec.
    return sorted(nodes, key=lambda node: node[0][:1] != ("spec",))


def _pick(draw: st.DrawFn, doc: Any, wanted: Callable[[Any, Any], bool]) -> Node | None:
    """A random node of ``doc`` for which ``wanted(value, parent)`` holds, if there is one."""
    candidates = [node for node in _nodes(doc) if wanted(node[1], node[2])]
    return draw(st.sampled_from(_in_spec_first(candidates))) if candidates else None


def _replace(doc: Any, path: TreePath, value: Any) -> Any:
    if not path:
        return value
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = value
    return doc


def _is_scalar(value: Any) -> bool:
    return not isinstance(value, (dict, list))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _in_mapping(_: Any, parent: Any) -> bool:
    return isinstance(parent, dict)


def replace_a_value_with_another_type(draw: st.DrawFn, doc: Any) -> Any:
    path, _, _ = draw(st.sampled_from(_in_spec_first(_nodes(doc))))
    return _replace(doc, path, draw(values_of_any_type))


def delete_a_key(draw: st.DrawFn, doc: Any) -> Any:
    node = _pick(draw, doc, _in_mapping)
    if node is not None:
        path, _, parent = node
        del parent[path[-1]]
    return doc


def insert_an_unknown_key(draw: st.DrawFn, doc: Any) -> Any:
    node = _pick(draw, doc, lambda value, _: isinstance(value, dict))
    if node is not None:
        node[1][draw(unknown_keys)] = draw(values_of_any_type)
    return doc


def _typo(draw: st.DrawFn, key: str) -> str:
    at = draw(st.integers(0, max(len(key) - 1, 0)))
    return draw(
        st.sampled_from(
            [
                key.lower(),
                key.upper(),
                key[:1].upper() + key[1:],
                re.sub(r"([A-Z])", r"_\1", key).lower(),
                re.sub(r"([A-Z])", r"-\1", key).lower(),
                key[:at] + key[at + 1 :],
                key[:at] + key[at : at + 1] * 2 + key[at + 1 :],
                key[:at] + key[at + 1 : at + 2] + key[at : at + 1] + key[at + 2 :],
                key + "s",
                key + " ",
                " " + key,
            ]
        )
    )


def misspell_a_key(draw: st.DrawFn, doc: Any) -> Any:
    node = _pick(draw, doc, _in_mapping)
    if node is not None:
        path, _, parent = node
        old = path[-1]
        new = _typo(draw, str(old))
        renamed = {(new if key == old else key): value for key, value in parent.items()}
        parent.clear()
        parent.update(renamed)
    return doc


def duplicate_a_list_item(draw: st.DrawFn, doc: Any) -> Any:
    """The copy is the same object, so YAML writes it as an anchor and an alias."""
    node = _pick(draw, doc, lambda value, _: isinstance(value, list) and bool(value))
    if node is not None:
        items = node[1]
        at = draw(st.integers(0, len(items) - 1))
        items.insert(draw(st.integers(0, len(items))), items[at])
    return doc


def truncate_a_list(draw: st.DrawFn, doc: Any) -> Any:
    node = _pick(draw, doc, lambda value, _: isinstance(value, list) and bool(value))
    if node is not None:
        del node[1][draw(st.integers(0, len(node[1]) - 1)) :]
    return doc


def swap_an_enum_for_garbage(draw: st.DrawFn, doc: Any) -> Any:
    node = _pick(draw, doc, lambda value, _: isinstance(value, str) and ENUM_LIKE.fullmatch(value))
    return doc if node is None else _replace(doc, node[0], draw(garbage_enums))


def corrupt_a_duration(draw: st.DrawFn, doc: Any) -> Any:
    node = _pick(
        draw, doc, lambda value, _: isinstance(value, str) and DURATION_LIKE.fullmatch(value)
    )
    return doc if node is None else _replace(doc, node[0], draw(garbage_durations))


def push_a_number_out_of_range(draw: st.DrawFn, doc: Any) -> Any:
    node = _pick(draw, doc, lambda value, _: _is_number(value))
    return doc if node is None else _replace(doc, node[0], draw(numbers_out_of_range))


def replace_a_string_with_a_tricky_one(draw: st.DrawFn, doc: Any) -> Any:
    node = _pick(draw, doc, lambda value, _: isinstance(value, str))
    tricky = tricky_strings | unicode_edge_cases
    return doc if node is None else _replace(doc, node[0], draw(tricky))


def wrap_a_scalar_in_a_list(draw: st.DrawFn, doc: Any) -> Any:
    node = _pick(draw, doc, lambda value, _: _is_scalar(value))
    return doc if node is None else _replace(doc, node[0], [node[1]])


def unwrap_a_list(draw: st.DrawFn, doc: Any) -> Any:
    """A list becomes its first item, as when a '- ' is forgotten."""
    node = _pick(draw, doc, lambda value, _: isinstance(value, list) and bool(value))
    return doc if node is None else _replace(doc, node[0], node[1][0])


def put_the_spec_under_another_kind(draw: st.DrawFn, doc: Any) -> Any:
    if isinstance(doc, dict):
        kind = KINDS[draw(st.sampled_from(sorted(KINDS)))]
        doc["kind"] = kind.name
        doc["apiVersion"] = draw(
            st.sampled_from([f"{kind.group}/{v}" for v in kind.versions])
            | st.sampled_from([f"{kind.group}/v2", "v1", "networking.istio.io", "/v1", ""])
        )
    return doc


def _strings_for_a_field() -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=12),
        st.from_regex(r"[a-z0-9*.-]{1,20}", fullmatch=True),
        st.from_regex(r"[0-9]{1,6}", fullmatch=True),
        digits_of_any_script,
        tricky_strings,
        unicode_edge_cases,
    )


def _scalars_for(target: type) -> st.SearchStrategy[Any]:
    """Values meant for a scalar field: mostly of its type, often just wrong."""
    if isinstance(target, type) and issubclass(target, Enum):
        return st.sampled_from([member.value for member in target]) | garbage_enums
    return {
        str: _strings_for_a_field(),
        int: st.integers(-2, 70_000) | numbers_out_of_range,
        float: st.floats(),
        bool: st.booleans(),
        bytes: st.binary(max_size=20).map(lambda b: base64.b64encode(b).decode()) | st.text(),
        Duration: st.from_regex(r"[0-9]{1,4}(ms|s|m|h)", fullmatch=True) | garbage_durations,
    }.get(target, values_of_any_type)


@st.composite
def values_shaped_like(draw: st.DrawFn, tspec: TypeSpec, depth: int = 0) -> Any:
    """A value of roughly the shape the model declares: a few fields of a message, a short
    list or map, a scalar of about the right type; sometimes a value of any type at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(values_of_any_type)
    if tspec.shape is Shape.MESSAGE:
        fields = field_specs(tspec.python)
        if depth >= 3 or not fields:
            return {}
        chosen = draw(st.lists(st.sampled_from(fields), max_size=3, unique_by=lambda f: f.name))
        return {f.yaml: draw(values_shaped_like(f.type, depth + 1)) for f in chosen}
    if tspec.shape is Shape.LIST:
        assert tspec.item is not None
        return draw(st.lists(values_shaped_like(tspec.item, depth + 1), max_size=3))
    if tspec.shape is Shape.MAP:
        assert tspec.item is not None
        keys = _strings_for_a_field() | st.integers(0, 70_000)
        return draw(st.dictionaries(keys, values_shaped_like(tspec.item, depth + 1), max_size=3))
    return draw(_scalars_for(tspec.python))


def _messages(value: Any, cls: type[Message]) -> list[tuple[dict[Any, Any], type[Message]]]:
    """The mappings of a document that the model reads as messages, with their classes."""
    if not isinstance(value, dict):
        return []
    found = [(value, cls)]
    by_key = fields_by_key(cls)
    for key, item in value.items():
        spec = by_key.get(key) if isinstance(key, str) else None
        if spec is None:
            continue
        tspec = spec.type
        if tspec.shape is Shape.MESSAGE:
            found += _messages(item, tspec.python)
        elif tspec.item is not None and tspec.item.shape is Shape.MESSAGE:
            items = item if isinstance(item, list) else []
            if isinstance(item, dict) and tspec.shape is Shape.MAP:
                items = list(item.values())
            for element in items:
                found += _messages(element, tspec.item.python)
    return found


def set_a_field_the_model_knows(draw: st.DrawFn, doc: Any) -> Any:
    """Any field of any message in the document, set to a value of roughly its shape: this
    reaches the validators of fields the corpus never sets."""
    kind = doc.get("kind") if isinstance(doc, dict) else None
    if not isinstance(kind, str) or kind not in KINDS:
        return doc
    messages = _messages(doc.get("spec"), KINDS[kind].spec)
    messages += _messages(doc.get("metadata"), ObjectMeta)
    if not messages:
        return doc
    mapping, cls = draw(st.sampled_from(messages))
    spec = draw(st.sampled_from(field_specs(cls)))
    mapping[spec.yaml] = draw(values_shaped_like(spec.type))
    return doc


Mutation = Callable[[st.DrawFn, Any], Any]
TREE_MUTATIONS: tuple[Mutation, ...] = (
    replace_a_value_with_another_type,
    delete_a_key,
    insert_an_unknown_key,
    misspell_a_key,
    duplicate_a_list_item,
    truncate_a_list,
    swap_an_enum_for_garbage,
    corrupt_a_duration,
    push_a_number_out_of_range,
    replace_a_string_with_a_tricky_one,
    wrap_a_scalar_in_a_list,
    unwrap_a_list,
    put_the_spec_under_another_kind,
    set_a_field_the_model_knows,
    set_a_field_the_model_knows,
    set_a_field_the_model_knows,
)


@st.composite
def mutated_documents(draw: st.DrawFn, mutations: tuple[Mutation, ...] = TREE_MUTATIONS) -> Any:
    """A corpus document after one to three random mutations."""
    doc = copy.deepcopy(draw(st.sampled_from(CORPUS_DOCUMENTS)))
    for mutate in draw(st.lists(st.sampled_from(mutations), min_size=1, max_size=3)):
        doc = mutate(draw, doc)
    return doc


@st.composite
def dumped(draw: st.DrawFn, docs: st.SearchStrategy[list[Any]]) -> str:
    """Documents written as one YAML stream, in block or flow style."""
    return yaml.safe_dump_all(
        draw(docs),
        sort_keys=False,
        allow_unicode=draw(st.booleans()),
        default_flow_style=draw(st.sampled_from([False, None, True])),
    )


mutated_document_texts = dumped(st.lists(mutated_documents(), min_size=1, max_size=1))
mutated_stream_texts = dumped(st.lists(mutated_documents(), min_size=2, max_size=3))
# Only known fields, set to values of about their shape: these get past decoding into the
# semantic validators more often than arbitrary mutations do.
documents_with_fields_set_at_random = dumped(
    st.lists(mutated_documents((set_a_field_the_model_knows,)), min_size=1, max_size=1)
)

# -- corrupting YAML text ------------------------------------------------------------------------

yaml_noise = st.text(
    st.sampled_from([*":-#&*!|>%@`?{}[],'\"\t\n\r \\<", "\x00", "\x1b", "\ufeff", "\x85"]),
    min_size=1,
    max_size=6,
)
stray_lines = st.sampled_from(
    [
        ":",
        "---",
        "...",
        "- ",
        "? ",
        "key: [",
        "key: {",
        "key: 'open",
        "%YAML 1.1",
        "%TAG ! tag:x,2024:",
        "!!binary x",
        "!!python/object:os.system x",
        "&anchor",
        "*anchor",
        "<<: *anchor",
        "<<: 1",
        "<<: [1]",
        "<<: {}",
        "spec: &a {hosts: *a}",
        "\t",
        "|",
        ">-",
    ]
)


def _lines(text: str) -> list[str]:
    return text.split("\n")


def delete_characters(draw: st.DrawFn, text: str) -> str:
    start = draw(st.integers(0, len(text)))
    return text[:start] + text[start + draw(st.integers(1, 30)) :]


def insert_characters(draw: st.DrawFn, text: str) -> str:
    at = draw(st.integers(0, len(text)))
    return text[:at] + draw(yaml_noise | st.text(max_size=5)) + text[at:]


def break_the_indentation(draw: st.DrawFn, text: str) -> str:
    lines = _lines(text)
    i = draw(st.integers(0, len(lines) - 1))
    shift = draw(st.integers(-4, 4))
    lines[i] = " " * shift + lines[i] if shift > 0 else lines[i][-shift:]
    return "\n".join(lines)


def indent_with_a_tab(draw: st.DrawFn, text: str) -> str:
    lines = _lines(text)
    i = draw(st.integers(0, len(lines) - 1))
    lines[i] = "\t" + lines[i].lstrip(" ")
    return "\n".join(lines)


def insert_a_stray_line(draw: st.DrawFn, text: str) -> str:
    lines = _lines(text)
    indent = " " * draw(st.integers(0, 6))
    lines.insert(draw(st.integers(0, len(lines))), indent + draw(stray_lines))
    return "\n".join(lines)


def duplicate_a_line(draw: st.DrawFn, text: str) -> str:
    lines = _lines(text)
    i = draw(st.integers(0, len(lines) - 1))
    lines.insert(draw(st.integers(0, len(lines))), lines[i])
    return "\n".join(lines)


yaml_tags = st.sampled_from(
    [
        "!foo",
        "!",
        "!!str",
        "!!int",
        "!!float",
        "!!bool",
        "!!null",
        "!!binary",
        "!!timestamp",
        "!!set",
        "!!omap",
        "!!seq",
        "!!python/name:os.system",
        "!<tag:x,2024:y>",
    ]
)


def tag_a_value(draw: st.DrawFn, text: str) -> str:
    """A YAML tag before a value: 'host: !!int reviews', '- !foo reviews'."""
    lines = _lines(text)
    tagged = [i for i, line in enumerate(lines) if ": " in line or line.lstrip().startswith("- ")]
    if not tagged:
        return text
    i = draw(st.sampled_from(tagged))
    marker = ": " if ": " in lines[i] else "- "
    head, _, tail = lines[i].partition(marker)
    lines[i] = f"{head}{marker}{draw(yaml_tags)} {tail}"
    return "\n".join(lines)


def truncate_the_text(draw: st.DrawFn, text: str) -> str:
    return text[: draw(st.integers(0, len(text)))]


TEXT_MUTATIONS = (
    delete_characters,
    insert_characters,
    break_the_indentation,
    indent_with_a_tab,
    insert_a_stray_line,
    duplicate_a_line,
    tag_a_value,
    truncate_the_text,
)


@st.composite
def corrupted_yaml_texts(draw: st.DrawFn) -> str:
    """A corpus file, or a dumped mutated document, after one to four text corruptions."""
    text = draw(st.sampled_from(CORPUS_TEXTS) | mutated_document_texts)
    for corrupt in draw(st.lists(st.sampled_from(TEXT_MUTATIONS), min_size=1, max_size=4)):
        text = corrupt(draw, text)
    return text


file_names = st.one_of(
    st.sampled_from(["mesh.yaml", "dir/sub dir/ünïcode.yml", "C:\\x.json"]),
    st.text(min_size=1, max_size=20),
)

# -- the properties ------------------------------------------------------------------------------

ALL_CODES = {value for value in vars(Codes).values() if isinstance(value, Code)}


def _max_line(text: str) -> int:
    # PyYAML counts \r\n, \r, \n, \x85, \u2028 and \u2029 as line breaks; splitlines() counts
    # those and a few more, so it bounds the line of any mark.
    return len(text.splitlines()) + 1


def _about_a_decoded_document(finding: Finding) -> bool:
    return finding.resource is not None or (
        finding.document >= 1 and finding.code != Codes.INVALID_YAML
    )


def assert_clean_finding(finding: Finding, file: str, text: str) -> None:
    assert finding.code in ALL_CODES, finding
    assert finding.message.strip(), finding
    assert finding.location.file == file, finding
    assert 0 <= finding.location.line <= _max_line(text), finding
    if _about_a_decoded_document(finding):
        assert finding.location.line >= 1, finding
    assert finding.format()
    assert finding.format(with_code=True)
    as_json = finding.to_json()
    assert json.loads(json.dumps(as_json, allow_nan=False)) == as_json


def _typed(value: Any, tspec: TypeSpec, path: str) -> list[str]:
    """Where ``value`` is not what the model declares, as field paths."""
    target = tspec.python
    if tspec.shape is Shape.MESSAGE:
        if type(value) is not target:
            return [f"{path}: {type(value).__name__} instead of {target.__name__}"]
        problems = []
        for spec in field_specs(target):
            item = getattr(value, spec.name)
            if item is None and not spec.required:
                continue
            problems += _typed(item, spec.type, f"{path}.{spec.yaml}")
        return problems
    if tspec.shape in (Shape.LIST, Shape.MAP):
        assert tspec.item is not None
        if tspec.shape is Shape.LIST and isinstance(value, tuple):
            items = {f"{path}[{i}]": item for i, item in enumerate(value)}
        elif tspec.shape is Shape.MAP and isinstance(value, FrozenMap):
            if not all(isinstance(key, str) for key in value):
                return [f"{path}: a key is not a string"]
            items = {f"{path}[{key}]": item for key, item in value.items()}
        else:
            return [f"{path}: {type(value).__name__} instead of a {tspec.shape.value}"]
        return [p for item_path, item in items.items() for p in _typed(item, tspec.item, item_path)]
    if target is object:
        return []
    if target in (int, float) and isinstance(value, bool):
        return [f"{path}: bool instead of {target.__name__}"]
    if target is float and isinstance(value, int):
        return []
    ok = isinstance(value, target) if isinstance(target, type) else False
    return [] if ok else [f"{path}: {type(value).__name__} instead of {target.__name__}"]


def assert_typed(resource: Resource[Any]) -> None:
    kind = KINDS[resource.kind]
    assert type(resource.spec) is kind.spec, resource
    assert type(resource.metadata) is ObjectMeta, resource
    problems = _typed(resource.spec, TypeSpec(Shape.MESSAGE, kind.spec), "spec")
    problems += _typed(resource.metadata, TypeSpec(Shape.MESSAGE, ObjectMeta), "metadata")
    assert not problems, (resource.ref, problems)


def _key(ref: ResourceRef) -> tuple[str, str, str]:
    # Decoding names an unnamed resource '<unnamed>' in its findings; its ref says ''.
    return (ref.kind, ref.namespace, ref.name or "<unnamed>")


def assert_errors_reject_their_resource(result: LoadResult) -> None:
    accepted = [_key(r.ref) for r in result.config]
    assert len(set(accepted)) == len(accepted), "the config holds a resource twice"
    rejected = {_key(r.ref) for r in result.rejected}
    loaded = Counter(_key(r.ref) for r in (*result.config, *result.rejected))
    blamed = {_key(f.resource) for f in result.errors if f.resource is not None}
    for ref in blamed:
        if ref[0] in KINDS:
            assert ref in rejected, f"{ref} has errors but is not rejected"
    for ref in accepted:
        if loaded[ref] == 1:
            assert ref not in blamed, f"{ref} has errors but is in the config"


def assert_clean_outcome(result: LoadResult, text: str, file: str) -> None:
    """Valid config or clean findings, whatever the text was."""
    assert result.files == (file,)
    for finding in result.findings:
        assert_clean_finding(finding, file, text)
    assert_errors_reject_their_resource(result)
    if not result.errors:
        assert not result.rejected
    # Rejected resources are typed too, "so analyzers and tools can look at them" (LoadResult),
    # and analysis takes them in: it must not raise on a load with errors either.
    for resource in (*result.config, *result.rejected):
        assert_typed(resource)
    for finding in analyze(result):
        assert_clean_finding(finding, file, text)


def _load(text: str, file: str) -> LoadResult:
    note(f"text:\n{text}")
    return load_text(text, file)


def test_the_corpus_documents_load_without_errors() -> None:
    assert len(CORPUS_DOCUMENTS) > 50
    for doc in CORPUS_DOCUMENTS:
        text = yaml.safe_dump(doc, sort_keys=False)
        result = load_text(text, "corpus.yaml")
        assert not result.errors, [f.format() for f in result.errors]
        assert len(result.config) == 1
        assert_clean_outcome(result, text, "corpus.yaml")


@THOROUGH
@given(text=mutated_document_texts, file=file_names)
def test_a_mutated_document_loads_to_config_or_clean_findings(text: str, file: str) -> None:
    result = _load(text, file)
    assert_clean_outcome(result, text, file)
    # One document: with errors nothing is accepted, without errors nothing is rejected.
    if result.errors:
        assert not result.config
    assert len(result.config) + len(result.rejected) <= 1


@THOROUGH
@given(text=documents_with_fields_set_at_random, file=file_names)
def test_known_fields_set_at_random_load_to_config_or_clean_findings(text: str, file: str) -> None:
    assert_clean_outcome(_load(text, file), text, file)


@FAST
@given(text=mutated_stream_texts, file=file_names)
def test_a_stream_of_mutated_documents_loads_to_config_or_clean_findings(
    text: str, file: str
) -> None:
    assert_clean_outcome(_load(text, file), text, file)


@THOROUGH
@given(text=corrupted_yaml_texts(), file=file_names)
def test_corrupted_yaml_text_loads_to_config_or_clean_findings(text: str, file: str) -> None:
    assert_clean_outcome(_load(text, file), text, file)


@FAST
@given(text=mutated_document_texts | corrupted_yaml_texts(), file=file_names)
def test_loading_the_same_text_twice_gives_the_same_findings(text: str, file: str) -> None:
    first, second = _load(text, file), load_text(text, file)
    assert first.findings == second.findings
    assert [f.format() for f in first.findings] == [f.format() for f in second.findings]
    assert [r.ref for r in first.config] == [r.ref for r in second.config]
    assert [r.ref for r in first.rejected] == [r.ref for r in second.rejected]
