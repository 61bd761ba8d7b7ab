"""`remote`: a reward computed by a `python -m rewards.serve` server, over HTTP.

Wire format (JSON over HTTP/1.1):
- `GET /health` → `{"rewards": [names]}`;
- `POST /score` with `{"reward": name, "prompts": [...], "completions": [...], "columns": {...}}`
  → 200 `{"scores": [float | null, ...]}`; 404 unknown reward; 400 malformed request; 500 the
  reward raised (`{"error": "..."}`).

The client sends the batch in chunks of `batch_size`. Each request may take `timeout_s`; a refused
or reset connection, a timeout or a 503 is retried `retries` times after `backoff_s`, 2·`backoff_s`,
... A chunk therefore fails within (retries + 1)·timeout_s + the backoffs, with a
`RemoteRewardError` that names the server. An error answer (4xx/5xx other than 503) is not retried:
the server would answer the same again.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from rewards.registry import reward


class RemoteRewardError(RuntimeError):
    """The reward server could not be reached in time, or answered with an error."""


@reward("remote")
class RemoteReward:
    """Client of a reward hosted by `python -m rewards.serve`."""

    def __init__(
        self,
        url: str,
        reward: str,
        batch_size: int = 64,
        timeout_s: float = 60.0,
        retries: int = 2,
        backoff_s: float = 0.5,
    ) -> None:
        """`url`: the server, e.g. http://127.0.0.1:8765; `reward`: the name the server hosts it under."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.url = url.rstrip("/")
        self.reward = reward
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        body = json.dumps(payload).encode()
        last_error: BaseException | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(
                f"{self.url}/score", data=body, headers={"Content-Type": "application/json"}, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as error:
                detail = error.read().decode(errors="replace")[:2000]
                if error.code != 503:
                    raise RemoteRewardError(
                        f"reward server {self.url} answered {error.code} for reward {self.reward!r}: {detail}"
                    ) from error
                last_error = error
            except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
                last_error = error
        raise RemoteRewardError(
            f"reward server {self.url} (reward {self.reward!r}) unreachable after {self.retries + 1} attempts "
            f"of at most {self.timeout_s} s: {last_error}; is `python -m rewards.serve` running there?"
        ) from last_error

    def __call__(self, prompts: Sequence, completions: Sequence[str], **columns: Sequence) -> list[float | None]:
        scores: list[float | None] = []
        for start in range(0, len(completions), self.batch_size):
            stop = start + self.batch_size
            answer = self._post({
                "reward": self.reward,
                "prompts": list(prompts[start:stop]),
                "completions": list(completions[start:stop]),
                "columns": {key: list(values[start:stop]) for key, values in columns.items()},
            })
            chunk = answer.get("scores")
            if not isinstance(chunk, list) or len(chunk) != len(completions[start:stop]):
                raise RemoteRewardError(f"reward server {self.url} sent a malformed answer: {str(answer)[:500]}")
            scores.extend(chunk)
        return scores
