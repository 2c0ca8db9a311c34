"""Hostile input never takes calm down: request lines, policies and settings, each through its real entry
point (schema.parse_request, policy.load on files, settings.problems and the CLI's start-up check).

First the concrete cases users reported, then hypothesis. The normal run is bounded: fixed seeds
(derandomize), QUICK examples per target, well under a minute. `pytest -m fuzz tests/test_fuzz.py -s` runs
LONG examples per target and prints what it saw (outcomes, slowest example).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator

import jsonschema
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from calm_cli import bounded, policy, schema, settings
from calm_cli.loop import monitor
from calm_cli.cli import main
from calm_cli.resources import POLICIES, SCHEMAS

QUICK, LONG = 120, 10_000
FAST = hsettings(max_examples=QUICK, derandomize=True, deadline=None, database=None,
                 suppress_health_check=list(HealthCheck))
SLOW = hsettings(FAST, max_examples=LONG)
ONLY_WHEN_SELECTED = pytest.mark.skipif("'fuzz' not in config.getoption('markexpr')",
                                        reason="the long fuzz run: select it with -m fuzz")
REQUEST = jsonschema.Draft202012Validator(json.loads((SCHEMAS / "request.schema.json").read_text()))
BASE_TEXT = (POLICIES / "default.yaml").read_text(encoding="utf-8")
BASE = yaml.safe_load(BASE_TEXT)

# Per target: outcome counts and the slowest example (seconds), printed at the end of the module.
SEEN: dict[str, Counter] = defaultdict(Counter)
SLOWEST: dict[str, float] = defaultdict(float)


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    for target, outcomes in sorted(SEEN.items()):
        print(f"\nfuzz {target}: {sum(outcomes.values())} examples, slowest {SLOWEST[target]:.3f} s, "
              f"outcomes {dict(outcomes.most_common())}")


def _timed(target: str, run: Callable[[], str]) -> None:
    start = time.perf_counter()
    outcome = run()
    SLOWEST[target] = max(SLOWEST[target], time.perf_counter() - start)
    SEEN[target][outcome] += 1


def _one_line(line: str, limit: int) -> None:
    assert isinstance(line, str) and line and len(line.splitlines()) == 1 and len(line) <= limit, line[:500]


# -- request lines ------------------------------------------------------------------------------------------

def check_line(raw: bytes, size: int | None = None) -> schema.RequestLine:
    """parse_request's contract: a valid request, or a documented error code and one bounded line; either
    way a record that can be written as UTF-8 JSON."""
    got = schema.parse_request(raw, 7, size)
    assert isinstance(got, schema.RequestLine)
    assert isinstance(got.id, (str, int)) and not isinstance(got.id, bool)
    if got.request is None:
        assert got.code in monitor.ERROR_CODES
        _one_line(got.message, schema.MAX_MESSAGE_CHARS)
        record = monitor.error_record(got.id, got.code, got.message)
    else:
        assert got.code is None and got.message is None and got.request["id"] == got.id
        assert REQUEST.is_valid(got.request), got.request
        assert all(math.isfinite(v) for v in got.request.values() if isinstance(v, float))
        assert all(type(got.request[k]) is int for k in ("max_tokens", "top_k", "seed") if k in got.request)
        assert "\0" not in got.request.get("query", "")
        record = got.request
    json.dumps(record, ensure_ascii=False, allow_nan=False).encode("utf-8")
    return got


@pytest.mark.parametrize("raw,code,message", [
    (b"[" * 1000 + b"]" * 1000, "too_large", "line 7: nested deeper than 64 levels"),
    (b'{"query": "x", "max_tokens": ' + b"9" * 5000 + b"}", "too_large",
     "line 7: an integer of 5000 characters, over 32"),
    (b'{"query": "x", "temperature": NaN}', "bad_json", "line 7: NaN is not JSON (numbers must be finite)"),
    (b'{"query": "x", "temperature": -Infinity}', "bad_json",
     "line 7: -Infinity is not JSON (numbers must be finite)"),
    (b'{"query": "x", "temperature": 1e999}', "too_large", "line 7: the number 1e999 is beyond the range of a float"),
    (b'{"query": "a\\u0000b"}', "bad_request", "line 7: query: a NUL character is not allowed"),
    (b'{"query": "\\ud800"}', "bad_request", "line 7: query: a lone surrogate (\\ud800-\\udfff) is not Unicode text"),
    (b'{"query": "x", "query": "y"}', "bad_json", "line 7: key 'query' appears twice"),
    (b'{"query": "x", "seed": -1}', "bad_request", "line 7: seed: -1 is less than the minimum of 0"),
    (b'{"query": "x", "max_tokens": 5.0}', "bad_request", "line 7: max_tokens: 5.0 is not of type 'integer'"),
    (b'{"query": "x", "seed": 9223372036854775808}', "bad_request",
     "line 7: seed: an integer outside the 64-bit range is not allowed"),
    (b"[" * 64 + b"]" * 64, "bad_request", "line 7: (top level): " + "[" * 59 + "… is not of type 'object'"),
    (b"[" * 65 + b"]" * 65, "too_large", "line 7: nested deeper than 64 levels"),
    (b'"' + b"[" * 100 + b'"', "bad_request", "line 7: (top level): '" + "[" * 58 + "… is not of type 'object'"),
    (b"\xff", "bad_utf8", "line 7 is not valid UTF-8 (byte 0)"),
    (b"", "bad_json", "line 7: Expecting value: line 1 column 1 (char 0)"),
    (b'{"qurey": "x"}', "bad_request", "line 7: (top level): 'query' is a required property; line 7: (top level): "
                                       "Additional properties are not allowed ('qurey' was unexpected)"),
])
def test_reported_request_lines(raw: bytes, code: str, message: str) -> None:
    got = check_line(raw)
    assert (got.code, got.message, got.id) == (code, message, 7)


def test_line_size_bound() -> None:
    def line(size: int) -> bytes:
        return b'{"query": "x"' + b" " * (size - 14) + b"}"

    assert len(line(bounded.MAX_LINE_BYTES)) == bounded.MAX_LINE_BYTES
    assert check_line(line(bounded.MAX_LINE_BYTES)).request == {"query": "x", "id": 7}
    assert check_line(line(bounded.MAX_LINE_BYTES + 1)).message == \
        f"line 7 has {bounded.MAX_LINE_BYTES + 1} bytes, over {bounded.MAX_LINE_BYTES}"
    # serving keeps only the first MAX_LINE_BYTES + 1 bytes of a long line and passes its true size
    assert check_line(line(bounded.MAX_LINE_BYTES + 1), size=10**9).message == \
        f"line 7 has {10**9} bytes, over {bounded.MAX_LINE_BYTES}"


@pytest.mark.parametrize("line_id,echoed", [
    ('"a"', "a"), ("12", 12), ("-9223372036854775808", -9223372036854775808), ('""', ""),
    ("true", 7), ("1.5", 7), ('"' + "z" * 257 + '"', 7), ('"a\\u0000"', 7), ('"\\udc00"', 7),
    ("9223372036854775808", 7), ("[1]", 7),
])
def test_error_records_carry_the_id_only_when_it_is_valid(line_id: str, echoed: Any) -> None:
    got = check_line(f'{{"id": {line_id}, "query": 5}}'.encode())
    assert got.code == "bad_request" and got.id == echoed


def test_valid_requests_get_their_line_number_as_id() -> None:
    assert check_line(b'{"query": "hi", "temperature": 0.5}') == \
        schema.RequestLine({"query": "hi", "temperature": 0.5, "id": 7}, None, None, 7)
    assert check_line(b'{"type": "stats", "id": "s"}').request == {"type": "stats", "id": "s"}


_scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
            | st.text(alphabet=st.characters(codec=None) | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
                      max_size=20))
_json_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=5)
                            | st.dictionaries(st.text(max_size=8), inner, max_size=5), max_leaves=20)
_requests = st.fixed_dictionaries({}, optional={
    "id": _json_values, "query": st.text(min_size=0, max_size=50) | _scalars,
    "model": st.sampled_from(["smollm2-135m", "Gemma", ""]) | _scalars,
    "max_tokens": st.integers(-5, 40000) | _scalars, "temperature": st.floats() | _scalars,
    "top_p": st.floats() | _scalars, "top_k": st.integers(-2, 2**64) | _scalars,
    "seed": st.integers(-2**65, 2**65) | _scalars, "domain": _scalars, "type": st.just("stats") | _scalars,
    "extra": _json_values})

_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=60)
_valid_requests = st.fixed_dictionaries({"query": _text}, optional={
    "id": st.integers(-2**63, 2**63 - 1) | st.text(max_size=20),
    "model": st.from_regex(r"[a-z0-9][a-z0-9.-]{0,20}", fullmatch=True),
    "max_tokens": st.integers(1, 32768), "temperature": st.floats(0, 10), "top_p": st.floats(0, 1, exclude_min=True),
    "top_k": st.integers(0, 1000000), "seed": st.integers(0, 2**63 - 1), "domain": st.text(max_size=64)})


def _encode(value: Any, how: str) -> bytes:
    text = json.dumps(value, ensure_ascii=how == "ascii")  # NaN and Infinity included, as JSON must refuse them
    return text.encode("utf-8", "surrogatepass")  # lone surrogates as bytes: not UTF-8


@st.composite
def _mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    """Byte-level edits of a line: inserted JSON-ish tokens or bytes, deletions, duplicated slices."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data)))
        edit = draw(st.sampled_from(["insert", "delete", "token", "repeat"]))
        if edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=6))
        elif edit == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        elif edit == "token":
            data[at:at] = draw(st.sampled_from([b"[", b"{", b"]", b"}", b'"', b"\\", b",", b":", b"NaN", b"-Infinity",
                                                b"1e999", b"\\u0000", b"\\ud800", b"\\udfff", b"\x00", b"\xff",
                                                b"\xed\xa0\x80", b"-", b"0", b'"id":', b'"query":', b"9" * 40]))
        else:
            data[at:at] = bytes(data[at:at + draw(st.integers(1, 40))]) * draw(st.integers(1, 60))
    return bytes(data)


