"""Loading one model for serving: everything decided before the engine thread starts, as one frozen value.

:func:`load` resolves the device and dtype (and says what this CPU computes natively), resolves a Hub id (which
may download), loads the model and its tokenizer, applies the configured prompts, chooses the kernels (linear,
attention, pool+encode; measured on the CPU where the fastest depends on the CPU), resolves the token budgets,
builds the scheduler and the runner, and for ``--quantize int8`` calibrates and swaps the linear layers. Each
refusal is a :class:`ConfigError` that names the flag to change.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from embedserve.config import EngineConfig, ModelConfig
from embedserve.engine import cpu as cpu_caps
from embedserve.engine.calibration import CALIBRATION_TEXTS
from embedserve.engine.device import (
    bind_thread,
    driver_version,
    gpu_words,
    keep_blocks_on_the_heap,
    resolve_device,
    resolve_dtype,
)
from embedserve.engine.interface import EngineInfo
from embedserve.engine.runner import Runner
from embedserve.engine.scheduler import Budgets, Scheduler, resolve_budgets
from embedserve.engine.token_ids import cl100k
from embedserve.engine.tokenizer import Tokenizer
from embedserve.errors import ConfigError
from embedserve.kernels.attention import ROW_TOKENS, AttentionShape, measure_solo_min, select_backend
from embedserve.kernels.linear import (
    Int8Linear,
    LinearPlan,
    gemm_weights_to,
    int8_available,
    int8_fusion_problem,
    int8_gemm,
    int8_time_ratio,
    int8_weight_max,
    quantize_int8,
    select_linear_backend,
)
from embedserve.kernels.pool_encode import select_pool_backend
from embedserve.models.classifier import ChatTemplate
from embedserve.models.hub import Source
from embedserve.models.hub import resolve as resolve_model
from embedserve.models.encoder import Kernels
from embedserve.models.sentence import LoadedModel, ModelRecipe, build_model, read_model

log = logging.getLogger(__name__)

# int8 layers this many times as long as bf16 GEMMs of the same layers, or longer, get a start-up warning
# (_compare_with_bf16); nearer ties are within a 2-core host's noise.
INT8_SLOWER = 1.15


@dataclass(frozen=True, kw_only=True)
class Loaded:
    """A model ready to serve, and every choice made for it at load."""

    device: torch.device
    dtype: torch.dtype
    source: Source
    model: LoadedModel
    tokenizer: Tokenizer
    max_length: int  # tokens of the longest input (the model's, the tokenizer's and --max-input-tokens' least)
    id_limit: int  # token ids the embedding table has rows for: 0 .. id_limit - 1
    text_ids_may_overflow: bool  # the tokenizer knows more tokens than the table has rows
    token_types: bool  # pairs carry BERT token types (a cross-encoder with a type table)
    fault_ids: list[int] | None  # test hook: the --fault-marker text's tokens
    budgets: Budgets
    kernels: Kernels  # what the encoder was built with: attention backend, linear plan
    linear_backend: str  # the linear layers in words, for the log and /info
    pool_backend: str
    scheduler: Scheduler
    runner: Runner
    depth: int  # steps in flight at once
    info: EngineInfo


def _pooling_name(model) -> str:
    """How the model's output is made, as /info names it: a pooling mode, splade, or colbert (none: per token)."""
    if model.sparse is not None:
        return "splade"
    return "colbert" if model.kind == "multi_vector" else model.spec.pooling


