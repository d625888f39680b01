"""Per-token language-model losses, computed without materialising all logits at once.

The vocabulary is large (49k for SmolLM2, 128k for LLaMA-3), so `[batch, seqlen, vocab]` logits in
fp32 can dwarf the model's activations. We run the decoder, then apply the LM head chunk by chunk
and keep only the NLL of each target token (in fp32, whatever the model dtype).

Assumes logits = lm_head(final hidden state), which holds for every family with an adapter
(no logit soft-capping or scaling).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pgprune.models.adapter import execution_device

DEFAULT_CHUNK_TOKENS = 4096


@torch.no_grad()
def token_nll(model, input_ids: torch.Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """NLL of tokens 1..T-1 given their prefixes: float32 tensor [B, T-1] on the head's device."""
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
    return nll_from_hidden(hidden, input_ids, head, chunk_tokens)


def nll_from_hidden(hidden: torch.Tensor, input_ids: torch.Tensor, head: torch.nn.Module,
                    chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Per-token NLL [B, T-1] from final hidden states [B, T, H] (already final-normed)."""
    device = execution_device(head)
    B, T, H = hidden.shape
    h = hidden[:, :-1].to(device).reshape(-1, H)
    labels = input_ids[:, 1:].to(device).reshape(-1)
    out = torch.empty(h.shape[0], dtype=torch.float32, device=device)
    for s in range(0, h.shape[0], chunk_tokens):
        logits = head(h[s:s + chunk_tokens]).float()
        out[s:s + chunk_tokens] = F.cross_entropy(logits, labels[s:s + chunk_tokens], reduction="none")
    return out.view(B, T - 1)