@st.composite
def _structures(draw: st.DrawFn) -> bytes:
    """Lines built to cross each bound: depth, integer length, line size, values and items."""
    kind = draw(st.sampled_from(["deep", "int", "float", "size", "items", "wide"]))
    n = draw(st.integers(0, 3000))
    if kind == "deep":
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}"), ('{"query": "x", "id": [', "]}")]))
        inner = draw(st.sampled_from(["1", '"q"', "", "NaN"]))
        return (opener * n + inner + closer * draw(st.integers(0, n))).encode()
    if kind == "int":
        digits = draw(st.integers(0, 6000))
        return b'{"query": "x", "seed": ' + draw(st.sampled_from([b"", b"-"])) + b"1" * max(digits, 1) + b"}"
    if kind == "float":
        return b'{"query": "x", "temperature": 1' + b"0" * draw(st.integers(0, 400)) + b"." + b"5e" + \
            str(draw(st.integers(-400, 400))).encode() + b"}"
    if kind == "size":
        return b'{"query": "' + b"a" * (bounded.MAX_LINE_BYTES - 20 + n % 60) + b'"}'
    if kind == "items":
        return ("[" + ",".join(["0"] * (n * 5)) + "]").encode()
    return ("{" + ",".join(f'"k{i}": {i}' for i in range(n)) + "}").encode()


