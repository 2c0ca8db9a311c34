"""Continuous batching (engine/batch.py) on tiny fused decoders: requests that join a running batch at step
boundaries and leave when they finish choose the same greedy tokens as each decoded alone, apart from
divergences that start at a numerical near-tie between the two best tokens (counted, never assumed)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("optimum.exporters.onnx")

from calm_cli.engine.batch import DecodeBatch, Generation, Slots  # noqa: E402
from calm_cli.engine.decode import greedy  # noqa: E402
from calm_cli.engine.sampling import Sampler, Sampling  # noqa: E402
from calm_cli.engine.textstream import TextStream  # noqa: E402
from calm_cli.engine.decoder import Decoder, PromptError  # noqa: E402
from calm_cli.engine.kv import open_kv  # noqa: E402
from calm_cli.fleet.graph import fuse  # noqa: E402
from calm_cli.fleet.export_worker import _optimum_export  # noqa: E402
from tiny_models import EOS, save_tokenizer, tiny_model  # noqa: E402

NEAR_TIE = 1e-4  # logit gap under which float rounding of a different batch shape may flip the choice


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3"])
def decoder(request, tmp_path_factory) -> Decoder:
    out = tmp_path_factory.mktemp(request.param)
    _optimum_export(tiny_model(request.param), out, "text-generation-with-past")
    fuse.fuse_export(out)
    save_tokenizer(out)
    return Decoder.load(out)


def alone(decoder: Decoder, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens decoded alone, and the gap between the best two logits at each choice."""
    tokens, gaps = [], []
    cache = open_kv(decoder, 1, len(prompt) + n)
    step = prompt
    for _ in range(n):
        logits = cache.feed([step])[0]
        top2 = np.sort(logits)[-2:]
        gaps.append(float(top2[1] - top2[0]))
        tokens.append(int(np.argmax(logits)))
        step = [tokens[-1]]
    return tokens, gaps


def test_joining_and_leaving_a_running_batch_keeps_greedy_tokens(decoder: Decoder) -> None:
    rng = np.random.default_rng(0)
    # (prompt, new tokens, the step at which the request arrives)
    plan = [(rng.integers(0, EOS, size=int(n)).tolist(), int(m), int(at))
            for n, m, at in [(5, 30, 0), (17, 12, 0), (1, 25, 3), (40, 8, 9), (9, 20, 9), (23, 16, 30)]]
    slots = Slots(decoder, rows=3, capacity=128)  # fewer rows than requests: later ones wait for a free row
    waiting = list(range(len(plan)))
    got: dict[int, list[int]] = {}
    row_of: dict[int, int] = {}
    nxt: dict[int, int] = {}
    t = 0
    while waiting or row_of:
        for i in [i for i in waiting if plan[i][2] <= t]:
            if not slots.free():
                break
            prompt, _, _ = plan[i]
            row, logits = slots.admit(prompt, plan[i][1])
            waiting.remove(i)
            row_of[i], got[i] = row, [int(np.argmax(logits))]
            nxt[row] = got[i][-1]
        for i in [i for i, row in row_of.items() if len(got[i]) == plan[i][1]]:
            slots.release(row_of.pop(i))
        if row_of:
            by_row = {row: i for i, row in row_of.items()}
            out = slots.step({row: got[i][-1] for i, row in row_of.items()})
            for row, logits in out.items():
                got[by_row[row]].append(int(np.argmax(logits)))
        t += 1
    near_ties = 0
    for i, (prompt, n, _) in enumerate(plan):
        want, gaps = alone(decoder, prompt, n)
        first = next((k for k, (a, b) in enumerate(zip(got[i], want)) if a != b), None)
        if first is not None:
            assert gaps[first] < NEAR_TIE, f"request {i} diverged at token {first} without a near-tie"
            near_ties += 1
    assert near_ties <= 1, f"{near_ties} of {len(plan)} requests diverged after near-ties"


def test_a_slot_refuses_what_it_cannot_hold(decoder: Decoder) -> None:
    slots = Slots(decoder, rows=1, capacity=16)
    with pytest.raises(PromptError, match="capacity of 16"):
        slots.admit([1] * 10, 7)
    row, _ = slots.admit([1] * 10, 6)
    assert slots.free() == 0 and slots.kv_bytes > 0
    with pytest.raises(RuntimeError, match="no free slot"):
        slots.admit([1], 1)
    with pytest.raises(ValueError, match="every active row"):
        slots.step({})
    slots.release(row)
    assert slots.free() == 1