def load(config: EngineConfig, name: str, *, pipeline_depth: int | None = None) -> Loaded:
    """Load ``config``'s model as ``name``. ``pipeline_depth``: steps in flight at once; default 2 on CUDA (the
    next step is staged while one runs), 1 on the CPU."""
    device = resolve_device(config.model.device)
    bind_thread(device)
    int8 = config.model.quantize == "int8"
    if int8 and device.type != "cpu":
        raise ConfigError(f"--quantize int8 runs on the CPU only (this model is on {device}); on a GPU "
                          f"serve bfloat16 (--dtype auto)")
    dtype = torch.float32 if int8 else resolve_dtype(config.model.dtype, device)
    if device.type == "cpu":
        _check_cpu_dtype(dtype, config.model.dtype, int8)
        keep_blocks_on_the_heap()
    else:
        gpu, capability = gpu_words(device)
        log.info("gpu: %s, compute capability %d.%d, driver for CUDA %s, torch built for CUDA %s; dtype %s (%s)",
                 gpu, *capability, driver_version(), torch.version.cuda, str(dtype).removeprefix("torch."),
                 "asked" if config.model.dtype != "auto" else "auto: bf16 from sm_80 on, else fp16")
    if int8 and (why := int8_available()) is not None:
        raise ConfigError(f"--quantize int8: {why}")
    started = time.perf_counter()
    source = resolve_model(config.model.path, config.model.revision)  # may download from the Hub
    recipe = _configure_prompts(read_model(source.directory, kind=config.model.kind), config.model)
    if dtype == torch.float16 and not recipe.encoder_cls.float16:
        family = recipe.encoder_cls.__name__.removesuffix("Model")
        if config.model.dtype != "auto":
            raise ConfigError(f"--dtype float16: {family} overflows in float16 (its activations pass 65504); serve "
                              "bfloat16 where the device has it, or float32")
        dtype = torch.float32
        log.warning("dtype: %s overflows in float16 and this device has no bfloat16: float32", family)
    max_length = recipe.max_length
    if config.max_input_tokens is not None:
        max_length = min(max_length, config.max_input_tokens)
    tokenizer = Tokenizer(recipe.directory, max_length=max_length, do_lower_case=recipe.spec.do_lower_case,
                          cap_to_tokenizer=recipe.spec.max_seq_length is None)
    template = recipe.classifier.template if recipe.classifier is not None else None
    if isinstance(template, ChatTemplate):
        tokenizer.use_chat_template(dict(template.kwargs), template.system, template.restore_suffix)
    elif template is not None:
        tokenizer.use_template(template.prefix, template.suffix)
    max_length = tokenizer.max_length
    sc = config.scheduler
    budgets = resolve_budgets(sc, device_type=device.type, max_length=max_length, can_chunk=recipe.supports_chunking)
    kernels = _choose_kernels(recipe.attention_shape, budgets, config.model.attention, device, dtype, int8)
    # bf16 on a CPU: GEMMs and attention in bf16, the residual stream, norms and embeddings in float32 where the
    # family allows it (MiniLM's worst cosine vs sentence-transformers on the parity texts 0.99990 -> 0.99996,
    # for 2.7% of its speed on the development CPU).
    mixed = device.type == "cpu" and dtype == torch.bfloat16 and recipe.encoder_cls.fp32_residual
    model = build_model(recipe, dtype=torch.float32 if mixed else dtype, device=device, kernels=kernels)
    if mixed:
        count = gemm_weights_to(model.encoder, dtype)
        log.info("bfloat16: %d linear layers and attention in bf16; the residual stream, norms, embeddings and "
                 "heads in float32", count)
    if model.lexical is not None:
        model.lexical.drop(tokenizer.unweighted_ids)
    linear_plan = kernels.linear
    linear_backend = linear_plan.default + (" or torch, measured per shape" if linear_plan.probe else "")
    # Cross-encoders whose tokenizer marks a pair's second text (BERT's token type 1) get the types packed.
    token_types = model.head is not None and model.encoder.token_type_rows > 1
    # Ids must fit the embedding table, not only the tokenizer: on CUDA an id past the table is a
    # device-side assert that takes the whole process down.
    rows = model.encoder.embedding_rows
    id_limit = min(tokenizer.vocab_size, rows)
    text_ids_may_overflow = tokenizer.vocab_size > rows
    if text_ids_may_overflow:
        log.warning(
            "the tokenizer has %d tokens but the model's embedding table %d rows: texts that tokenize to an "
            "id past the table are refused with 400", tokenizer.vocab_size, rows,
        )
    if config.token_ids == "cl100k":
        cl100k()  # build the id table now, on the loading thread, not inside the first request
    # Test hook: a step holding an input equal to this text's tokens fails as --fault-kind says.
    fault_ids = tokenizer.encode([config.fault_marker], truncate=True)[0] if config.fault_marker else None
    scheduler = Scheduler(max_batch_tokens=budgets.max_batch_tokens, max_batch_requests=sc.max_batch_requests,
                          max_queue=sc.max_queue, chunk_tokens=budgets.chunk_tokens, max_kv_tokens=budgets.max_kv_tokens,
                          priority_share=sc.priority_share)
    pool_backend = select_pool_backend(device, config.model.pool_kernel)
    runner = Runner(model, pool_backend)
    if int8:
        linear_backend = _quantize_int8(model, tokenizer, runner, linear_plan, id_limit)
    depth = pipeline_depth or (2 if device.type == "cuda" else 1)
    classifier = model.classifier
    info = EngineInfo(
        name=name, kind=model.kind, dimensions=model.dimensions, max_input_length=max_length,
        max_batch_tokens=budgets.max_batch_tokens, max_batch_requests=sc.max_batch_requests, max_queue=sc.max_queue,
        id_limit=id_limit, pooling=_pooling_name(model) if classifier is None else None,
        labels=tuple(classifier.labels) if classifier is not None else None,
        dtype=str(dtype).removeprefix("torch."), quantize=config.model.quantize, device=str(device),
        commit=source.commit, tokenizer_workers=config.tokenizer_workers,
        prompts=tuple(n for n, text in model.spec.prompts.items() if text),
        lexical=model.lexical is not None, multi_vector=model.colbert is not None,
    )
    hf = model.hf_config
    log.info("architecture: %s -> %s", (hf.get("architectures") or [hf.get("model_type")])[0],
             model.encoder.describe())
    log.info(
        "loaded %s in %.1fs: %s (%s) on %s, dtype %s, attention %s, linear %s, pool+encode %s, %s, "
        "dimensions %d, max input %d tokens, max batch %d tokens / %d inputs, %d step(s) in flight",
        f"{source.repo_id} (revision {source.revision or 'main'}, commit {source.commit})" if source.repo_id
        else model.directory, time.perf_counter() - started, type(model.encoder).__name__,
        model.kind, device, str(dtype).removeprefix("torch."), kernels.attention,
        linear_backend, pool_backend, _head_words(model, token_types), model.dimensions, max_length,
        budgets.max_batch_tokens, sc.max_batch_requests, depth,
    )
    return Loaded(
        device=device, dtype=dtype, source=source, model=model, tokenizer=tokenizer, max_length=max_length,
        id_limit=id_limit, text_ids_may_overflow=text_ids_may_overflow, token_types=token_types, fault_ids=fault_ids,
        budgets=budgets, kernels=kernels, linear_backend=linear_backend, pool_backend=pool_backend,
        scheduler=scheduler, runner=runner, depth=depth, info=info,
    )