request_lines = st.one_of(
    st.binary(max_size=200),
    st.builds(_encode, _valid_requests, st.sampled_from(["ascii", "utf8"])),
    _mutated(st.builds(_encode, _valid_requests, st.just("utf8"))),
    st.builds(_encode, _json_values, st.sampled_from(["ascii", "utf8"])),
    st.builds(_encode, _requests, st.sampled_from(["ascii", "utf8"])),
    _mutated(st.builds(_encode, _requests, st.just("ascii"))),
    _structures(),
)


def _line_target(raw: bytes) -> None:
    _timed("request lines", lambda: check_line(raw).code or "ok")


@FAST
@given(request_lines)
def test_fuzz_request_lines(raw: bytes) -> None:
    _line_target(raw)


@pytest.mark.fuzz
@ONLY_WHEN_SELECTED
@SLOW
@given(request_lines)
def test_fuzz_request_lines_long(raw: bytes) -> None:
    _line_target(raw)


# -- policies -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


KINDS = ["nested deeper", "aliases are expanded", "recursive alias", "an integer of", "NaN/inf", "64-bit range",
         "NUL", "lone surrogate", "not a string", "items, over", f"more than {bounded.MAX_VALUES} values",
         "duplicate key", "invalid YAML: invalid ", "invalid YAML", "not UTF-8", "bytes, the limit"]


