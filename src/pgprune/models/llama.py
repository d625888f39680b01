"""The LLaMA family: Llama 1/2/3 (GQA), Vicuna (Llama weights), Mistral, Qwen2, Qwen3.

They share the module layout `model.layers[i].self_attn.{q,k,v,o}_proj` and
`model.layers[i].mlp.{gate,up,down}_proj`. Differences that matter for pruning:
- Qwen2 has biases on q/k/v (sliced per head by surgery, counted in head cost);
- Qwen3 has q_norm / k_norm over head_dim, shared by all heads (unaffected by head pruning);
- Mistral / Qwen may use sliding-window attention (a per-layer setting, unaffected by pruning).
"""

from __future__ import annotations

from torch import nn

from pgprune.errors import UnsupportedModelError
from pgprune.models.adapter import LayerModules, ModelAdapter, register_adapter


@register_adapter("llama", "mistral", "qwen2", "qwen3")
class LlamaFamilyAdapter(ModelAdapter):
    def _backbone(self) -> nn.Module:
        return self.model.model

    def decoder_layers(self) -> nn.ModuleList:
        return self._backbone().layers

    def embed_tokens(self) -> nn.Module:
        return self._backbone().embed_tokens

    def final_norm(self) -> nn.Module:
        return self._backbone().norm

    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def layer(self, i: int) -> LayerModules:
        layer = self.decoder_layers()[i]
        attn = getattr(layer, "self_attn", None)
        mlp = getattr(layer, "mlp", None)
        return LayerModules(
            layer=layer,
            attn=attn,
            mlp=mlp,
            q_proj=getattr(attn, "q_proj", None),
            k_proj=getattr(attn, "k_proj", None),
            v_proj=getattr(attn, "v_proj", None),
            o_proj=getattr(attn, "o_proj", None),
            gate_proj=getattr(mlp, "gate_proj", None),
            up_proj=getattr(mlp, "up_proj", None),
            down_proj=getattr(mlp, "down_proj", None),
            input_norm=layer.input_layernorm,
            post_attention_norm=layer.post_attention_layernorm,
        )

    def gguf_unsupported(self) -> str | None:
        # llama.cpp's `deci` graph is Llama's: RMSNorm, SiLU-gated MLP, full causal attention with
        # rotary embeddings (plain theta) and optional q/k/v/o and MLP biases. Mistral / Qwen2 add
        # sliding windows, Qwen3 q/k norms: not written (yet).
        cfg = self.config
        if cfg.model_type != "llama":
            return (f"pgprune writes GGUF (llama.cpp's deci architecture) for model_type 'llama' only; this model "
                    f"is {cfg.model_type!r}")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            return f"hidden_act={cfg.hidden_act!r}; llama.cpp's deci graph computes SiLU-gated MLPs only"
        rope = getattr(cfg, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
        if rope_type != "default":
            return (f"rope_type={rope_type!r}; the GGUF writer handles plain rotary embeddings (rope_type "
                    "'default') only")
        return None

    def gguf_hparams(self) -> dict:
        reason = self.gguf_unsupported()
        if reason is not None:
            raise UnsupportedModelError(f"cannot write this model as GGUF: {reason}")
        cfg = self.config
        rope = getattr(cfg, "rope_parameters", None) or {}
        theta = rope.get("rope_theta") if isinstance(rope, dict) else None
        return {"context_length": int(cfg.max_position_embeddings), "rms_norm_eps": float(cfg.rms_norm_eps),
                "rope_theta": float(theta if theta is not None else getattr(cfg, "rope_theta", 10000.0))}
