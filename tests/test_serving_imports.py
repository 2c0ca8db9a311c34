"""The serving path must not import torch, transformers or optimum: those belong to the [export] extra."""

from __future__ import annotations

import subprocess
import sys

SERVING_MODULES = ["calm_cli.cli", "calm_cli.engine.complete", "calm_cli.engine.batch", "calm_cli.engine.session",
                   "calm_cli.engine.prompt", "calm_cli.engine.tokenizer",
                   "calm_cli.fleet.gguf_tokenizer", "calm_cli.fleet.pull", "calm_cli.fleet.export",
                   "calm_cli.front.jsonl", "calm_cli.front.http", "calm_cli.front.metrics", "calm_cli.knowledge", "calm_cli.loop.assemble", "calm_cli.loop.calm",
                   "calm_cli.loop.execute.cache", "calm_cli.loop.execute.run",
                   "calm_cli.loop.execute.scheduler", "uvicorn", "calm_cli.loop.plan",
                   "calm_cli.loop.analyze", "calm_cli.loop.monitor", "calm_cli.members.local", "calm_cli.policy"]
FORBIDDEN = ("torch", "transformers", "optimum")


def test_serving_modules_import_without_the_export_stack() -> None:
    code = (
        "import sys\n"
        f"for m in {SERVING_MODULES!r}: __import__(m)\n"
        "from calm_cli.cli import main\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in " + repr(FORBIDDEN) + ")\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"serving imports pulled in: {result.stdout.strip()}"


def test_serving_works_when_the_export_stack_cannot_be_imported() -> None:
    """Block the modules outright: importing them must then fail, and serving must not notice."""
    code = (
        "import sys\n"
        f"for m in {FORBIDDEN!r}: sys.modules[m] = None\n"
        f"for m in {SERVING_MODULES!r}: __import__(m)\n"
        "from click.testing import CliRunner\n"
        "from calm_cli.cli import main\n"
        "r = CliRunner().invoke(main, ['models', 'list', '--json'])\n"
        "assert r.exit_code == 0, r.output\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr


def test_export_without_the_extra_says_how_to_install_it() -> None:
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "from calm_cli.fleet.export import ExtraMissing, check_extra\n"
        "try:\n"
        "    check_extra()\n"
        "except ExtraMissing as e:\n"
        "    print(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "torch" in result.stdout and "pip install -e '.[export]'" in result.stdout
