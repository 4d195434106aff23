"""``fair serve-student``: an OpenAI-compatible student server on CPU, with continuous batching.

Endpoints (the subset of vLLM's API the engine uses)::

    POST /v1/chat/completions   messages, model, max_tokens (or max_completion_tokens), temperature
                                (0 = greedy), top_p, seed, n, stop; vLLM extras ignore_eos and
                                return_token_ids
    GET  /v1/models             the base model and every LoRA adapter, as ``vllm serve
                                --enable-lora --lora-modules name=path`` lists them
    GET  /health                200 once the model is loaded
    GET  /stats                 batching counters (requests, steps, max/mean batch, tokens)
    GET  /metrics               the same counters for Prometheus (fair_student_*)

The ``model`` field picks base or adapter per request, and rows of different adapters share a
batch. Generation runs in :class:`trainer.batching.BatchEngine`'s worker thread, so the aiohttp
event loop only parses, tokenizes and answers.

In-process use (demo, tests, benchmarks)::

    with StudentServer(adapter="runs/train/adapter") as srv:
        client = OpenAI(base_url=srv.base_url, api_key="-")
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from fairdistill.engine.server_thread import ServerThread
from fairdistill.engine.wire import ChatCompletionRequest, RequestInvalid, parse_chat_request
from fairdistill.trainer import vllm_backend
from fairdistill.trainer.adapters import parse_adapters

if TYPE_CHECKING:
    from fairdistill.trainer.batching import BatchEngine, GenerationResult, SamplingParams

DEFAULT_STUDENT = "smollm2-135m"  # trainer.model.DEFAULT_STUDENT, without importing torch early

DEFAULT_ALIASES = ("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct")
MAX_N = 64


def _error(status: int, message: str, *, param: str | None = None, code: str | None = None) -> web.Response:
    kind = {400: "invalid_request_error", 404: "not_found_error", 503: "service_unavailable"}
    body = {
        "error": {"message": message, "type": kind.get(status, "server_error"), "param": param, "code": code}
    }
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _json(payload: Any) -> web.Response:
    return web.Response(body=orjson.dumps(payload), content_type="application/json")


class StudentServer:
    """The student server on a background thread with its own event loop.

    ``model``: HF id, local folder, ``None`` for the embedded SmolLM2-135M-Instruct, or an
    already-loaded model (then pass ``tokenizer``). ``adapter``: see :func:`parse_adapters`.
    ``port=0`` picks a free port; ``base_url`` is ``http://HOST:PORT/v1`` once started.
    """

    def __init__(
        self,
        model: Any = None,
        adapter: str | Path | Sequence | Mapping | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        max_batch: int = 16,
        *,
        tokenizer: Any = None,
        served_model_name: str | None = None,
        threads: int | None = None,
    ):
        self.model_arg, self.tokenizer = model, tokenizer
        self.adapters = parse_adapters(adapter)
        self.host, self.port, self.max_batch = host, port, max_batch
        self.threads = threads
        self.served_model_name = served_model_name
        self.engine: BatchEngine | None = None
        self._tok_lock = threading.Lock()
        self._thread = ServerThread(self._start_site, self._stop_site, name="student-http")
        self._runner: web.AppRunner | None = None
        self.created = int(time.time())
        self._loaded_adapters = False

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def stats(self) -> dict:
        return self.engine.stats.as_dict() if self.engine else {}

    def start(self) -> StudentServer:
        passive_openmp()
        import torch

        from fairdistill.trainer.batching import BatchEngine

        if self.threads:
            torch.set_num_threads(self.threads)
        model, tok = self._load()
        self.engine = BatchEngine(model, tok, max_batch=self.max_batch, tokenizer_lock=self._tok_lock).start()
        try:
            self._thread.start()
        except BaseException:
            self.engine.stop()
            raise
        return self

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.stop()  # fails what is still pending, so open handlers answer 503
        self._thread.stop()

    def __enter__(self) -> StudentServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _load(self):
        from fairdistill.trainer.model import load_student

        base_names: list[str] = []
        if self.model_arg is None or isinstance(self.model_arg, str | Path):
            name = None if self.model_arg is None else str(self.model_arg)
            model, tok = load_student(name, device="cpu")
            if name in (None, "", DEFAULT_STUDENT):
                base_names = [DEFAULT_STUDENT, *DEFAULT_ALIASES]
            else:
                base_names = [name, str(Path(name).resolve())] if Path(name).exists() else [name]
        else:
            model, tok = self.model_arg, self.tokenizer
            if tok is None:
                raise ValueError("pass tokenizer= with an already-loaded model")
            base_names = [getattr(model.config, "name_or_path", "") or "student"]
            if hasattr(model, "peft_config") and not self.adapters:  # a PeftModel already in memory
                self.adapters = {name: Path(f"<in-memory:{name}>") for name in model.peft_config}
                self._loaded_adapters = True
        if self.served_model_name:
            base_names.insert(0, self.served_model_name)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        if self.adapters and not self._loaded_adapters:
            from peft import PeftModel

            names = iter(self.adapters.items())
            first, path = next(names)
            model = PeftModel.from_pretrained(model, str(path), adapter_name=first)
            for name, path in names:
                model.load_adapter(str(path), adapter_name=name)
        self.base_name = base_names[0]
        self.root = base_names[-1] if self.model_arg is not None else DEFAULT_STUDENT
        # every name a request may use -> adapter (None = base)
        self.names: dict[str, str | None] = {n: None for n in base_names}
        for name, path in self.adapters.items():
            aliases = [name, str(path), str(path.resolve())] if path.exists() else [name]
            for alias in aliases:
                self.names.setdefault(alias, name)
        cfg = model.get_base_model().config if hasattr(model, "peft_config") else model.config
        self.context = int(getattr(cfg, "max_position_embeddings", 0) or 2048)
        self.tokenizer = tok
        return model, tok

    async def _start_site(self) -> None:
        app = web.Application(client_max_size=16 * 1024**2)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/stats", self._stats)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _stop_site(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- handlers ----------------------------------------------------------------------------
    async def _health(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def _stats(self, request: web.Request) -> web.Response:
        assert self.engine is not None
        return _json({**self.stats, "waiting": self.engine.waiting(), "running": len(self.engine._rows)})

    async def _metrics(self, request: web.Request) -> web.Response:
        """The batching counters for Prometheus (``fair_student_*``), always served."""
        from fairdistill.engine.exposition import exposition  # prometheus-client only, not the request path

        assert self.engine is not None
        stats = self.engine.stats.as_dict()
        counters = {k: v for k, v in stats.items() if k not in ("max_batch_seen", "mean_batch")}
        gauges = {
            "max_batch_seen": self.engine.stats.max_batch_seen,
            "waiting": self.engine.waiting(),
            "running": len(self.engine._rows),
        }
        body, content_type = exposition("fair_student", counters, gauges)
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _models(self, request: web.Request) -> web.Response:
        data = [
            {
                "id": self.base_name,
                "object": "model",
                "created": self.created,
                "owned_by": "fairdistill",
                "root": self.root,
                "parent": None,
                "max_model_len": self.context,
            }
        ]
        for name, path in self.adapters.items():
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "fairdistill",
                    "root": str(path),
                    "parent": self.base_name,
                }
            )
        return _json({"object": "list", "data": data})

    async def _chat(self, request: web.Request) -> web.Response:
        try:
            job_args = self._parse(parse_chat_request(await request.read()))
        except RequestInvalid as exc:
            return _error(exc.status, str(exc), param=exc.param, code=exc.code)
        from fairdistill.trainer.batching import Job

        prompt_ids, params, adapter, model_name, want_ids = job_args
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def deliver(result: GenerationResult | BaseException) -> None:  # worker thread
            loop.call_soon_threadsafe(_settle, fut, result)

        job = Job(prompt_ids, params, deliver, adapter=adapter)
        assert self.engine is not None
        try:
            self.engine.submit(job)
        except RuntimeError as exc:
            return _error(503, str(exc))
        try:
            result = await fut
        except asyncio.CancelledError:
            job.cancelled = True  # the client went away: free its rows at the next step
            raise
        except Exception as exc:
            status = 503 if "shutting down" in str(exc) else 500
            return _error(status, f"generation failed: {exc}")
        return _json(self._reply(result, model_name, want_ids, prompt_ids))

    def _parse(self, body: ChatCompletionRequest) -> tuple[list[int], SamplingParams, str | None, str, bool]:
        """What msgspec (``engine.wire``) cannot check: the model, unsupported options, the context."""
        from fairdistill.trainer.batching import SamplingParams

        chat = [{"role": m.role, "content": m.text()} for m in body.messages]
        model_name = body.model or self.base_name
        if model_name not in self.names:
            served = [self.base_name, *self.adapters]
            raise RequestInvalid(
                f"The model `{model_name}` does not exist. Served: {served}",
                param="model",
                status=404,
                code="model_not_found",
            )
        if body.stream:
            raise RequestInvalid("stream=true is not supported by fair serve-student", param="stream")
        if body.logprobs or body.top_logprobs:
            raise RequestInvalid("logprobs are not supported by fair serve-student", param="logprobs")
        if body.n is not None and body.n > MAX_N:
            raise RequestInvalid(f"n must be in [1, {MAX_N}]", param="n")

        with self._tok_lock:
            text = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            prompt_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        room = self.context - len(prompt_ids)
        if room < 1:
            raise RequestInvalid(
                f"the prompt has {len(prompt_ids)} tokens; this model's context is {self.context}",
                param="messages",
            )
        max_tokens = body.limit
        if max_tokens is not None and max_tokens > room:
            raise RequestInvalid(
                f"max_tokens={max_tokens} + {len(prompt_ids)} prompt tokens exceed the context "
                f"({self.context})",
                param="max_tokens",
            )
        params = SamplingParams(
            max_tokens=max_tokens or room,
            temperature=1.0 if body.temperature is None else float(body.temperature),
            top_p=1.0 if body.top_p is None else float(body.top_p),
            n=body.n or 1,
            seed=body.seed,
            stop=body.stops,
            ignore_eos=body.ignore_eos,
        )
        return prompt_ids, params, self.names[model_name], model_name, body.return_token_ids

    def _reply(self, result: GenerationResult, model: str, want_ids: bool, prompt_ids: list[int]) -> dict:
        choices = []
        for i, c in enumerate(result.choices):
            choice: dict[str, Any] = {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": None,
                "finish_reason": c.finish_reason,
            }
            if want_ids:
                choice["token_ids"] = c.token_ids
            choices.append(choice)
        reply = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens,
            },
        }
        if want_ids:
            reply["prompt_token_ids"] = prompt_ids
        return reply


def passive_openmp() -> None:
    """Make idle OpenMP threads sleep instead of spin, unless the user chose otherwise.

    The student server shares 2 cores with the engine and the simulator; spinning OpenMP workers
    then steal the core the busy thread needs, and a batch-16 decode step gets up to 4x slower
    (measured: 17 vs 42 tokens/s under load). Takes effect only before torch is imported.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _settle(fut: asyncio.Future, result: GenerationResult | BaseException) -> None:
    if fut.done():
        return
    if isinstance(result, BaseException):
        fut.set_exception(result)
    else:
        fut.set_result(result)


