"""Serve a rollout engine over HTTP: `python -m rollout.serve`; clients use the `vllm_server` backend.

    python -m rollout.serve --model /ckpt/policy --dtype bfloat16 --port 8000
    python -m rollout.serve --config recipes/x/grpo.yaml --port 0     # the recipe's `rollout:` section

A FastAPI app around one in-process engine (vLLM by default; `--backend native` for machines
without it). Calls are serialised with a lock: one engine, one batch at a time. `--port 0` picks a
free port; the line `serving rollout engine on http://HOST:PORT` on stdout says which. Binds to
127.0.0.1 unless `--host` says otherwise: the weight endpoint accepts arbitrary weights, so do not
expose it beyond a trusted network.

Wire format (JSON unless noted):
  GET  /health           → {"status": "ok", "backend", "weights_version", "max_model_len"}
  POST /generate_groups  {"prompts": [...], "group_size": G, "sampling": {SamplingConfig fields} | null}
                         → {"groups": [RolloutGroup.to_dict(), ...]}
  POST /update_weights   body: safetensors bytes with OUR model's names → {"weights_version": n}
  POST /sleep, /wake     → {"sleeping": bool}
Errors: 400 {"error": "<exception class>", "detail": "..."} for bad requests (too-long prompt,
unknown sampling key); 500 for engine failures.
"""
# No `from __future__ import annotations` here: FastAPI resolves the handlers' annotations (`Request`,
# imported inside build_app) when they are defined.

import argparse
import dataclasses
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from .config import RolloutConfig
from .engine import PromptTooLongError, RolloutEngine, sampling_from_dict

SERVING_LINE = "serving rollout engine on "


def build_app(engine: RolloutEngine):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI(title="latentalign rollout server")
    lock = threading.Lock()

    def client_error(err: Exception) -> JSONResponse:
        return JSONResponse(status_code=400, content={"error": type(err).__name__, "detail": str(err)})

    @app.get("/health")
    def health():
        return {"status": "ok", "backend": engine.config.backend, "weights_version": engine.weights_version,
                "max_model_len": engine.config.max_model_len}

    @app.post("/generate_groups")
    def generate_groups(body: dict):
        try:
            prompts, group_size = body["prompts"], int(body["group_size"])
            sampling = sampling_from_dict(body["sampling"]) if body.get("sampling") is not None else None
        except (KeyError, TypeError, ValueError) as err:
            return client_error(err)
        try:
            with lock:
                groups = engine.generate_groups(prompts, group_size, sampling)
        except (PromptTooLongError, ValueError, TypeError) as err:
            return client_error(err)
        return {"groups": [g.to_dict() for g in groups]}

    @app.post("/update_weights")
    async def update_weights(request: Request):
        from safetensors.torch import load
        from starlette.concurrency import run_in_threadpool

        payload = await request.body()
        try:
            tensors = load(payload)
        except Exception as err:  # safetensors raises several types for a malformed buffer
            return client_error(ValueError(f"body is not a safetensors buffer ({err})"))

        def apply():
            with lock:
                engine.update_weights(tensors)
                return {"weights_version": engine.weights_version}

        try:
            return await run_in_threadpool(apply)
        except (KeyError, ValueError) as err:
            return client_error(err)

    @app.post("/sleep")
    def sleep():
        with lock:
            engine.sleep()
        return {"sleeping": engine.sleeping}

    @app.post("/wake")
    def wake():
        with lock:
            engine.wake()
        return {"sleeping": engine.sleeping}

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rollout.serve", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="recipe YAML whose `rollout:` section configures the engine")
    parser.add_argument("--model", help="checkpoint directory (overrides the recipe)")
    parser.add_argument("--backend", choices=("vllm", "native"), default=None, help="engine to host (default vllm)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--gpu-memory-utilization", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 = any free port (printed on stdout)")
    args = parser.parse_args(argv)

    config = RolloutConfig.from_yaml(args.config) if args.config else RolloutConfig()
    overrides = {k: v for k, v in dict(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len,
                                         gpu_memory_utilization=args.gpu_memory_utilization,
                                         seed=args.seed).items() if v is not None}
    backend = args.backend or (config.backend if config.backend != "vllm_server" else "vllm")
    config = dataclasses.replace(config, backend=backend, **overrides)

    from . import build_engine

    engine = build_engine(config)
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(uvicorn.Config(build_app(engine), log_level="warning"))
    print(f"{SERVING_LINE}http://{host}:{port}", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()


def launch(config: RolloutConfig, *, port: int = 0, host: str = "127.0.0.1", log_path: str | Path | None = None,
           timeout_s: float = 300.0, config_path: str | Path | None = None) -> tuple[subprocess.Popen, str]:
    """Start `python -m rollout.serve` in a subprocess; return (process, base URL) once it serves.

    The server's configuration is `config` (written to a YAML beside the log). Raises RuntimeError
    with the log's tail if the process exits or does not announce itself within `timeout_s`.
    """
    import tempfile

    import yaml

    workdir = Path(tempfile.mkdtemp(prefix="rollout-serve-"))
    config_path = Path(config_path or workdir / "rollout.yaml")
    served = dataclasses.replace(config, backend="vllm" if config.backend == "vllm_server" else config.backend)
    config_path.write_text(yaml.safe_dump({"rollout": served.to_dict()}))
    log_path = Path(log_path or workdir / "serve.log")
    log = open(log_path, "w")  # noqa: SIM115 - handed to the child; closed when it is reaped
    cmd = [sys.executable, "-m", "rollout.serve", "--config", str(config_path), "--host", host, "--port", str(port)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=str(Path(__file__).resolve().parent.parent))
    log.close()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        for line in text.splitlines():
            if line.startswith(SERVING_LINE):
                return proc, line[len(SERVING_LINE):].strip()
        if proc.poll() is not None:
            raise RuntimeError(f"rollout server exited with {proc.returncode}; log {log_path}:\n{text[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    proc.wait(timeout=10)
    raise RuntimeError(f"rollout server did not start within {timeout_s:.0f}s; log {log_path}:\n"
                       f"{log_path.read_text(errors='replace')[-3000:]}")


if __name__ == "__main__":
    main()
