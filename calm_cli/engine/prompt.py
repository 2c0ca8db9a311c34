"""Prompts from models.lock's prompt formats: the GGUF's chat template for one turn, or few-shot text."""

from __future__ import annotations


def render(prompt_format: dict, query: str) -> str:
    """The model's input text for one user question (the lock's template, placeholders filled once)."""
    kind = prompt_format["kind"]
    if kind not in ("chat", "few-shot"):
        raise ValueError(f"a {kind} model does not answer questions")
    text = prompt_format["template"]
    system = prompt_format.get("system", "")
    head, _, tail = text.partition("{query}")
    return head.replace("{system}", system) + query + tail.replace("{system}", system)


def stop_strings(prompt_format: dict) -> list[str]:
    return list(prompt_format.get("stop", []))
