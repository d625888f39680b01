"""The weight types a GGUF export can have, who writes each and its row block, without heavy imports
(the CLI lists them and settings validation checks them before torch loads).

f32 / f16 / bf16 / q8_0 are written by the `gguf` package (pgprune.gguf_export); the rest by
llama.cpp's own quantizer from an f32 file, which needs llama-cpp-python (pgprune[llamacpp]).
A quantized type stores each matrix row in blocks, so every row length must be a multiple of it.
"""

from __future__ import annotations

from pgprune.errors import ConfigError

WRITER_BLOCKS = {"f32": 1, "f16": 1, "bf16": 1, "q8_0": 32}  # written by the gguf package
LLAMACPP_BLOCKS = {"q4_0": 32, "q4_1": 32, "q5_0": 32, "q5_1": 32, "q2_k": 256, "q3_k_m": 256,
                   "q4_k_s": 256, "q4_k_m": 256, "q5_k_s": 256, "q5_k_m": 256, "q6_k": 256}
OUTTYPES = tuple(WRITER_BLOCKS) + tuple(LLAMACPP_BLOCKS)


def row_block(outtype: str) -> int:
    """How many values of a row `outtype` stores per block (1: any row length)."""
    check_outtype_name(outtype, need_llama_cpp=False)
    return {**WRITER_BLOCKS, **LLAMACPP_BLOCKS}[outtype]


def check_outtype_name(outtype: str, need_llama_cpp: bool = True) -> None:
    """ConfigError for an unknown outtype, or (need_llama_cpp) one of llama.cpp's without llama-cpp-python."""
    if outtype not in OUTTYPES:
        raise ConfigError(f"unknown GGUF outtype {outtype!r}; choose from {', '.join(OUTTYPES)}")
    if need_llama_cpp and outtype in LLAMACPP_BLOCKS:
        from pgprune.evaluate.llamacpp import require_llama_cpp

        require_llama_cpp(f"--outtype {outtype} (llama.cpp's quantizer)")