def cli_main(args) -> int:
    """``fair serve-student``: serve until SIGINT/SIGTERM."""
    from fairdistill.engine.jsonfile import read_json_object

    backend = getattr(args, "backend", "cpu")
    if backend != "cpu":  # vllm, or auto: vllm when the `vllm` command is installed
        if backend == "vllm" or vllm_backend.have_vllm_command():
            return vllm_backend.serve_cli(args)
        print("fair serve-student: --backend auto: no `vllm` command, serving on CPU", file=sys.stderr)
    for path in parse_adapters(args.adapter).values():  # before minutes of model loading
        if not (path / "adapter_config.json").is_file():
            raise FileNotFoundError(f"--adapter {path}: not a LoRA adapter folder (no adapter_config.json)")
        read_json_object(path / "adapter_config.json")  # readable, else one line naming it (exit 2)
    passive_openmp()
    threads = int(os.environ.get("FAIR_THREADS", "0")) or None
    server = StudentServer(
        model=args.model,
        adapter=args.adapter,
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        threads=threads,
    )
    print(
        f"fair serve-student: loading {args.model or DEFAULT_STUDENT}"
        + (f" + adapter {args.adapter}" if args.adapter else ""),
        file=sys.stderr,
    )
    server.start()
    names = [server.base_name, *server.adapters]
    metrics = server.base_url.removesuffix("/v1") + "/metrics"  # (`--port 0`: the port picked)
    print(
        f"fair serve-student: serving {names} on {server.base_url} (metrics: {metrics})",
        file=sys.stderr,
        flush=True,
    )
    done = threading.Event()

    def on_signal(signum, frame):
        done.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not done.wait(0.5):
            pass
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        server.stop()
        print("fair serve-student: stopped", file=sys.stderr)
    return 0
