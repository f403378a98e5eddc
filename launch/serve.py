"""`python -m launch.serve model_uri=models:/<name>@<alias> [host=127.0.0.1] [port=5001] [...Hydra overrides,
e.g. tracking.uri=...]`: serve a registered model, checked first, with bounded requests.

Before MLflow's loader touches the version, it must be one of our packages (`check_version`): an MLmodel whose
only flavor is a models-from-code pyfunc (no cloudpickle, no extra code paths), whose stored code file is
byte for byte one this project writes (trainer/serving/model_code.py), whose artifacts are the package's two
files, and whose package passes every check of trainer/registry/package.py (card, tensors, finite weights).
Anything else exits 2 with one line; nothing in it ran. Plain `mlflow models serve` has no such check: MLflow
runs the version's stored code (or, for other flavors, unpickles its files) as it loads it (docs/serving.md).

The server is MLflow's own scoring app (`mlflow.pyfunc.scoring_server.init`, the one `mlflow models serve`
runs under uvicorn) behind `BoundedRequests`, because MLflow's server has a request timeout but no limit on
the body's size or its JSON nesting (a 100,000-deep `[[[...` is an HTTP 500, a 50 MB invalid body is echoed
back in its 400) and its 400s may quote the request.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import List, Optional, Sequence

from launch.app import cli, composed, split_options

DEFAULTS = {"host": "127.0.0.1", "port": "5001", "max_request_flops": None, "workers": "2", "threads": "0"}

HELP = """
python -m launch.serve model_uri=<uri> [host=127.0.0.1] [port=5001] [key=value ...]

