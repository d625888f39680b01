"""Randomly initialised decoder models of any supported family, for tests and benchmarks.

Sizes are given explicitly (head_dim included) so that every family builds the same shape.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

# model_type values the synthetic builder is used with in our tests; any decoder family that
# AutoConfig knows can be built the same way.
TEST_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def synthetic_config(
    model_type: str = "llama",
    *,
    hidden_size: int = 64,
    intermediate_size: int = 96,
    num_hidden_layers: int = 3,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int | None = None,
    vocab_size: int = 128,
    max_position_embeddings: int = 256,
    **extra,
) -> PretrainedConfig:
    head_dim = head_dim or hidden_size // num_attention_heads
    return AutoConfig.for_model(
        model_type,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        **extra,
    )


def synthetic_model(
    model_type: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32, **sizes
) -> PreTrainedModel:
    """A random model in eval mode. Weights are scaled up from the HF default init so that
    pruning changes the logits visibly (the default 0.02 std makes every unit nearly irrelevant)."""
    config = synthetic_config(model_type, **sizes)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 / p.shape[1] ** 0.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:  # norm weights
                p.uniform_(0.5, 1.5)
    return model.eval()