# ---------------------------------------------------------------------------------------------------------
# DecodeBatch: requests' generations on the slots

def _gen(decoder: Decoder, prompt: list[int], n: int, stop: tuple[str, ...] = (),
         pieces: list[str] | None = None) -> Generation:
    return Generation(prompt, n, Sampler(Sampling()), TextStream(decoder.tokenizer, stop),
                      on_text=pieces.append if pieces is not None else None)


def _run(batch: DecodeBatch, arrivals: dict[int, list[Generation]]) -> int:
    """Step until every generation finished, admitting each list at its step; returns the steps taken."""
    waiting = sorted(arrivals.items())
    pending: list[Generation] = []
    t = 0
    while waiting or pending or batch.active:
        while waiting and waiting[0][0] <= t:
            pending += waiting.pop(0)[1]
        room = batch.free()
        batch.step(pending[:room])
        pending = pending[room:]
        t += 1
    return t


def test_a_decode_batch_answers_each_request_as_it_would_be_answered_alone(decoder: Decoder) -> None:
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, EOS, size=int(n)).tolist() for n in (3, 12, 7, 20, 5)]
    limits = [25, 10, 30, 8, 18]
    gens = [_gen(decoder, p, n) for p, n in zip(prompts, limits)]
    streamed: list[str] = []
    gens[2].on_text = streamed.append
    batch = DecodeBatch(decoder, rows=3, capacity=128)
    _run(batch, {0: gens[:2], 2: gens[2:4], 9: gens[4:]})
    for gen, prompt, n in zip(gens, prompts, limits):
        alone = list(greedy(decoder, prompt, n))
        assert gen.tokens == alone and gen.completion is not None
        assert gen.completion.tokens_out == len(alone) and gen.completion.tokens_in == len(prompt)
        assert gen.completion.stop_reason in ("eos", "length")
        assert gen.completion.energy_j > 0 and gen.completion.energy_estimated
    assert "".join(streamed) == gens[2].completion.text
    assert batch.free() == 3 and not batch.active


def test_stop_strings_and_cancellation_free_their_rows(decoder: Decoder) -> None:
    prompt = [65, 66, 67]
    full = decoder.tokenizer.decode(list(greedy(decoder, prompt, 40)), skip_special=True)
    stop = next((full[i:i + 2] for i in range(3, len(full) - 2) if full[i:i + 2].strip()), None)
    if stop is None:
        pytest.skip("this tiny model's answer has no two printable characters to stop at")
    stopped = _gen(decoder, prompt, 40, (stop,))
    cancelled = _gen(decoder, [70, 71], 40)
    batch = DecodeBatch(decoder, rows=2, capacity=64)
    batch.step([stopped, cancelled])
    cancelled.cancelled = True
    while batch.active:
        batch.step([])
    assert stopped.completion.stop_reason == "stop_string"
    assert stopped.completion.text == full[: full.index(stop)]
    assert cancelled.completion.stop_reason == "cancelled" and batch.free() == 2


@pytest.mark.fleet
def test_real_int4_answers_do_not_depend_on_the_batch(fleet_store) -> None:
    """SmolLM2's int4 export: eight chat requests decoded together give exactly the tokens each gets decoded
    alone (both step at least two rows; see engine/batch.py on min_rows)."""
    from click.testing import CliRunner

    from calm_cli.cli import main
    from calm_cli.engine.prompt import render
    from calm_cli.fleet import lock

    assert CliRunner().invoke(main, ["models", "export", "smollm2-135m"]).exit_code == 0
    decoder = Decoder.load(fleet_store.exports("smollm2-135m")["int4"])
    spec = lock.load()["smollm2-135m"]
    questions = ["Tell me about cats.", "What is 2+2?", "Write a poem about rain.", "Explain gravity.",
                 "Name three fruits.", "How do planes fly?", "Give me a recipe.", "Why is the sky blue?"]
    prompts = [decoder.encode(render(spec.prompt, q)) for q in questions]
    together = [_gen(decoder, p, 48) for p in prompts]
    _run(DecodeBatch(decoder, rows=8, capacity=256), {0: together[:5], 4: together[5:]})
    for prompt, gen in zip(prompts, together):
        alone = _gen(decoder, prompt, 48)
        _run(DecodeBatch(decoder, rows=2, capacity=256), {0: [alone]})
        assert gen.tokens == alone.tokens