Serves a registered model over HTTP (POST /invocations, MLflow's scoring app) after checking that the version
is one of this project's packages (no pickle, the stored code file byte for byte ours, every package check);
request bodies are bounded in size (32 MiB) and JSON nesting (8 levels).

Requests are bounded by their work too: samples x passes x the model's forward FLOPs per image, at most
max_request_flops (2e11, about 10 s on a 2-core CPU); above it the answer is 400 naming the limit. Generation runs
in `workers` processes, so one long request never holds the others or /ping; a request still running at
MLflow's request timeout (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT, 60 s) has its worker stopped and replaced.

Main options:
  model_uri=<uri>    models:/<name>@champion, models:/<name>/<version>
  host=, port=       where to listen
  max_request_flops=2e11   workers=2   threads=0 (intra-op threads per worker; 0: the usable cores / workers)
  tracking.uri=...   the MLflow store holding the model
Example:
  python -m launch.serve model_uri=models:/demo@champion port=5001
Docs: docs/serving.md (Serving).
"""

# a set of 50 RGB 64x64 images as JSON text is ~12 MB; requests above this are refused unread (413)
MAX_BODY_BYTES = 32 << 20
# {"inputs": {"images": [S][C][H][W]}} nests 6 deep; anything deeper is no request this model takes
MAX_JSON_DEPTH = 8
MAX_ERROR_BYTES = 2048  # an error body is cut to this (a message, never the request)


def code_digests() -> set:
    """sha256 of the code files this project stores with its registered versions."""
    from trainer.registry.mlflow_model import SERVING_CODE

    return {hashlib.sha256(SERVING_CODE.read_bytes()).hexdigest()}


def check_version(root: Path) -> Path:
    """Refuse (PackageError, exit 2) a downloaded MLflow model that is not one of our packages; its package dir."""
    import yaml

    from trainer.registry.package import CARD, WEIGHTS, PackageError, read_package

    mlmodel = root / "MLmodel"
    if not mlmodel.is_file():
        raise PackageError(f"{root} has no MLmodel file: not an MLflow model of this project")
    try:
        meta = yaml.safe_load(mlmodel.read_text())
    except yaml.YAMLError as exc:
        raise PackageError(f"{mlmodel}: not YAML ({str(exc).splitlines()[0]})") from exc
    flavors = (meta or {}).get("flavors") if isinstance(meta, dict) else None
    if not isinstance(flavors, dict) or set(flavors) != {"python_function"}:
        raise PackageError(f"{mlmodel}: flavors {sorted(flavors or {})}, expected only python_function "
                           f"(models from code); refusing to let MLflow load it")
    pf = flavors["python_function"]
    if pf.get("loader_module") != "mlflow.pyfunc.loaders.code_model" or not pf.get("model_code_path"):
        raise PackageError(f"{mlmodel}: python_function.loader_module {pf.get('loader_module')!r} is not a "
                           f"models-from-code pyfunc (a pickled python_model is never loaded)")
    if pf.get("code") or pf.get("python_model"):
        raise PackageError(f"{mlmodel}: python_function carries code paths or a pickled python_model; refusing")
    code = root / Path(str(pf["model_code_path"])).name
    if not code.is_file() or hashlib.sha256(code.read_bytes()).hexdigest() not in code_digests():
        raise PackageError(f"{code}: the stored model code is not the code this project writes "
                           f"(trainer/serving/model_code.py); MLflow would run it, so it is refused")
    artifacts = pf.get("artifacts") or {}
    want = {"weights": f"artifacts/{WEIGHTS}", "card": f"artifacts/{CARD}"}
    got = {k: (v or {}).get("path") for k, v in artifacts.items()} if isinstance(artifacts, dict) else {}
    if got != want:
        raise PackageError(f"{mlmodel}: artifacts {got}, expected {want}")
    read_package(root / "artifacts")  # every card, tensor and value check; the model itself is dropped
    return root / "artifacts"


def _depth_exceeds(value, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values() if isinstance(v, (dict, list)))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item if isinstance(v, (dict, list)))
    return False


class BoundedRequests:
    """ASGI middleware in front of MLflow's scoring app: /invocations bodies above `max_body` are refused
    (413) before they are read in full, bodies that are not JSON or nest deeper than `max_depth` get a 400
    that names the problem only, and every error body is cut to `max_error` bytes."""

    def __init__(self, app, max_body: int = MAX_BODY_BYTES, max_depth: int = MAX_JSON_DEPTH,
                 max_error: int = MAX_ERROR_BYTES, params: Optional[Sequence[str]] = None) -> None:
        self.app, self.max_body, self.max_depth, self.max_error = app, max_body, max_depth, max_error
        self.params = tuple(params) if params is not None else None  # the signature's; MLflow drops the rest

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("path") != "/invocations":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        too_big = (413, f"request body above the limit of {self.max_body:,} bytes")
        try:
            if int(headers.get(b"content-length", b"0")) > self.max_body:
                return await self._reply(send, *too_big)
        except ValueError:
            return await self._reply(send, 400, "bad Content-Length header")
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body:
                return await self._reply(send, *too_big)
            if not message.get("more_body"):
                break
        content_type = headers.get(b"content-type", b"application/json").split(b";")[0].strip()
        if content_type == b"application/json":
            try:
                parsed = json.loads(bytes(body))
            except RecursionError:
                return await self._reply(send, 400, f"request JSON nests deeper than {self.max_depth} levels")
            except (ValueError, UnicodeDecodeError) as exc:  # the reason, never the text
                where = f" at line {exc.lineno} column {exc.colno}" if hasattr(exc, "lineno") else ""
                return await self._reply(send, 400, f"request body is not valid JSON ({type(exc).__name__}{where})")
            if _depth_exceeds(parsed, self.max_depth):
                return await self._reply(send, 400, f"request JSON nests deeper than {self.max_depth} levels")
            given = parsed.get("params") if isinstance(parsed, dict) else None
            unknown = sorted(set(given) - set(self.params)) if isinstance(given, dict) and self.params else []
            if unknown:  # MLflow would drop them with a warning in its log and answer 200
                return await self._reply(send, 400, f"unknown params {unknown}: this model takes "
                                                    f"{', '.join(self.params)}")
            del parsed, given
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, self._bounded_errors(send))

    def _bounded_errors(self, send):
        held = {}

        async def guarded(message) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                held.update(start=message, body=bytearray())
                return
            if message["type"] == "http.response.body" and "start" in held:
                held["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return
                status = held["start"]["status"]
                try:
                    error = json.loads(bytes(held["body"]))
                    text = str(error.get("message", "")) if isinstance(error, dict) else ""
                    code = error.get("error_code", "") if isinstance(error, dict) else ""
                except ValueError:
                    text, code = bytes(held["body"][:self.max_error]).decode("utf-8", "replace"), ""
                return await self._reply(send, status, reason_of(text), code)
            await send(message)

        return guarded

    async def _reply(self, send, status: int, message: str, code: str = "") -> None:
        budget = self.max_error - 100
        if len(message) > budget:
            message = message[:budget] + f"... ({len(message) - budget:,} characters cut)"
        payload = {"error_code": code or ("REQUEST_TOO_LARGE" if status == 413 else "BAD_REQUEST"),
                   "message": message}
        data = json.dumps(payload).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data, "more_body": False})


def reason_of(message: str) -> str:
    """MLflow's scoring app puts a dump of the request before the reason ("Failed to predict data '<data>'.
    Error: <reason>", the same for its schema check): the reason alone."""
    head, sep, reason = message.rpartition("Error: ")
    return reason.strip() if sep and head.startswith(("Failed to predict data", "Failed to enforce schema")) else message


def serve(argv: List[str]) -> int:
    from trainer.run.errors import ConfigError

    import os

    from trainer.serving.generation import MAX_REQUEST_FLOPS

    opts, overrides = split_options(argv, DEFAULTS)
    try:
        port, workers, threads = int(opts["port"]), int(opts["workers"]), int(opts["threads"])
        max_flops = float(opts["max_request_flops"] or MAX_REQUEST_FLOPS)
    except ValueError as exc:
        raise ConfigError(f"port, workers and threads must be integers and max_request_flops a number, got "
                          f"{opts}") from exc
    if workers < 1 or threads < 0 or not max_flops > 0:
        raise ConfigError(f"workers must be >= 1, threads >= 0 and max_request_flops > 0, got {workers}, {threads}, "
                          f"{max_flops}")
    # read by the served model (trainer/serving/pyfunc.py, workers.py), which MLflow's loader builds
    os.environ.update(SCHA_SERVE_MAX_REQUEST_FLOPS=repr(max_flops), SCHA_SERVE_WORKERS=str(workers),
                      SCHA_SERVE_THREADS=str(threads))
    from trainer.registry.resolve import fetch_package, is_local, open_model
    from trainer.registry.store import describe_store

    cfg = composed(overrides)
    info = open_model(cfg)
    package = fetch_package(cfg)  # files only: nothing fetched is run or unpickled
    root = package.parent if package.name == "artifacts" else package
    check_version(root)

    import mlflow.pyfunc
    import uvicorn
    from mlflow.pyfunc import scoring_server

    model = mlflow.pyfunc.load_model(str(root))  # runs the stored code file, checked identical to ours
    pool = model.unwrap_python_model().start_workers()  # before listening: the first request waits for nothing
    params = model.metadata.get_params_schema()
    app = BoundedRequests(scoring_server.init(model), params=[p.name for p in params.params] if params else None)
    store = {} if is_local(cfg.model_uri) else {"mlflow_store": describe_store(cfg.tracking)}
    print(json.dumps({**info, **store, "serving": f"http://{opts['host']}:{port}/invocations", "max_body_bytes": MAX_BODY_BYTES,
                      "max_json_depth": MAX_JSON_DEPTH, "max_request_flops": max_flops, "workers": workers,
                      "threads_per_worker": pool.threads}), flush=True)
    try:
        uvicorn.run(app, host=opts["host"], port=port, workers=1, log_level="warning")
    finally:
        pool.close()
    return 0


main = cli(serve, HELP)


if __name__ == "__main__":
    raise SystemExit(main())