def _choose_kernels(shape: AttentionShape, budgets: Budgets, attention: str, device: torch.device,
                    dtype: torch.dtype, int8: bool) -> Kernels:
    """The kernels the encoder is built with: its attention backend, chosen for its heads, windows and chunks on
    this torch (``--attention``), and the linear layers' (on the CPU, whether the fused GEMM beats ``F.linear``
    depends on the CPU and the shape: measured per shape as serving meets them)."""
    if budgets.chunk_tokens is None:
        shape = dataclasses.replace(shape, chunked=False)
    try:
        backend = select_backend(device, attention, dtype, shape)
    except ValueError as e:
        raise ConfigError(f"--attention {attention}: {e}") from e
    # int8 on a CPU with native bf16: attention, the one float32 matmul left, runs in bf16 (MiniLM on an AMX
    # Xeon: 0.78 s of the corpus's 3.1 s in float32; bench_profile.py --quantize int8).
    attention_dtype = torch.bfloat16 if int8 and device.type == "cpu" and cpu_caps.read_cpu().bf16 else None
    solo_min = None
    if device.type == "cpu" and backend == "sdpa_bucketed":
        solo_min, timings = measure_solo_min(shape, attention_dtype or dtype)
        log.info("attention%s: sequences of %d tokens or more run one call each, shorter ones bucketed, up to %d "
                 "tokens several to a row (measured, bucketed/one each per length: %s)",
                 " in bfloat16" if attention_dtype else "", solo_min, ROW_TOKENS, timings)
    linear = LinearPlan(select_linear_backend(device, dtype), probe=device.type == "cpu" and not int8)
    return Kernels(attention=backend, solo_min=solo_min, linear=linear, attention_dtype=attention_dtype)


def _check_cpu_dtype(dtype: torch.dtype, asked: str, int8: bool) -> None:
    """Log what this CPU computes natively and the dtype chosen; warn when a half precision asked for is
    emulated here (with what a short probe measured)."""
    info = cpu_caps.read_cpu()
    if int8:
        why = "quantize int8: int8 GEMMs, float32 between them"
    elif asked != "auto":
        why = "asked"
    else:
        why = "auto: native bf16" if info.bf16 else "auto: no native bf16"
    log.info("cpu: %s; dtype %s (%s)", info.describe(), str(dtype).removeprefix("torch."), why)
    warning = cpu_caps.emulation_warning(dtype, info)
    if warning is not None:
        log.warning("%s", warning)


