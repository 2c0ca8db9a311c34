"""`calm bench --remote MEMBER`: the workload with one fleet member answered by llama.cpp's OpenAI-compatible
server on loopback instead of calm's own engine, reported beside the all-local run.

The remote member is named `<MEMBER>-remote` (a remote member's name is not a models.lock name) and is served
from the member's pinned GGUF with the same thread count as calm's engine (CALM_THREADS). It is calibrated
into the benchmark's copy of the knowledge base on the very items the local member was calibrated on (by item
id; the benchmark's seed orders multiple-choice options), so routing compares like with like. Its energy is
the policy's `endpoint.watts` (CALM_WATTS_PER_CORE x threads) x wall time, estimated; the server's own
CPU-seconds are read from /proc and reported beside it as a check.

What the network, the HTTP stream and its parsing add per request is measured apart, paired: the same short
questions answered by llama.cpp in this process (llama_cpp.Llama, the same GGUF, threads and sampling, with
logprobs as the remote member asks for them) and through the remote member, alternating. `--no-remote-logprobs`
makes the remote member ask for none (endpoint.logprobs false): llama-cpp-python's server computes them in
numpy over the whole vocabulary at every token, which slows its decoding about fivefold on Qwen.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import numpy as np

from calm_cli import settings
from calm_cli.bench.concurrency import EVERYDAY, paired
from calm_cli.bench import llama_server
from calm_cli.bench.llama_server import LlamaServer
from calm_cli.engine.embed import Encoder
from calm_cli.errors import UsageError
from calm_cli.eval import profile, tasks
from calm_cli.fleet.store import Store
from calm_cli.knowledge import Knowledge
from calm_cli.members import catalog
from calm_cli.members.base import Ask
from calm_cli.members.remote import RemoteMember
from calm_cli.policy import Policy

OVERHEAD_TOKENS = 4
EVERY_ITEM = 1_000_000  # load_items' n: every item of a task
TIMEOUT_S = 600


def check(policy: Policy, store: Store, name: str) -> Path:
    """What `--remote name` needs, checked before a benchmark starts: a movable member, llama-cpp-python's server
    and the member's GGUF (returned)."""
    _movable(policy, name)
    if not llama_server.available():
        raise UsageError("--remote needs llama-cpp-python[server]: `make bench-setup` installs it")
    gguf = store.source_dir(name) / "model.gguf"
    if not gguf.is_file():
        raise UsageError(f"--remote {name}: no GGUF: run `calm models pull {name}`")
    return gguf


def _movable(policy: Policy, name: str) -> None:
    if name not in {m.model for m in policy.fleet}:
        raise UsageError(f"--remote {name}: not a fleet member of policy {policy.name} "
                         f"({', '.join(m.model for m in policy.fleet)})")
    users = [m.model for m in policy.members if m.draft == name]
    if users:
        raise UsageError(f"--remote {name}: it drafts for {', '.join(users)}, and a draft must be local")


def remote_policy(policy: Policy, name: str, url: str, watts: float, logprobs: bool = True) -> Policy:
    """`policy` with its fleet member `name` answered by the server at `url` (which knows it as `name`)."""
    _movable(policy, name)
    remote = f"{name}-remote"
    endpoint = {"url": url, "model": name, "timeout_s": TIMEOUT_S, "watts": watts, "logprobs": logprobs}
    fleet = tuple(dataclasses.replace(m, model=remote, endpoint=endpoint, draft=None, draft_tokens=None)
                  if m.model == name else m for m in policy.fleet)
    cache = {**policy.cache, "pinned": [remote if p == name else p for p in policy.cache.get("pinned", [])]}
    return dataclasses.replace(policy, name=f"{policy.name}, {name} remote", fleet=fleet, cache=cache)


def calibrate_like(kb: Knowledge, local: str, member: RemoteMember, store: Store, policy: Policy,
                   items: list[tasks.Item], seed: int, log: Callable[[str], None]) -> int:
    """Calibrate `member` on the very calibration items `local` was calibrated on (by task and item id; the
    options in the order `seed` shows them); the number of items, 0 when `local` was never calibrated."""
    wanted = {(task, item_id) for task, item_id, _ in kb.calibration([local]).items}
    names = [t for t in dict.fromkeys(i.task for i in items) if any(task == t for task, _ in wanted)]
    if not names:
        log(f"bench: {local} has no calibration on these tasks here, so neither does {member.name}")
        return 0
    data = tasks.fetch_data(store.root, log=log, pins=tasks.pins_for(names))
    chosen = [i for i in tasks.load_items(names, EVERY_ITEM, seed, data) if (i.task, i.item_id) in wanted]
    log(f"bench: calibrating {member.name} on {len(chosen)} items, as {local} was")
    embeddings = profile.embed_items(Encoder(catalog.encoder_dir(store, policy.encoder)), chosen)
    profile.profile_member(member, chosen, embeddings, kb, lambda: None)
    return len(chosen)


