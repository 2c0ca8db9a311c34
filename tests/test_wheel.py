"""The wheel carries everything calm reads at run time (models.lock, schemas, policies) and nothing else: built
from a copy of the project, installed with its real dependencies into a fresh virtual environment outside the
source tree, it validates policies, lists the fleet and answers on the tiny fleet."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml

from calm_cli import resources
from calm_cli.fleet import lock

PROJECT = Path(__file__).resolve().parent.parent
SHIPPED = ("models.lock", "schemas", "policies")


def test_the_package_data_is_the_root_files_themselves() -> None:
    """The root files are the reviewed copies; calm_cli/data only links to them, so the two cannot drift."""
    for name in SHIPPED:
        assert not (PROJECT / name).is_symlink()
        link = PROJECT / "calm_cli" / "data" / name
        assert link.is_symlink() and link.resolve() == PROJECT / name
    # Run from the checkout (editable install): resources reads the root files.
    assert (resources.LOCK, resources.SCHEMAS, resources.POLICIES) == tuple(PROJECT / n for n in SHIPPED)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel pip builds for `pip install .`, built from a copy so the shared checkout gets no build/."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "src"
    shutil.copytree(PROJECT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(base / "dist"), str(source)], capture_output=True, text=True, cwd=base)
    assert built.returncode == 0, built.stderr
    wheels = list((base / "dist").glob("calm_cli-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_the_wheel_holds_the_package_and_its_data_and_nothing_else(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        data = {n: z.read(n) for n in names if n.startswith("calm_cli/data/")}
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    code = {p.relative_to(PROJECT).as_posix() for p in (PROJECT / "calm_cli").rglob("*.py")
            if "__pycache__" not in p.parts and "data" not in p.relative_to(PROJECT / "calm_cli").parts}
    assert {n for n in names if n.endswith(".py")} == code
    want = {"calm_cli/data/models.lock": (PROJECT / "models.lock").read_bytes()}
    for folder, pattern in (("schemas", "*.json"), ("policies", "*.yaml")):
        want |= {f"calm_cli/data/{folder}/{p.name}": p.read_bytes() for p in (PROJECT / folder).glob(pattern)}
    assert data == want
    dist_info = {n for n in names if n.startswith("calm_cli-") and ".dist-info/" in n}
    assert names - code - set(data) - dist_info == set()  # no tests, docs, caches or build leftovers
    # The serving install stays lean: the export stack comes only with the [export] extra.
    heavy = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: ")
             and line.split()[1].split("=")[0] in ("torch", "transformers", "optimum")]
    assert heavy and all('extra == "export"' in line for line in heavy)


def _run(venv: Path, *args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_installed_wheel_validates_lists_and_routes_outside_the_tree(wheel: Path, tmp_path: Path,
                                                                     request: pytest.FixtureRequest) -> None:
    """pip installs the wheel and its dependencies (from the wheel's metadata) into a fresh venv; run from a
    directory outside the checkout, with nothing pointing back at it, calm reads its data from site-packages."""
    pytest.importorskip("optimum.exporters.onnx")  # this process builds the tiny fleet
    tiny_home = request.getfixturevalue("tiny_home")
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CALM_") and k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, cwd=tmp_path)
    installed = _run(venv, "python", "-m", "pip", "install", "--disable-pip-version-check", str(wheel),
                     env=env, cwd=tmp_path)
    assert installed.returncode == 0, installed.stdout + installed.stderr

    where = _run(venv, "python", "-c", "import calm_cli, importlib.util as u; print(calm_cli.__file__); "
                 "print([m for m in ('torch', 'transformers', 'optimum') if u.find_spec(m)])", env=env, cwd=tmp_path)
    package_file, heavy = where.stdout.splitlines()
    assert Path(package_file).is_relative_to(venv) and heavy == "[]", where.stdout + where.stderr

    policies = tmp_path / "policies"
    shutil.copytree(PROJECT / "policies", policies)
    broken = policies / "broken.yaml"
    broken.write_text(yaml.safe_dump({**yaml.safe_load((policies / "default.yaml").read_text()), "weights": 3}))
    shipped = sorted(str(p) for p in policies.glob("*.yaml") if p != broken)
    valid = _run(venv, "calm", "policy", "validate", *shipped, env=env, cwd=tmp_path)
    assert valid.returncode == 0, valid.stderr
    assert valid.stdout.splitlines() == [f"{p}: ok" for p in shipped]
    invalid = _run(venv, "calm", "policy", "validate", str(broken), env=env, cwd=tmp_path)
    assert invalid.returncode == 1 and f"{broken}: weights" in invalid.stderr, invalid.stderr
    assert "Traceback" not in invalid.stderr
    shown = _run(venv, "calm", "policy", "show", env=env, cwd=tmp_path)
    assert shown.returncode == 0 and shown.stdout.startswith(f"# {venv}"), shown.stdout + shown.stderr

    serve = {**env, "CALM_HOME": str(tiny_home), "CALM_DATA_DIR": str(tmp_path / "data"), "CALM_PRECISION": "fp32"}
    listed = _run(venv, "calm", "models", "list", "--json", env=serve, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert [(m["name"], m["state"]) for m in json.loads(listed.stdout)] == [(n, "exported") for n in lock.load()]

    response = jsonschema.Draft202012Validator(json.loads((PROJECT / "schemas" / "response.schema.json").read_text()))
    for args in (["--model", "smollm2-135m"], []):  # the named model, then the default policy's own choice
        routed = _run(venv, "calm", "route", "--json", "--max-tokens", "4", *args, "hi", env=serve, cwd=tmp_path)
        assert routed.returncode == 0, routed.stderr
        record = json.loads(routed.stdout)
        response.validate(record)
        assert record["error"] is None and record["routing"]["policy"] == "default"
        if args:
            assert record["model"] == "smollm2-135m"