def _quantize_int8(model: LoadedModel, tokenizer: Tokenizer, runner: Runner, linear_plan: LinearPlan,
                   id_limit: int) -> str:
    """Calibrate on :data:`CALIBRATION_TEXTS` in float32, then swap the encoder's linear layers for int8; returns
    the words that describe the linear layers now."""
    started = time.perf_counter()
    # Texts whose ids the model's embedding table cannot hold are refused in serving; here they are skipped.
    ids = [x for x in tokenizer.encode(list(CALIBRATION_TEXTS), truncate=True) if x and max(x) < id_limit]
    weight_max = int8_weight_max()
    with linear_plan.calibrate() as absmax:
        for i in range(0, len(ids), 8):
            batch = ids[i : i + 8]
            runner.run(batch, [model.dimensions] * len(batch), [False] * len(batch))
    # Each GEMM's input levels in one pass compiled by inductor where it builds it here (a C++ compiler; seconds,
    # logged); else in eager passes, and the reason is logged.
    fusion = int8_fusion_problem()
    if fusion is not None:
        log.info("int8: activation levels in eager passes: %s", fusion)
    shapes: dict[tuple[int, int], tuple[str, torch.nn.Linear]] = {}  # one float layer of each shape, by name
    for name, layer in model.encoder.named_modules():
        if isinstance(layer, torch.nn.Linear):
            shapes.setdefault((layer.in_features, layer.out_features), (name, layer))
    count = quantize_int8(model.encoder, absmax, weight_max=weight_max, fused=fusion is None)
    _compare_with_bf16([(layer, model.encoder.get_submodule(name)) for name, layer in shapes.values()])
    total = sum(isinstance(m, torch.nn.Linear) for m in model.encoder.modules()) + count
    unsigned = sum(1 for m in model.encoder.modules() if isinstance(m, Int8Linear) and m.unsigned)
    if weight_max == 127:
        widths = "8-bit weights" + (f"; {unsigned} narrowing layers 8-bit unsigned activations" if unsigned else "")
    else:
        widths = "7-bit weights" + (
            f"; {unsigned} narrowing layers 8-bit weights, 7-bit unsigned activations" if unsigned else "")
    passes = "fused levels" if fusion is None else "eager levels"
    log.info("int8: %d linear layers quantized (%s, %s GEMM, %s) after calibrating on %d texts (%d tokens) in "
             "%.2fs", count, widths, int8_gemm(), passes, len(ids), sum(map(len, ids)), time.perf_counter() - started)
    return f"int8 ({count} of {total} layers, {widths}, {int8_gemm()} GEMM, {passes})"


def _compare_with_bf16(pairs: list[tuple[torch.nn.Linear, torch.nn.Module]]) -> None:
    """On a CPU with native bf16, time one int8 layer of each shape against its float layer as a bf16 GEMM (tens
    of ms) and say which was faster; a warning where int8 was clearly the slower (AMX), since the operator asked
    for int8 to serve faster."""
    pairs = [(layer, q) for layer, q in pairs if isinstance(q, Int8Linear)]
    if not pairs or not cpu_caps.read_cpu().bf16:
        return
    ratio = int8_time_ratio(pairs, torch.bfloat16)
    shapes = ", ".join(f"{layer.in_features}->{layer.out_features}" for layer, _ in pairs)
    if ratio > INT8_SLOWER:
        log.warning("int8: on this CPU the int8 layers took %.2fx as long as bf16 GEMMs of the same layers (%s; "
                    "2048 rows, measured at start-up): serving without --quantize, in bfloat16 (--dtype auto here), "
                    "would likely be faster, and closer to float32", ratio, shapes)
    else:
        log.info("int8: the int8 layers took %.2fx as long as bf16 GEMMs of the same layers (%s; 2048 rows, "
                 "measured at start-up)", ratio, shapes)


def _configure_prompts(recipe: ModelRecipe, cfg: ModelConfig) -> ModelRecipe:
    """The configured prompts over the folder's; the default must be one of them."""
    spec = recipe.spec
    if not cfg.prompts and cfg.default_prompt_name is None:
        return recipe
    prompts = {**spec.prompts, **dict(cfg.prompts)}
    default = spec.default_prompt_name if cfg.default_prompt_name is None else (cfg.default_prompt_name or None)
    if default is not None and default not in prompts:
        raise ConfigError(f"default_prompt_name {default!r} is not one of this model's prompts: "
                          f"{', '.join(sorted(prompts)) or 'none'}")
    log.info("prompts: %s; default: %s", ", ".join(f"{k}={v!r}" for k, v in prompts.items()) or "none",
             default or "none")
    return dataclasses.replace(recipe, spec=dataclasses.replace(spec, prompts=prompts, default_prompt_name=default))


def _head_words(m: LoadedModel, token_types: bool) -> str:
    if m.classifier is not None:
        return (f"{type(m.head).__name__} -> {m.classifier.num_labels} label(s), {m.classifier.activation}"
                f"{', token types' if token_types else ''}")
    return (f"pooling {m.spec.pooling}{f' + {len(m.dense)} dense' if len(m.dense) else ''}"
            f"{' + normalize' if m.spec.normalize else ''}{'; lexical weights (sparse_linear)' if m.lexical else ''}")