def overhead(server: LlamaServer, member: RemoteMember, n: int, log: Callable[[str], None]) -> dict:
    """The same questions answered by llama.cpp in this process and through the remote member, alternated and
    paired: what the network, HTTP, the event stream and its parsing add per request."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(server.gguf), n_ctx=server.context, n_threads=server.threads,
                n_threads_batch=server.threads, logits_all=True, verbose=False)  # as the server loads it
    client = member.load()
    direct: list[float] = []
    remote: list[float] = []

    asked = {"logprobs": True, "top_logprobs": 1} if member.endpoint.get("logprobs", True) else {}

    def in_process(question: str) -> None:
        # Streamed, as the server calls it: llama-cpp-python's whole-answer path computes log-softmax over every
        # prompt position too when logprobs are asked for, which would make the server look faster than itself.
        for _ in llm.create_chat_completion([{"role": "user", "content": question}], max_tokens=OVERHEAD_TOKENS,
                                            temperature=0.0, stream=True, **asked):
            pass

    def through_server(question: str) -> None:
        member.generate(client, Ask(question, OVERHEAD_TOKENS))

    try:
        for way in (in_process, through_server):  # warm both (first-call allocations, the connection), untimed
            way(EVERYDAY[0])
        for i in range(n):
            question = EVERYDAY[i % len(EVERYDAY)]
            for way, out in ((in_process, direct), (through_server, remote))[:: 1 if i % 2 == 0 else -1]:
                started = time.perf_counter()
                way(question)
                out.append((time.perf_counter() - started) * 1000)
    finally:
        client.close()
        llm.close()
    result = paired(member.name, "in_process", direct, "remote", remote)
    log(f"bench: remote member overhead: {result}")
    return result


def scenario(policy: Policy, name: str, store: Store, kb: Knowledge, items: list[tasks.Item], seed: int,
             n_overhead: int, logprobs: bool, run_alone: Callable, run_calm: Callable,
             log: Callable[[str], None]) -> tuple[list, dict]:
    """(the remote member alone and calm with it, as systems; the scenario's own figures). `run_alone(member)`
    and `run_calm(policy, kb)` are the workload's runs, so both sides are measured the same way."""
    gguf = check(policy, store, name)
    threads, per_core = int(settings.get("threads")), float(settings.get("watts_per_core"))
    watts = per_core * threads
    with LlamaServer(gguf, name, threads=threads) as server:
        log(f"bench: {name} served by llama.cpp at {server.url} ({threads} thread(s))")
        changed = remote_policy(policy, name, server.url, watts, logprobs)
        member = RemoteMember(next(m for m in changed.fleet if m.endpoint))
        calibrated = calibrate_like(kb, name, member, store, policy, items, seed, log)
        cpu = [server.cpu_s()]
        alone = run_alone(member)
        cpu.append(server.cpu_s())
        routed = run_calm(changed, kb)
        cpu.append(server.cpu_s())
        added = overhead(server, member, n_overhead, log)
    share = float(np.mean([q.model == member.name for q in routed.results])) if routed.results else 0.0
    out = {"member": name, "remote_name": member.name, "engine": "llama.cpp server (llama-cpp-python)",
           "threads": threads, "endpoint_watts": watts, "logprobs": logprobs, "calibration_items": calibrated,
           "scoring": "multiple choice it answers is scored on the letter it generates (a server gives no "
                      "log-likelihoods of given text); local members' by log-likelihood",
           "routed_share": round(share, 3),
           "failures": sum(q.failed for q in routed.results) + sum(q.failed for q in alone.results),
           "energy_check": {
               "alone_estimated_j": round(sum(q.energy_j for q in alone.results), 1),
               "alone_server_cpu_j": round((cpu[1] - cpu[0]) * per_core, 1),
               "server_cpu_s_alone": round(cpu[1] - cpu[0], 2), "server_cpu_s_routed": round(cpu[2] - cpu[1], 2)},
           "overhead": added}
    return [alone, routed], out
