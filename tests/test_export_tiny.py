"""The export machinery on tiny random-weight models (llama, qwen2, gemma3): Optimum's ONNX graph driven by
calm's own loop must choose exactly the tokens transformers chooses."""

from __future__ import annotations


import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("optimum.exporters.onnx")

import numpy as np  # noqa: E402

from calm_cli.engine import decode  # noqa: E402
from calm_cli.engine.batch import generate_batch  # noqa: E402
from calm_cli.engine.complete import complete  # noqa: E402
from calm_cli.engine.decoder import Decoder, PromptError  # noqa: E402
from calm_cli.engine.sampling import Sampling  # noqa: E402
from calm_cli.engine.textstream import TextStream  # noqa: E402
from calm_cli.fleet.export_worker import _optimum_export  # noqa: E402
from conftest import expected_provider  # noqa: E402
from tiny_models import EOS, save_tokenizer, tiny_model  # noqa: E402

@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3"])
def exported(request, tmp_path_factory):
    model = tiny_model(request.param)
    out = tmp_path_factory.mktemp(request.param)
    _optimum_export(model, out, "text-generation-with-past")
    save_tokenizer(out)
    return model, Decoder.load(out)


def _assert_same_greedy(reference, decoder: Decoder, seed: int, lengths: tuple[int, ...]) -> None:
    """`reference.generate` (transformers' API) and calm's loop choose the same 20 tokens, EOS excluded."""
    generator = torch.Generator().manual_seed(seed)
    for length in lengths:
        prompt = torch.randint(0, EOS, (1, length), generator=generator)
        want = reference.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                  max_new_tokens=20, eos_token_id=EOS, pad_token_id=EOS)[0, length:].tolist()
        if EOS in want:
            want = want[: want.index(EOS)]
        assert list(decode.greedy(decoder, prompt[0].tolist(), 20)) == want, f"prompt length {length}"


def test_greedy_tokens_equal_transformers(exported) -> None:
    model, decoder = exported
    _assert_same_greedy(model, decoder, seed=1, lengths=(1, 5, 23))


def test_greedy_tokens_equal_optimum_ortmodel(exported) -> None:
    """Optimum's own runtime class on the same export is the reference an Optimum user would compare with."""
    ort_models = pytest.importorskip("optimum.onnxruntime")
    _, decoder = exported
    reference = ort_models.ORTModelForCausalLM.from_pretrained(str(decoder.directory), use_cache=True,
                                                               provider="CPUExecutionProvider")
    _assert_same_greedy(reference, decoder, seed=3, lengths=(1, 6, 19))


def test_streamed_text_equals_decoded_tokens(exported) -> None:
    _, decoder = exported
    ids = decoder.encode("héllo, wörld ✓")
    stream = TextStream(decoder.tokenizer)
    text = "".join(stream.push(t) for t in decode.greedy(decoder, ids, 20)) + stream.finish()
    assert text == decoder.tokenizer.decode(list(decode.greedy(decoder, ids, 20)), skip_special=True)


def test_prompt_errors_are_clear(exported) -> None:
    _, decoder = exported
    with pytest.raises(PromptError, match="empty"):
        decoder.encode("")
    with pytest.raises(PromptError, match="context window of 256"):
        list(decode.greedy(decoder, [1] * 250, 10))


def test_scores_equal_pytorch_log_likelihoods(exported) -> None:
    model, decoder = exported
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, EOS, (1, 17), generator=generator)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    context, continuation = ids[0, :9].tolist(), ids[0, 9:].tolist()
    want = [float(logp[8 + i, t]) for i, t in enumerate(continuation)]
    got = decode.score(decoder, context, continuation)
    assert np.allclose(got, want, atol=1e-4), (got, want)


def test_generation_logprobs_match_scoring(exported) -> None:
    _, decoder = exported
    prompt = [3, 14, 15, 92, 65]
    steps = list(decode.generate(decoder, prompt, 8))
    scored = decode.score(decoder, prompt, [s.token for s in steps])
    assert np.allclose([s.logprob for s in steps], scored, atol=1e-4)


def test_seeded_sampling_repeats_and_differs_from_greedy(exported) -> None:
    _, decoder = exported
    prompt = [5, 6, 7]
    hot = Sampling(temperature=1.5, top_k=50, top_p=0.95, seed=7)
    first = [s.token for s in decode.generate(decoder, prompt, 12, hot)]
    again = [s.token for s in decode.generate(decoder, prompt, 12, hot)]
    assert first == again
    other = [s.token for s in decode.generate(decoder, prompt, 12, Sampling(temperature=1.5, seed=8))]
    greedy = list(decode.greedy(decoder, prompt, 12))
    assert first != greedy or other != greedy


def test_top_k_one_is_greedy(exported) -> None:
    _, decoder = exported
    prompt = [9, 10, 11]
    sampled = [s.token for s in decode.generate(decoder, prompt, 10, Sampling(temperature=2.0, top_k=1, seed=1))]
    assert sampled == list(decode.greedy(decoder, prompt, 10))


def test_batched_greedy_equals_one_by_one(exported) -> None:
    _, decoder = exported
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8], [9, 10, 11]]
    assert generate_batch(decoder, prompts, 10) == [list(decode.greedy(decoder, p, 10)) for p in prompts]


def test_stop_strings_end_the_answer_and_are_not_shown(exported) -> None:
    _, decoder = exported
    full = complete(decoder, "abc", 30).text
    assert len(full) > 6
    stop = full[3:5]
    cut = complete(decoder, "abc", 30, stop=[stop])
    assert cut.text == full[: full.index(stop)]
    assert cut.stop_reason == "stop_string"


def test_streamed_pieces_join_to_the_record_text(exported) -> None:
    _, decoder = exported
    pieces: list[str] = []
    done = complete(decoder, "xyz", 25, on_text=pieces.append)
    assert "".join(pieces) == done.text
    assert done.tokens_out == len(done.logprobs) and done.tokens_in == 3
    assert done.provider == expected_provider() and done.energy_j >= 0
    assert done.energy_estimated == (done.provider != "CUDAExecutionProvider")  # NVML measures on a GPU
    assert 0.0 <= done.confidence <= 1.0


def test_invalid_utf8_and_truncation(exported) -> None:
    _, decoder = exported
    with pytest.raises(PromptError, match="not valid UTF-8"):
        decoder.encode("bad \udcff byte")
    long_ids = list(range(1, 200)) * 2
    with pytest.raises(PromptError, match="ask for truncation"):
        decoder.fit(long_ids, 10, truncate=False)
    assert decoder.fit(long_ids, 10, truncate=True) == long_ids[-246:]
