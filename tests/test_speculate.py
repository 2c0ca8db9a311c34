"""Speculative decoding (engine/speculate.py) on tiny fused decoders: prompt-lookup, reference-answer and
draft-model drafts give plain greedy decoding's tokens (apart from divergences that start at a numerical
near-tie, counted), drafts kept whole, rejected whole and ending in EOS or a stop string, cross-tokenizer
verification, adaptive draft length, and speculative sampling's output distribution tested against the model's."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("optimum.exporters.onnx")

from calm_cli.engine.complete import complete  # noqa: E402
from calm_cli.engine.decoder import Decoder  # noqa: E402
from calm_cli.engine.kv import open_kv  # noqa: E402
from calm_cli.engine.sampling import Sampler, Sampling  # noqa: E402
from calm_cli.engine.speculate import DraftLength, Speculation, VerifyKV, lookup_draft, speculate  # noqa: E402
from calm_cli.fleet.export_worker import _optimum_export  # noqa: E402
from calm_cli.fleet.graph import fuse  # noqa: E402
from test_batch import NEAR_TIE, alone, decoder  # noqa: E402,F401 - the tiny fused decoders, per architecture
from tiny_models import EOS, save_tokenizer, tiny_model  # noqa: E402


@pytest.mark.parametrize("context,k,draft", [
    ([1, 2, 3, 9, 1, 2], 3, [3, 9, 1]),  # the 2-gram (1, 2) occurred before: what followed it
    ([5, 6, 7, 5, 6, 7, 8, 5, 6], 2, [7, 8]),  # the latest occurrence wins
    ([1, 2, 3, 4], 4, []),  # the last token never occurred before
    ([4, 4], 3, [4]),  # a repeat of the last token
    ([7], 3, []),
])
def test_lookup_draft(context: list[int], k: int, draft: list[int]) -> None:
    assert lookup_draft(context, k) == draft


def test_lookup_draft_prefers_the_reference() -> None:
    """After the model leaves another member's answer, the draft re-joins that answer at the last n-gram."""
    assert lookup_draft([1, 2, 3, 9], 3, reference=[4, 3, 9, 7, 8, 5]) == [7, 8, 5]
    assert lookup_draft([1, 2, 1, 9], 2, reference=[4, 5]) == []  # 9 unseen in both
    assert lookup_draft([1, 2, 1], 2, reference=[4, 5]) == [2, 1]  # not in the reference: the context


@pytest.mark.parametrize("kept,drafted,after", [(4, 4, 6), (2, 4, 3), (0, 4, 3), (16, 16, 16), (0, 1, 1)])
def test_adaptive_draft_length(kept: int, drafted: int, after: int) -> None:
    length = DraftLength(drafted, adaptive=True)
    length.update(drafted, kept)
    assert length.k == after
    fixed = DraftLength(drafted)
    fixed.update(drafted, kept)
    assert fixed.k == drafted


def test_rollback_forgets_positions(decoder) -> None:
    """Logits after a rollback and a different continuation equal those of a fresh state fed the same."""
    prompt = [3, 9, 4, 17, 5]
    kv = VerifyKV(decoder, 64, 8)
    kv.feed([prompt])
    kv.feed_all([11, 12, 13])
    kv.rollback(2)
    got = kv.feed_all([21, 22]).copy()
    fresh = VerifyKV(decoder, 64, 8)
    fresh.feed([prompt])
    want = fresh.feed_all([11, 21, 22])[1:]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_speculative_greedy_equals_greedy(decoder) -> None:
    """Repetitive prompts (drafts are found and some kept) and others: the same tokens as greedy decoding,
    unless a divergence starts where greedy's two best logits nearly tie."""
    rng = np.random.default_rng(0)
    prompts = [[5, 6, 7, 8] * 6, list(rng.integers(3, 200, 30)), [9, 10, 11, 9, 10, 11, 9, 10], [42] * 12]
    near_ties = kept = 0
    for prompt in prompts:
        prompt = [int(t) for t in prompt]
        want, gaps = alone(decoder, prompt, 40)
        stops = set(decoder.tokenizer.stop_ids)
        want = want[:next((i for i, t in enumerate(want) if t in stops), len(want))]  # greedy ends at a stop
        got = speculate(decoder, prompt, 40, Speculation(k=4))
        kept += got.accepted
        if got.tokens != want:
            first = next((i for i, (a, b) in enumerate(zip(got.tokens, want)) if a != b),
                         min(len(got.tokens), len(want)))
            assert gaps[first] < NEAR_TIE, (prompt, first, gaps[first])
            near_ties += 1
        assert got.steps <= len(got.tokens)
    assert kept > 0  # the drafts did save model runs
    assert near_ties <= 1


