"""Host registered rewards and reward models over HTTP: `python -m rewards.serve`.

    python -m rewards.serve --reward math --reward helpful=model:'{"path": "/ckpt/rm_helpful"}' --port 8765

Each `--reward` is `[ALIAS=]NAME[:KWARGS_JSON]`: NAME is looked up like a recipe's reward (registry,
entry point, dotted path) and built with the kwargs; it is served under ALIAS (default NAME), so
one server can host two reward models. The wire format is in `rewards/remote.py`; clients use the
`remote` reward. Calls to one reward are serialised (a reward model on one GPU is not thread-safe);
different rewards are served concurrently. `--port 0` picks a free port; the line
`serving rewards [...] on http://HOST:PORT` on stdout says which.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import rewards  # noqa: F401 - registers the built-in rewards
from rewards.registry import RewardFn, call_reward, get_reward

logger = logging.getLogger("rewards.serve")


def parse_reward_arg(text: str) -> tuple[str, str, dict[str, Any]]:
    """`[ALIAS=]NAME[:KWARGS_JSON]` → (alias, name, kwargs)."""
    head, brace, kwargs_json = text.partition(":{")
    kwargs: dict[str, Any] = {}
    if brace:
        try:
            kwargs = json.loads("{" + kwargs_json)
        except json.JSONDecodeError as error:
            raise argparse.ArgumentTypeError(f"--reward {text!r}: kwargs are not valid JSON ({error})") from None
    alias, equals, name = head.partition("=")
    if not equals:
        alias, name = head, head
    if not name or not alias:
        raise argparse.ArgumentTypeError(f"--reward {text!r}: expected [ALIAS=]NAME[:KWARGS_JSON]")
    return alias, name, kwargs


class RewardServer(ThreadingHTTPServer):
    """An HTTP server over a fixed set of built rewards."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], hosted: dict[str, RewardFn]) -> None:
        super().__init__(address, _Handler)
        self.hosted = hosted
        self.locks = {name: threading.Lock() for name in hosted}


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/health":
            self._send(200, {"rewards": sorted(self.server.hosted)})
        else:
            self._send(404, {"error": f"no such endpoint {self.path}"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/score":
            self._send(404, {"error": f"no such endpoint {self.path}"})
            return
        try:
            request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            name, prompts, completions = request["reward"], request["prompts"], request["completions"]
            columns = request.get("columns", {})
        except (ValueError, KeyError, TypeError) as error:
            self._send(400, {"error": f"malformed request: {error!r}"})
            return
        if name not in self.server.hosted:
            self._send(404, {"error": f"reward {name!r} is not served here; served: {sorted(self.server.hosted)}"})
            return
        try:
            with self.server.locks[name]:
                scores = call_reward(self.server.hosted[name], prompts, completions, **columns)
        except Exception as error:  # noqa: BLE001 - the client gets the reason, the server keeps serving
            logger.error("reward %r failed:\n%s", name, traceback.format_exc())
            self._send(500, {"error": f"reward {name!r} raised {error!r}"})
            return
        self._send(200, {"scores": scores})

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        logger.debug("%s - %s", self.address_string(), format % args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rewards.serve", description=__doc__.split("\n")[0])
    parser.add_argument("--reward", action="append", required=True, type=parse_reward_arg,
                        help="[ALIAS=]NAME[:KWARGS_JSON]; repeat to host several")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8765, help="port (0: any free port)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    hosted: dict[str, RewardFn] = {}
    for alias, name, kwargs in args.reward:
        if alias in hosted:
            parser.error(f"reward alias {alias!r} given twice")
        hosted[alias] = get_reward(name, **kwargs)
    server = RewardServer((args.host, args.port), hosted)
    host, port = server.server_address[:2]
    print(f"serving rewards {sorted(hosted)} on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
