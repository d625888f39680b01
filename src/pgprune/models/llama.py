"""The LLaMA family: Llama 1/2/3 (GQA), Vicuna (Llama weights), Mistral, Qwen2, Qwen3.

They share the module layout `model.layers[i].self_attn.{q,k,v,o}_proj` and
`model.layers[i].mlp.{gate,up,down}_proj`. Differences that matter for pruning:
- Qwen2 has biases on q/k/v (sliced per head by surgery, counted in head cost);
- Qwen3 has q_norm / k_norm over head_dim, shared by all heads (unaffected by head pruning);
- Mistral / Qwen may use sliding-window attention (a per-layer setting, unaffected by pruning).
"""

from __future__ import annotations

from torch import nn

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