def greedy_alone(decoder: Decoder, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Plain greedy tokens up to the model's stop token, and the logit gap at each choice."""
    want, gaps = alone(decoder, prompt, n)
    stops = set(decoder.tokenizer.stop_ids)
    return want[:next((i for i, t in enumerate(want) if t in stops), len(want))], gaps


def assert_same_or_near_tie(got: list[int], want: list[int], gaps: list[float]) -> bool:
    """True when equal; a divergence must start where greedy's two best logits nearly tie (then False)."""
    if got == want:
        return True
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    assert first < len(gaps) and gaps[first] < NEAR_TIE, (first, got, want)
    return False


def test_verifying_a_reference_answer_gives_the_models_own(decoder) -> None:
    """Escalation by verification: the model checks another answer and continues from the first disagreement.
    Its own answer is kept whole in few steps; a foreign one is rejected at once; a half-right one is kept up
    to the fault; one that runs past the model's end or stops early changes nothing. (Ids, not text: a random
    tiny model's bytes are rarely valid UTF-8; text references are tested below and on the real fleet.)"""
    prompt = [int(t) for t in np.random.default_rng(1).integers(3, 200, 12)]
    want, gaps = greedy_alone(decoder, prompt, 48)
    cases = {
        "own": (want, len(want) - 1),  # the first token comes from the prompt's step, one a step from the model
        "foreign": ([(t + 7) % EOS for t in want], 0),
        "half": (want[:10] + [(want[10] + 1) % EOS] + want[11:], 9),
        "longer": (want + [5, 6, 7], len(want) - 1),
        "shorter": (want[:5], 4),
        "empty": ([], 0),
    }
    for name, (reference, least_kept) in cases.items():
        done = speculate(decoder, prompt, 48, Speculation(k=4, reference=tuple(reference)))
        if not assert_same_or_near_tie(done.tokens, want, gaps):
            continue
        assert done.accepted >= least_kept - done.steps, (name, done)
        if name == "own" and len(want) > 1:
            assert done.steps <= 3 + len(want) // 32, done  # chunks of 8, 16, then 32 per step
        if name == "foreign":
            assert done.accepted <= done.drafted


def test_cross_tokenizer_verification(decoder, tmp_path) -> None:
    """Text from a member with another tokenizer is re-encoded with the verifier's: a tokenizer that numbers
    bytes in reverse order gives other ids for the same text, the verifier checks its own ids for that text,
    and the result is its own greedy answer."""
    from calm_cli.engine.speculate import LookupDraft
    from calm_cli.engine.tokenizer import load_tokenizer

    other = tmp_path / "reverse"
    other.mkdir()
    save_tokenizer(other, reverse=True)
    foreign = load_tokenizer(other)
    text = "def add(a, b):\n    return a + b  # sums"
    answer = foreign.decode(foreign.encode(text, add_special=False))
    assert answer == text and foreign.encode(text, add_special=False) != decoder.tokenizer.encode(text, add_special=False)
    prompt = [int(t) for t in np.random.default_rng(2).integers(3, 200, 10)]
    draft = Speculation(reference=answer).open(decoder, prompt, 40, Sampler(Sampling()))
    assert isinstance(draft, LookupDraft) and draft.reference == decoder.tokenizer.encode(text, add_special=False)
    want, gaps = greedy_alone(decoder, prompt, 40)
    assert_same_or_near_tie(speculate(decoder, prompt, 40, Speculation(reference=answer)).tokens, want, gaps)


@pytest.fixture(scope="module")
def draft_of(request, tmp_path_factory):
    """Another tiny decoder of the same architecture and tokenizer, with other weights: a bad draft."""
    made: dict[str, Decoder] = {}

    def get(arch: str) -> Decoder:
        if arch not in made:
            out = tmp_path_factory.mktemp(f"draft-{arch}")
            _optimum_export(tiny_model(arch, seed=1), out, "text-generation-with-past")
            fuse.fuse_export(out)
            save_tokenizer(out)
            made[arch] = Decoder.load(out)
        return made[arch]

    return get


def _arch(decoder: Decoder) -> str:
    return next(a for a in ("llama", "qwen2", "gemma3") if decoder.directory.name.startswith(a))


@pytest.mark.parametrize("adaptive", [False, True])
def test_draft_model_speculation_gives_greedy_tokens(decoder, draft_of, adaptive: bool) -> None:
    """A draft model: the model itself as its own draft is kept whole; a draft with other weights is mostly
    rejected; both give the model's greedy tokens."""
    prompt = [int(t) for t in np.random.default_rng(3).integers(3, 200, 9)]
    want, gaps = greedy_alone(decoder, prompt, 40)
    itself = speculate(decoder, prompt, 40, Speculation(k=4, adaptive=adaptive, model=decoder, model_name="self"))
    if assert_same_or_near_tie(itself.tokens, want, gaps):
        assert itself.accepted == itself.drafted
        assert itself.steps < len(want)
    other = speculate(decoder, prompt, 40, Speculation(k=4, adaptive=adaptive, model=draft_of(_arch(decoder)),
                                                       model_name="other"))
    if assert_same_or_near_tie(other.tokens, want, gaps):
        assert other.accepted < other.drafted


def test_drafts_stop_at_eos_and_stop_strings(decoder) -> None:
    """A draft that holds the stop token, or text the answer stops at: the same answer as without drafts."""
    prompt = [int(t) for t in np.random.default_rng(4).integers(3, 200, 9)]
    want, gaps = greedy_alone(decoder, prompt, 30)
    done = speculate(decoder, prompt, 30, Speculation(reference=tuple(want + [EOS, 5, 6])))
    assert_same_or_near_tie(done.tokens, want, gaps)
    # Through complete(): a stop string inside a draft kept whole ends the answer where plain decoding does.
    text_prompt = "0123456789" * 3
    plain = complete(decoder, text_prompt, 30)
    if len(plain.text) > 6:
        stop = plain.text[3:5]
        plain = complete(decoder, text_prompt, 30, stop=[stop])
        ids = decoder.encode(text_prompt)
        verified = complete(decoder, text_prompt, 30, stop=[stop],
                            speculation=Speculation(reference=tuple(greedy_alone(decoder, ids, 30)[0])))
        assert verified.stop_reason == plain.stop_reason == "stop_string"
        assert verified.text == plain.text and verified.draft == "answer"


def _chi2_limit(df: int, z: float = 3.09) -> float:
    """The chi-square quantile at p = 0.999 (z of the normal), by Wilson and Hilferty's approximation."""
    return df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3


def _chi2(counts: dict, exact: dict, n: int) -> tuple[float, int]:
    bins = [key for key, p in exact.items() if p * n >= 5]
    rest_p = 1 - sum(exact[b] for b in bins)
    rest_n = n - sum(counts.get(b, 0) for b in bins)
    stat = sum((counts.get(b, 0) - exact[b] * n) ** 2 / (exact[b] * n) for b in bins)
    if rest_p * n >= 5:
        stat += (rest_n - rest_p * n) ** 2 / (rest_p * n)
        return stat, len(bins)
    return stat, len(bins) - 1


def test_speculative_sampling_keeps_the_models_distribution(decoder, draft_of) -> None:
    """Three sampled tokens, 2,000 seeded runs per draft: their empirical joint distribution matches the
    model's exact one (chi-square at p = 0.999) with a draft model of other weights and with a reference answer,
    while the draft model's own samples (what accepting every draft token would give) fail the same test."""
    sampling = Sampling(temperature=1.0, top_k=4)
    prompt = [int(t) for t in np.random.default_rng(5).integers(3, 200, 7)]
    stops = set(decoder.tokenizer.stop_ids)
    exact = _exact(decoder, prompt, sampling, 3, stops)
    likely = max(exact, key=exact.get)
    draft = draft_of(_arch(decoder))
    n = 2000
    for speculation in (Speculation(k=2, model=draft, model_name="other"),
                        Speculation(reference=decoder.tokenizer.decode(list(likely) + [7, 8]))):
        counts: dict[tuple[int, ...], int] = {}
        for seed in range(n):
            got = tuple(speculate(decoder, prompt, 3, speculation, Sampling(1.0, 4, 1.0, seed)).tokens)
            counts[got] = counts.get(got, 0) + 1
        stat, df = _chi2(counts, exact, n)
        assert stat < _chi2_limit(df), (speculation.model_name, stat, df)
    # The power check: the draft model's own samples are far from the model's distribution.
    own: dict[tuple[int, ...], int] = {}
    for seed in range(n):
        got = tuple(_sampled(draft, prompt, Sampling(1.0, 4, 1.0, seed), 3))
        own[got] = own.get(got, 0) + 1
    stat, df = _chi2(own, exact, n)
    assert stat > _chi2_limit(df)


def _exact(decoder: Decoder, prompt: list[int], sampling: Sampling, depth: int,
           stops: set[int]) -> dict[tuple[int, ...], float]:
    """The probability of every sampled answer of up to `depth` tokens (ending early at a stop token)."""
    probe = Sampler(sampling)
    kv = open_kv(decoder, 1, len(prompt) + depth)
    probs = probe.probs(kv.feed([prompt])[0].copy())
    out: dict[tuple[int, ...], float] = {}
    for token in np.flatnonzero(probs):
        token = int(token)
        if token in stops or depth == 1:
            key = () if token in stops else (token,)
            out[key] = out.get(key, 0.0) + probs[token]
            continue
        for rest, p in _exact(decoder, prompt + [token], sampling, depth - 1, stops).items():
            out[(token, *rest)] = out.get((token, *rest), 0.0) + probs[token] * p
    return out


def _sampled(model: Decoder, prompt: list[int], sampling: Sampling, n: int) -> list[int]:
    sampler = Sampler(sampling)
    kv = open_kv(model, 1, len(prompt) + n)
    out: list[int] = []
    step = prompt
    for _ in range(n):
        token = sampler.choose(kv.feed([step])[0])
        if token in model.tokenizer.stop_ids:
            break
        out.append(token)
        step = [token]
    return out


def test_bench_speculate_on_the_tiny_fleet(tiny_env: dict, tmp_path) -> None:
    """`calm bench speculate` runs every way on the same prompts (code and prose) and reports the ratios with
    their intervals, and whether each gave the served greedy tokens."""
    import json
    import subprocess
    import sys

    out = tmp_path / "spec.json"
    result = subprocess.run([sys.executable, "-m", "calm_cli", "bench", "speculate", "--model", "qwen2.5-coder-1.5b",
                             "--draft", "qwen2.5-coder-0.5b", "--first", "smollm2-135m", "--n", "1", "--tokens", "8",
                             "--k", "adaptive", "--json", str(out)], env=tiny_env, capture_output=True, timeout=600)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    got = json.loads(out.read_text())
    drafts, escalate = got["drafts"], got["escalate"]
    assert [r["kind"] for r in drafts["rows"]] == ["code", "prose"] and drafts["k"] == "adaptive"
    for way in ("prompt-lookup", "qwen2.5-coder-0.5b"):
        mean, lo, hi, count = drafts["speedup"][way]["all"]
        assert count == 2 and lo <= mean <= hi
        assert 0 <= drafts["identical"][way] <= 2
    median, lo, hi, count = escalate["ratio"]["verify:smollm2-135m"]["all"]
    assert count == 2 and lo <= median <= hi
    assert set(escalate["same"]) == {"alone+lookup", "verify:smollm2-135m"}
    assert b"plain greedy's tokens on" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "calm_cli", "bench", "speculate", "--k", "0"], env=tiny_env,
                         capture_output=True, timeout=120)
    assert bad.returncode == 2 and b"--k takes 1-16 or adaptive" in bad.stderr


def test_a_draft_with_another_tokenizer_is_refused(decoder, tmp_path) -> None:
    """The same weights with a tokenizer that numbers the bytes otherwise: not a draft for this model."""
    import shutil

    from calm_cli.engine.speculate import shares_tokenizer

    other = tmp_path / "other"
    shutil.copytree(decoder.directory, other)
    save_tokenizer(other, reverse=True)
    stranger = Decoder.load(other)
    assert shares_tokenizer(decoder, decoder) and not shares_tokenizer(decoder, stranger)
    with pytest.raises(ValueError, match="does not share the model's tokenizer"):
        Speculation(model=stranger, model_name="stranger").open(decoder, [5, 6], 8, Sampler(Sampling()))
