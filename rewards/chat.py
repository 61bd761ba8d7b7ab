"""Prompts arrive as plain strings or as chats; these helpers give each reward the form it needs."""

from __future__ import annotations

from typing import Any

Prompt = str | list[dict[str, Any]]


def as_messages(prompt: Prompt) -> list[dict[str, Any]]:
    """The prompt as a chat: a string becomes one user turn; a chat is copied as it is."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
        return [dict(message) for message in prompt]
    raise TypeError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")


def prompt_text(prompt: Prompt) -> str:
    """The prompt's text: the string itself, or the contents of a chat's user turns."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(str(m.get("content", "")) for m in as_messages(prompt) if m["role"] == "user")
