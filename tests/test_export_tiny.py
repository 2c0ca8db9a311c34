"""The export machinery on tiny random-weight models (llama, qwen2, gemma3): Optimum's ONNX graph driven by
calm's own loop must choose exactly the tokens transformers chooses."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("optimum.exporters.onnx")

from calm_cli.engine.generate import Decoder, PromptError  # noqa: E402
from calm_cli.fleet.export_worker import _optimum_export  # noqa: E402
from calm_cli.fleet.gguf_tokenizer import tokenizer_from_metadata  # noqa: E402

VOCAB = 257  # 256 byte-level tokens + one end-of-turn control token
EOS = 256


def _byte_level_tokens() -> list[str]:
    from tokenizers.pre_tokenizers import ByteLevel

    return sorted(ByteLevel.alphabet(), key=lambda ch: ch.encode())  # any fixed order of the 256 symbols


def _tiny(arch: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  eos_token_id=EOS, bos_token_id=EOS, pad_token_id=EOS)
    if arch == "llama":
        config = transformers.LlamaConfig(**common)
    elif arch == "qwen2":
        config = transformers.Qwen2Config(**common)
    else:
        config = transformers.Gemma3TextConfig(**common, head_dim=16, sliding_window=8, query_pre_attn_scalar=16)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3"])
def exported(request, tmp_path_factory):
    model = _tiny(request.param)
    out = tmp_path_factory.mktemp(request.param)
    _optimum_export(model, out, "text-generation-with-past")
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": [*_byte_level_tokens(), "<|im_end|>"],
        "tokenizer.ggml.token_type": [1] * 256 + [3],
        "tokenizer.ggml.merges": [],
        "tokenizer.ggml.eos_token_id": EOS,
    }
    tokenizer_from_metadata(meta).save(out)
    return model, Decoder(out)


def test_greedy_tokens_equal_transformers(exported) -> None:
    model, decoder = exported
    generator = torch.Generator().manual_seed(1)
    for length in (1, 5, 23):
        prompt = torch.randint(0, EOS, (1, length), generator=generator)
        want = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=20, eos_token_id=EOS, pad_token_id=EOS)[0, length:].tolist()
        if EOS in want:
            want = want[: want.index(EOS)]
        got = list(decoder.greedy(prompt[0].tolist(), 20))
        assert got == want, f"prompt length {length}"


def test_streamed_text_equals_decoded_tokens(exported) -> None:
    _, decoder = exported
    ids = decoder.encode("héllo, wörld ✓")
    text = "".join(decoder.stream_text("héllo, wörld ✓", 20))
    assert text == decoder.tokenizer.decode(list(decoder.greedy(ids, 20)), skip_special=True)


def test_prompt_errors_are_clear(exported) -> None:
    _, decoder = exported
    with pytest.raises(PromptError, match="empty"):
        decoder.encode("")
    with pytest.raises(PromptError, match="context window of 256"):
        list(decoder.greedy([1] * 250, 10))
