"""models.lock: valid against its schema, names every model the commands use, prompts match the GGUFs."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import yaml

from calm_cli import schema
from calm_cli.engine.prompt import render
from calm_cli.fleet import lock
from calm_cli.resources import LOCK

FLEET = ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "minilm-l6"]


def test_lock_is_valid_and_complete() -> None:
    models = lock.load()
    assert list(models) == FLEET
    for spec in models.values():
        assert sum(f.size for f in spec.files) > 100_000
        assert spec.generative == (spec.name != "minilm-l6")


def test_broken_lock_names_file_path_and_expectation(tmp_path: Path) -> None:
    data = yaml.safe_load(LOCK.read_text())
    data["models"]["smollm2-135m"]["files"][0]["sha256"] = "not-a-hash"
    del data["models"]["gemma3-270m"]["packages"]
    bad = tmp_path / "models.lock"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(schema.InvalidFile) as err:
        lock.load(bad)
    problems = err.value.problems
    assert len(problems) == 2
    assert any("models.smollm2-135m.files[0].sha256" in p and "does not match" in p for p in problems)
    assert any("models.gemma3-270m" in p and "'packages' is a required property" in p for p in problems)
    assert all(p.startswith(str(bad)) for p in problems)


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "models.lock"
    bad.write_text("lock_version: 1\nmodels: [unclosed\n")
    with pytest.raises(schema.InvalidFile, match=r"line \d+"):
        lock.load(bad)


def test_unknown_model_is_refused_with_the_known_names() -> None:
    with pytest.raises(lock.UnknownModel, match="qwen2.5-coder-0.5b"):
        lock.select(lock.load(), ["smollm2-135m", "gpt-5"])


def test_prompt_keeps_braces_and_placeholders_in_the_question() -> None:
    spec = lock.load()["qwen2.5-coder-0.5b"]
    text = render(spec.prompt, "what is {system} in {query}?")
    assert "what is {system} in {query}?" in text


@pytest.mark.fleet
@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
def test_chat_prompt_equals_the_ggufs_own_template(name: str, gguf_file: Callable[[str], Path]) -> None:
    """The lock's one-turn template must be exactly what the GGUF's Jinja chat template renders."""
    jinja2 = pytest.importorskip("jinja2")
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(gguf_file(name)))
    template = reader.fields["tokenizer.chat_template"].contents()
    question = "Write a function that adds two numbers.\nKeep it short."
    expected = jinja2.Environment().from_string(template).render(
        messages=[{"role": "user", "content": question}], add_generation_prompt=True)
    assert render(lock.load()[name].prompt, question) == expected