def check_policy(path: Path) -> str:
    """policy.load's contract: a Policy with finite numbers, or InvalidFile with one bounded line per
    problem, each naming the file."""
    try:
        loaded = policy.load(path)
    except schema.InvalidFile as exc:
        assert 1 <= len(exc.problems) <= schema.MAX_PROBLEMS + 1
        for line in exc.problems:
            _one_line(line, bounded.MAX_PROBLEM_CHARS)
            assert line.startswith(f"{path}: "), line
        return next((kind for kind in KINDS if kind in exc.problems[0]), "schema or models.lock")
    numbers = [v for part in (loaded.goals, loaded.weights, loaded.cache, loaded.queue, loaded.escalation,
                              loaded.energy, loaded.routing) for v in part.values() if isinstance(v, (int, float))]
    numbers += [x for m in loaded.fleet for x in (m.max_tokens, m.temperature)]
    assert all(math.isfinite(x) and abs(x) <= 10**7 for x in numbers), numbers
    return "ok"


def _paths(data: Any, path: tuple = ()) -> list[tuple]:
    found = [path]
    if isinstance(data, dict):
        found += [p for k, v in data.items() for p in _paths(v, path + (k,))]
    elif isinstance(data, list):
        found += [p for i, v in enumerate(data) for p in _paths(v, path + (i,))]
    return found


POLICY_PATHS = _paths(BASE)
_hostile_values = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 0, -1, 10**7 + 1, 2**63, 2**64, 1e308, -0.0, True, None, "",
                     "\0", "x" * 5000, [], {}, "qwen2.5-coder-1.5b", "minilm-l6", 4.0]),
    st.integers(-2**70, 2**70), st.floats(), st.text(max_size=30), _json_values,
)


@st.composite
def _mutated_policy_data(draw: st.DrawFn) -> str:
    """The default policy with values replaced, keys dropped or added, then dumped as YAML."""
    data = json.loads(json.dumps(BASE))
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(POLICY_PATHS))
        if not path:
            continue
        parent = data
        try:
            for part in path[:-1]:
                parent = parent[part]
            edit = draw(st.sampled_from(["replace", "drop", "add"]))
            if edit == "replace":
                parent[path[-1]] = draw(_hostile_values)
            elif edit == "drop":
                del parent[path[-1]]
            elif isinstance(parent, dict):
                parent[draw(st.text(max_size=10))] = draw(_hostile_values)
        except (KeyError, IndexError, TypeError):  # an earlier edit removed or replaced this path
            continue
    return yaml.safe_dump(data, allow_unicode=draw(st.booleans()))


_yaml_tokens = st.sampled_from([
    "&a ", "*a", "*b", "&b [*a, *a, *a]", "<<: *a\n", "!!int ", "!!float ", "!!binary ", "!!set ", "!!omap ",
    "!!python/object/apply:os.system ['true']", "!!timestamp ", "2020-13-45", "[", "]", "{", "}", ": ", "- ",
    "\n", "\n  ", "\t", "? ", "|\n", ">-\n", "'", '"', "#", "%YAML 1.1\n---\n", "---\n", "...\n", ".nan", ".inf",
    "-.inf", "0x" + "f" * 40, "0o777", "0b101", "190:20:30", "1_000", "1" * 40, "1" * 5000, "\x00", "\ufeff",
    '"\\ud800"', '"\\0"', '"\\x85"', "\u2028", "\x85", "~", "null", "yes", "1e5", "1.0e+400", "\\",
])


@st.composite
def _mutated_policy_text(draw: st.DrawFn) -> bytes:
    """Text-level edits of the default policy: YAML tokens, bytes, deletions and repeats at random places."""
    text = BASE_TEXT
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(text)))
        edit = draw(st.sampled_from(["token", "token", "delete", "repeat", "text"]))
        if edit == "token":
            text = text[:at] + draw(_yaml_tokens) + text[at:]
        elif edit == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 40)):]
        elif edit == "repeat":
            text = text[:at] + text[at:at + draw(st.integers(1, 60))] * draw(st.integers(1, 50)) + text[at:]
        else:
            text = text[:at] + draw(st.text(max_size=10)) + text[at:]
    data = text.encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 20)) == 0:  # now and then a stray byte that is not UTF-8
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=3)) + data[at:]
    return data


