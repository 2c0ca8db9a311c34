"""Prompt-lookup speculative decoding (engine/speculate.py): the drafts, and greedy output equal to plain greedy
decoding on tiny fused decoders, apart from divergences that start at a numerical near-tie (counted)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("optimum.exporters.onnx")

from calm_cli.engine.speculate import VerifyKV, lookup_draft, speculative_greedy  # noqa: E402
from test_batch import NEAR_TIE, alone, decoder  # noqa: E402,F401 - the tiny fused decoders, per architecture


@pytest.mark.parametrize("context,k,draft", [
    ([1, 2, 3, 9, 1, 2], 3, [3, 9, 1]),  # the 2-gram (1, 2) occurred before: what followed it
    ([5, 6, 7, 5, 6, 7, 8, 5, 6], 2, [7, 8]),  # the latest occurrence wins
    ([1, 2, 3, 4], 4, []),  # the last token never occurred before
    ([4, 4], 3, [4]),  # a repeat of the last token
    ([7], 3, []),
])
def test_lookup_draft(context: list[int], k: int, draft: list[int]) -> None:
    assert lookup_draft(context, k) == draft


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
        got = speculative_greedy(decoder, prompt, 40, k=4)
        kept += got.accepted
        if got.tokens != want:
            first = next((i for i, (a, b) in enumerate(zip(got.tokens, want)) if a != b),
                         min(len(got.tokens), len(want)))
            assert gaps[first] < NEAR_TIE, (prompt, first, gaps[first])
            near_ties += 1
        assert got.steps <= len(got.tokens)
    assert kept > 0  # the drafts did save model runs
    assert near_ties <= 1


def test_bench_speculate_on_the_tiny_fleet(tiny_env: dict, tmp_path) -> None:
    """`calm bench speculate` runs both ways on the same prompts and reports the ratio with its interval."""
    import json
    import subprocess
    import sys

    out = tmp_path / "spec.json"
    result = subprocess.run([sys.executable, "-m", "calm_cli", "bench", "speculate", "--model", "smollm2-135m",
                             "--n", "2", "--tokens", "8", "--json", str(out)], env=tiny_env, capture_output=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    got = json.loads(out.read_text())
    mean, lo, hi = got["speedup"]
    assert len(got["rows"]) == 2 and lo <= mean <= hi and 0 <= got["identical"] <= 2
    assert all(r["steps"] <= r["tokens"] for r in got["rows"])
    assert b"speculative" in result.stdout
