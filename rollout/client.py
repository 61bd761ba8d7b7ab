"""The `vllm_server` backend: a client of `python -m rollout.serve` (wire format in rollout/serve.py).

Every call has one deadline, `request_timeout_s` from its start: each attempt may use what is left
of it, connection failures and 5xx answers are retried (after `retry_backoff_s`, doubling) at most
`max_retries` times while time remains, and then `RolloutServerError` names the URL, the endpoint,
the attempts and the last cause. So a dead or hung server costs at most the timeout, never a hang.
4xx answers are not retried: they re-raise the server's exception type where it is one of ours
(`PromptTooLongError`) and ValueError otherwise.

Prompts (ids, text or chat messages) go to the server as they are; the server's tokenizer renders them.
"""

from __future__ import annotations

import time

import httpx

from model.generation import SamplingConfig

from .config import RolloutConfig
from .engine import Prompt, PromptTooLongError, RolloutEngine, RolloutGroup, sampling_to_dict
from .weights import policy_state_dict


class RolloutServerError(RuntimeError):
    """The rollout server could not be reached or failed within the call's deadline."""


class ServerEngine(RolloutEngine):
    def __init__(self, config: RolloutConfig):
        super().__init__(config, eos_token_id=None)
        self.url = config.server_url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, trust_env=False)  # loopback/cluster URLs: no proxies
        self.server_info = self._wait_until_healthy(config.startup_timeout_s)
        self.weights_version = self.server_info["weights_version"]

    # ------------------------------------------------------------------ interface
    def generate_groups(self, prompts: list[Prompt], group_size: int,
                        sampling: SamplingConfig | None = None) -> list[RolloutGroup]:
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        body = {"prompts": prompts, "group_size": group_size,
                "sampling": None if sampling is None else sampling_to_dict(sampling)}
        answer = self._call("POST", "/generate_groups", json=body)
        return [RolloutGroup.from_dict(g) for g in answer["groups"]]

    def update_weights(self, named_tensors) -> None:
        from safetensors.torch import save

        seen: set[int] = set()
        tensors = {}
        for name, tensor in policy_state_dict(named_tensors).items():
            tensor = tensor.detach().cpu().contiguous()
            if tensor.untyped_storage().data_ptr() in seen:  # safetensors refuses shared storage (tied weights)
                tensor = tensor.clone()
            seen.add(tensor.untyped_storage().data_ptr())
            tensors[name] = tensor
        payload = save(tensors)
        answer = self._call("POST", "/update_weights", content=payload,
                            headers={"content-type": "application/octet-stream"})
        self.weights_version = answer["weights_version"]

    def sleep(self) -> None:
        self.sleeping = self._call("POST", "/sleep")["sleeping"]

    def wake(self) -> None:
        self.sleeping = self._call("POST", "/wake")["sleeping"]

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ transport
    def _wait_until_healthy(self, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                answer = self._http.get("/health", timeout=self._timeout(deadline))
                if answer.status_code == 200:
                    return answer.json()
                last = RuntimeError(f"HTTP {answer.status_code}")
            except httpx.HTTPError as err:
                last = err
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        raise RolloutServerError(f"rollout server {self.url} not healthy within {timeout_s:.0f}s "
                                 f"(startup_timeout_s): {last}")

    def _timeout(self, deadline: float) -> httpx.Timeout:
        left = max(0.01, deadline - time.monotonic())
        return httpx.Timeout(left, connect=min(self.config.connect_timeout_s, left))

    def _call(self, method: str, path: str, **kwargs) -> dict:
        cfg = self.config
        start = time.monotonic()
        deadline = start + cfg.request_timeout_s
        backoff = cfg.retry_backoff_s
        attempts, last = 0, "no attempt"
        while attempts <= cfg.max_retries and time.monotonic() < deadline:
            attempts += 1
            try:
                answer = self._http.request(method, path, timeout=self._timeout(deadline), **kwargs)
            except httpx.TimeoutException as err:
                last = f"no answer in time ({type(err).__name__})"
                break  # the deadline is spent: the server is alive but hung, or the work takes too long
            except httpx.TransportError as err:
                last = f"{type(err).__name__}: {err}"
            else:
                if answer.status_code < 400:
                    return answer.json()
                detail = _detail(answer)
                if answer.status_code < 500:
                    error = detail.get("error") if isinstance(detail, dict) else None
                    message = detail.get("detail", detail) if isinstance(detail, dict) else detail
                    raise (PromptTooLongError if error == "PromptTooLongError" else ValueError)(
                        f"rollout server {self.url}{path}: {message}")
                last = f"HTTP {answer.status_code}: {detail}"
            pause = min(backoff, deadline - time.monotonic())
            if attempts > cfg.max_retries or pause <= 0:
                break
            time.sleep(pause)
            backoff *= 2
        raise RolloutServerError(f"rollout server {self.url}{path} failed after {attempts} attempt(s) in "
                                 f"{time.monotonic() - start:.1f}s (request_timeout_s={cfg.request_timeout_s}): {last}")


def _detail(answer: httpx.Response):
    try:
        return answer.json()
    except ValueError:
        return answer.text[:500]