@st.composite
def _policy_structures(draw: st.DrawFn) -> str:
    """Documents built to cross each bound: nesting, aliases (bombs, merges, recursion), numbers, sizes."""
    kind = draw(st.sampled_from(["flow", "block", "bomb", "merge", "recursive", "int", "keys", "items", "scalar",
                                 "documents"]))
    n = draw(st.integers(1, 700))
    if kind == "flow":
        return "name: x\nfleet: " + "[" * n + draw(st.sampled_from(["", "1", "{a: 1}"])) + "]" * n + "\n"
    if kind == "block":
        return "".join("  " * i + draw(st.sampled_from(["a:\n", "- \n"])) for i in range(min(n, 200)))
    if kind == "bomb":
        levels, fanout = draw(st.integers(1, 12)), draw(st.integers(2, 12))
        lines = [f"a0: &a0 [{', '.join(['x'] * fanout)}]"]
        lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * fanout)}]" for i in range(1, levels + 1)]
        return "\n".join(lines) + "\n" + BASE_TEXT.replace("name: default", f"name: *a{levels}")
    if kind == "merge":
        levels = draw(st.integers(1, 30))
        lines = ["m0: &m0 {a: 1, b: 2}"] + [f"m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}], k{i}: {i}}}"
                                            for i in range(1, levels + 1)]
        return "\n".join(lines) + "\n"
    if kind == "recursive":
        return draw(st.sampled_from(["a: &a [*a]\n", "a: &a {b: *a}\n", "a: &a {<<: *a}\n", "&a [*a, 1]\n"]))
    if kind == "int":
        digits = draw(st.integers(1, 6000))
        prefix = draw(st.sampled_from(["", "-", "+", "0x", "0o", "0b", "0"]))
        digit = {"0x": "f", "0b": "1"}.get(prefix, "7")
        return BASE_TEXT.replace("max_loaded: 4", f"max_loaded: {prefix}{digit * digits}")
    if kind == "keys":
        return "".join(f"k{i}: {i}\n" for i in range(n * 5))
    if kind == "items":
        return "[" + ", ".join(["{a: 1}"] * (n * 3)) + "]\n"
    if kind == "scalar":
        return "name: " + "x" * (n * 1000) + "\n"
    return "---\n".join([BASE_TEXT] * min(n, 3))


policy_documents = st.one_of(
    _mutated_policy_data().map(lambda t: t.encode("utf-8", "surrogatepass")),
    _mutated_policy_text(),
    _policy_structures().map(str.encode),
    st.binary(max_size=300),
)


def _policy_target(workdir: Path, document: bytes) -> None:
    path = workdir / "policy.yaml"
    path.write_bytes(document)
    _timed("policies", lambda: check_policy(path))


@FAST
@given(document=policy_documents)
def test_fuzz_policies(workdir: Path, document: bytes) -> None:
    _policy_target(workdir, document)


@pytest.mark.fuzz
@ONLY_WHEN_SELECTED
@SLOW
@given(document=policy_documents)
def test_fuzz_policies_long(workdir: Path, document: bytes) -> None:
    _policy_target(workdir, document)


def _validate_target(workdir: Path, documents: list[bytes]) -> None:
    """`calm policy validate a b c`: every file gets its verdict, in order; exit 1 if any failed."""
    files = []
    for i, document in enumerate(documents):
        files.append(workdir / f"many-{i}.yaml")
        files[-1].write_bytes(document)

    def run() -> str:
        result = CliRunner().invoke(main, ["policy", "validate", *map(str, files)])
        assert isinstance(result.exception, (SystemExit, type(None))), result.exception
        verdicts = [line.split(": ")[0] for line in result.stdout.splitlines() + result.stderr.splitlines()]
        assert set(verdicts) == set(map(str, files)), verdicts
        failed = {line.split(": ")[0] for line in result.stderr.splitlines()}
        assert result.exit_code == (1 if failed else 0)
        return f"{len(failed)} of {len(files)} failed"

    _timed("policy validate", run)


@FAST
@given(documents=st.lists(policy_documents, min_size=1, max_size=4))
def test_fuzz_policy_validate(workdir: Path, documents: list[bytes]) -> None:
    _validate_target(workdir, documents)


@pytest.mark.fuzz
@ONLY_WHEN_SELECTED
@SLOW
@given(documents=st.lists(policy_documents, min_size=1, max_size=4))
def test_fuzz_policy_validate_long(workdir: Path, documents: list[bytes]) -> None:
    _validate_target(workdir, documents)


# -- settings -----------------------------------------------------------------------------------------------

_env_text = st.text(alphabet=st.characters(codec=None, exclude_characters="\0",
                                           exclude_categories=["Cs"]) | st.characters(min_codepoint=0xDC80,
                                                                                      max_codepoint=0xDCFF),
                    max_size=40)  # what os.environ can hold: no NUL; undecodable bytes as U+DC80..U+DCFF
