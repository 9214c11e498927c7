"""Vision towers: CLIP ViT and SigLIP, encoding every image (or anyres tile) of a batch in one forward.

Module names follow transformers' ``CLIPVisionTransformer`` / ``SiglipVisionTransformer`` so checkpoints map
one to one. Only the layers up to ``vision_feature_layer`` run: LLaVA reads the hidden state of layer -2 and
the last layer's output is never used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastllava.attention import varlen_attention
from fastllava.config import VisionConfig

_ACTS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": lambda x: F.gelu(x),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.siglip = cfg.is_siglip
        # CLIP: conv without bias + a class token; SigLIP: conv with bias, no class token
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, bias=self.siglip
        )
        if not self.siglip:
            self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.position_embedding = nn.Embedding(cfg.num_patches + (0 if self.siglip else 1), cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)  # (N, P, C)
        if not self.siglip:
            cls = self.class_embedding.expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)  # (N, P+1, C)
        return x + self.position_embedding.weight


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.backend = "auto"

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        T = x.shape[0]  # all tiles packed: (N * L, C)
        q = self.q_proj(x).view(T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(T, self.n_heads, self.head_dim)
        v = self.v_proj(x).view(T, self.n_heads, self.head_dim)
        out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=False, backend=self.backend)
        return self.out_proj(out.reshape(T, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.act = _ACTS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, cu_seqlens, max_seqlen):
        x = x + self.self_attn(self.layer_norm1(x), cu_seqlens, max_seqlen)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))


class VisionTower(nn.Module):
    """CLIP or SigLIP vision transformer returning the hidden states LLaVA selects."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        if not cfg.is_siglip:
            self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: transformers' name
        self.encoder = VisionEncoder(cfg)
        # unused by LLaVA (it reads a hidden state before it); kept so checkpoints round-trip losslessly
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.gradient_checkpointing = False

    def set_attn_implementation(self, name: str) -> None:
        for layer in self.encoder.layers:
            layer.self_attn.backend = name

    def forward(self, pixel_values: torch.Tensor, feature_layer: int | list[int]) -> torch.Tensor:
        """``pixel_values [N, 3, H, W]`` -> selected hidden states ``[N, L, C]`` (concatenated over layers
        when ``feature_layer`` is a list). Hidden state 0 is the embedding output, as in transformers."""
        x = self.embeddings(pixel_values)  # (N, L, C)
        if not self.cfg.is_siglip:
            x = self.pre_layrnorm(x)
        N, L, C = x.shape
        wanted = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
        n_states = self.cfg.num_hidden_layers + 1
        wanted = [i % n_states for i in wanted]
        # every image is its own sequence of L tokens: bidirectional attention within it
        cu = torch.arange(0, (N + 1) * L, L, device=x.device, dtype=torch.int32)
        states = {0: x} if 0 in wanted else {}
        h = x.reshape(N * L, C)
        for i, layer in enumerate(self.encoder.layers[: max(wanted)], start=1):
            if self.gradient_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(layer, h, cu, L, use_reentrant=False)
            else:
                h = layer(h, cu, L)
            if i in wanted:
                states[i] = h.view(N, L, C)
        return torch.cat([states[i] for i in wanted], dim=-1)
