"""The real fleet: SmolLM2 pulled and exported end to end answers a fact; failures leave nothing finished."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner

from calm_cli.cli import main
from calm_cli.fleet.store import Store, verify_dir

pytestmark = pytest.mark.fleet
pytest.importorskip("optimum.exporters.onnx")


def _copy_source(source_dir: Callable[[str], Path], home: Path, name: str) -> Path:
    """A private copy of a pulled model, so the test may damage it."""
    target = Store(home / "cache").source_dir(name)
    shutil.copytree(source_dir(name), target)
    return target


@pytest.fixture(scope="module")
def smollm2(fleet_store: Store, source_dir) -> dict[str, Path]:
    """SmolLM2 exported at both precisions through the real CLI."""
    source_dir("smollm2-135m")
    for args in (["smollm2-135m", "--precision", "fp32"], ["smollm2-135m", "--precision", "int4"], ["minilm-l6"]):
        result = CliRunner().invoke(main, ["models", "export", *args])  # route needs the routing encoder too
        assert result.exit_code == 0, result.output
    return fleet_store.exports("smollm2-135m")


def test_export_manifest_and_paris(smollm2: dict[str, Path]) -> None:
    for precision, directory in smollm2.items():
        assert verify_dir(directory) == []
        manifest = json.loads((directory / "manifest.json").read_text())
        assert manifest["precision"] == precision
        assert manifest["source_sha256"]["model.gguf"] == \
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
        assert {"torch", "transformers", "optimum", "onnx"} <= set(manifest["stack"])
        assert manifest["report"]["peak_rss_mb"] > 100
    answer = CliRunner().invoke(main, ["route", "--model", "smollm2-135m", "What is the capital of France?"],
                                env={"CALM_PRECISION": "fp32"})
    assert answer.exit_code == 0, answer.output
    assert "Paris" in answer.output


def test_int4_agrees_with_fp32_when_fed_the_same_text(smollm2: dict[str, Path]) -> None:
    """Teacher-forced top-1 agreement of the GGUF-block int4 graph with the dequantized fp32 graph.

    (Greedy answers can part at near-ties: on 'What is the capital of France?' fp32 prefers 'The' over
    'L' by 0.08 logits, and llama.cpp on the same GGUF, like int4, says 'L'Étoile'.)"""
    from calm_cli.engine import decode
    from calm_cli.engine.decoder import Decoder
    from calm_cli.engine.prompt import render
    from calm_cli.fleet import lock

    spec = lock.load()["smollm2-135m"]
    fp32, int4 = Decoder.load(smollm2["fp32"]), Decoder.load(smollm2["int4"])
    same = total = 0
    for q in ("What is the capital of France?", "Write a Python function that adds two numbers.",
              "Name three colours of the rainbow.", "Why is the sky blue?", "What is 12 plus 7?"):
        ids = fp32.encode(render(spec.prompt, q))
        text = ids + list(decode.greedy(fp32, ids, 40))
        a, b = decode.logits(fp32, text)[len(ids) - 1:-1], decode.logits(int4, text)[len(ids) - 1:-1]
        same += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(a)
    # At accuracy level 4 (int8 activations, as llama.cpp): 0.973 over 20 prompts (docs/EXPORT.md), 161/167 on
    # these. A guard against a broken block mapping (a second quantization of dequantized weights gave 0.82),
    # not the 0.99 target.
    assert same / total >= 0.95, f"{same}/{total}"


def test_damaged_source_is_named_and_fetched_again(calm_home: Path, source_dir) -> None:
    source = _copy_source(source_dir, calm_home, "smollm2-135m")
    with (source / "model.gguf").open("r+b") as fh:
        fh.seek(4096)
        fh.write(b"\xff" * 16)
    result = CliRunner().invoke(main, ["models", "pull", "smollm2-135m"])
    assert result.exit_code == 0, result.output
    assert "damaged:" in result.output and "model.gguf: sha256" in result.output
    assert verify_dir(source) == []


def test_killed_export_leaves_nothing_that_looks_finished(calm_home: Path, source_dir) -> None:
    _copy_source(source_dir, calm_home, "smollm2-135m")
    store = Store(calm_home / "cache")
    env = {**os.environ, "CALM_HOME": str(calm_home)}
    proc = subprocess.Popen([sys.executable, "-m", "calm_cli", "models", "export", "smollm2-135m",
                             "--precision", "fp32"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    stage_glob = "onnx-fp32.partial-*"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        written = [p for d in store.model_dir("smollm2-135m").glob(stage_glob) for p in d.rglob("*.onnx")]
        if written and written[0].stat().st_size > 0:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the export never started writing")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not store.export_dir("smollm2-135m", "fp32").exists()
    listed = CliRunner().invoke(main, ["models", "list", "--json"])
    state = {m["name"]: m["state"] for m in json.loads(listed.output)}
    assert state["smollm2-135m"] == "pulled"


def test_export_of_a_truncated_gguf_fails_cleanly(calm_home: Path, source_dir) -> None:
    """The worker itself fails midway (transformers cannot read the weights): nothing is kept."""
    source = _copy_source(source_dir, calm_home, "smollm2-135m")
    from calm_cli.fleet import lock
    from calm_cli.fleet.export import ExportError, export

    with (source / "model.gguf").open("r+b") as fh:
        fh.truncate(50_000_000)
    store = Store(calm_home / "cache")
    with pytest.raises(ExportError, match="export failed"):
        export(lock.load()["smollm2-135m"], store, "fp32", lambda m: None)
    assert not store.export_dir("smollm2-135m", "fp32").exists()
    assert not list(store.model_dir("smollm2-135m").glob("onnx-*"))