_env_values = st.one_of(
    _env_text,
    st.integers(-2**70, 2**70).map(str),
    st.floats().map(repr),
    st.sampled_from(["0", "1", "2", "1024", "1025", "auto", "cuda", "cpu", "int4", "fp32", "AUTO", " 1", "1 ",
                     "1_0", "٣", "0x1", "1e3", "nan", "inf", "-0", "15", "0.0001", "1000", "1000.0001",
                     "python -m pip", "'", '"a b', "~", "~nosuchuser/x", "/dev/null", "/dev/null/x", "."]),
)
# Directories: only places under the example's own temporary HOME and working directory, /proc and /dev
# (where nothing can be made), so checking them for writing never touches the real filesystem.
_dir_values = st.sampled_from(["home-file", "home-file/sub", "dir", "dir/new/deeper", "rel", "~/x", "~",
                               "/proc/calm-fuzz", "/proc/self", "/dev/null", "/dev/null/x", "x" * 300,
                               "dir/" + "y" * 300, "link-loop", "link-loop/x"])
_settings_envs = st.dictionaries(st.sampled_from([s.env for s in settings.SETTINGS.values()]),
                                 _env_values, max_size=4)
_dir_envs = st.dictionaries(st.sampled_from(["CALM_HOME", "CALM_CACHE_DIR", "CALM_DATA_DIR", "CALM_CONFIG_DIR"]),
                            _dir_values, min_size=1, max_size=3)


def check_settings(workdir: Path, env: dict[str, str], writable: tuple[str, ...]) -> str:
    """The settings' contract: problems() is one line per bad variable, naming it; each get() returns or
    raises SettingError naming its variable; the CLI starts, or exits 2 printing exactly those lines."""
    home = workdir / "home"
    home.mkdir(exist_ok=True)
    (home / "home-file").write_text("x")
    (home / "dir").mkdir(exist_ok=True)
    if not (home / "link-loop").is_symlink():
        (home / "link-loop").symlink_to(home / "link-loop")
    names = {s.env for s in settings.SETTINGS.values()}
    with pytest.MonkeyPatch.context() as mp:
        for var in [v for v in os.environ if v.startswith(("CALM_", "XDG_"))]:
            mp.delenv(var)
        mp.setenv("HOME", str(home))
        mp.chdir(home)
        for var, value in env.items():
            mp.setenv(var, value)
        lines = settings.problems()
        for line in lines:
            _one_line(line, bounded.MAX_PROBLEM_CHARS)
            assert line.split("=")[0].split(" ")[0] in names, line
        for s in settings.SETTINGS.values():
            try:
                s.value()
            except settings.SettingError as exc:
                assert str(exc).startswith(s.env) and s.reason() is not None
        if writable:
            probed = settings.problems(writable=writable)
            assert probed == lines if lines else all(
                any(line.startswith(settings.SETTINGS[name].env) for name in writable) for line in probed)
        result = CliRunner().invoke(main, ["policy", "validate", str(POLICIES / "default.yaml")])
        assert isinstance(result.exception, (SystemExit, type(None))), result.exception
        assert result.exit_code == (2 if lines else 0), result.output
        if lines:
            assert result.stderr.splitlines() == [f"calm: {line}" for line in lines]
    return f"{len(lines)} problem(s)"


def _settings_target(workdir: Path, env: dict[str, str], writable: tuple[str, ...]) -> None:
    _timed("settings", lambda: check_settings(workdir, env, writable))


@FAST
@given(env=_settings_envs)
def test_fuzz_settings(workdir: Path, env: dict[str, str]) -> None:
    _settings_target(workdir, env, ())


@FAST
@given(env=_dir_envs, writable=st.sampled_from([(), ("data_dir",), ("data_dir", "cache_dir")]))
def test_fuzz_directory_settings(workdir: Path, env: dict[str, str], writable: tuple[str, ...]) -> None:
    _settings_target(workdir, env, writable)


@pytest.mark.fuzz
@ONLY_WHEN_SELECTED
@SLOW
@given(env=_settings_envs)
def test_fuzz_settings_long(workdir: Path, env: dict[str, str]) -> None:
    _settings_target(workdir, env, ())


@pytest.mark.fuzz
@ONLY_WHEN_SELECTED
@SLOW
@given(env=_dir_envs, writable=st.sampled_from([(), ("data_dir",), ("data_dir", "cache_dir")]))
def test_fuzz_directory_settings_long(workdir: Path, env: dict[str, str], writable: tuple[str, ...]) -> None:
    _settings_target(workdir, env, writable)

