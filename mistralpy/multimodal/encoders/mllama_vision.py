"""Mllama's vision tower (transformers' MllamaVisionModel), parameter names as its checkpoints.

One image is ``max_num_tiles`` tiles (real ones, then zero tiles up to the maximum, as transformers
pads). Each tile: patch embedding, a gated pre-tile embedding chosen by the image's aspect-ratio id,
a class row, gated position + tile-position embeddings, LayerNorm; rows are padded to a multiple of 8
and the *local* transformer runs over all tiles' rows together, then LayerNorm, a gated post-tile
embedding and the *global* (gated) transformer. The output row is the global state concatenated
with the local states after ``intermediate_layers_indices`` (interleaved per channel, as
transformers' stack(dim=-1)), for each tile's class + patch rows.

Attention mask (transformers' _prepare_aspect_ratio_attention_mask): a pair of rows is masked only
when *both* are padding (padded rows or tiles past the image's); real rows see every row.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mistralpy.layers.linear import Linear, MergedLinear
from mistralpy.multimodal.encoders.clip import VISION_ACTS


class MllamaPrecomputedAspectRatioEmbedding(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.max_num_tiles, self.hidden = cfg["max_num_tiles"], cfg["hidden_size"]
        self.embedding = nn.Embedding(len(cfg["supported_aspect_ratios"]) + 1, self.max_num_tiles * self.hidden)
        self.gate = nn.Parameter(torch.empty(1))

    def forward(self, x: torch.Tensor, aspect_ratio_id: torch.Tensor) -> torch.Tensor:
        """x [tiles, rows, hidden] + this aspect ratio's per-tile row."""
        emb = self.embedding(aspect_ratio_id).view(self.max_num_tiles, 1, self.hidden)
        return x + emb * self.gate.tanh()


class MllamaPrecomputedPositionEmbedding(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.max_num_tiles, self.hidden = cfg["max_num_tiles"], cfg["hidden_size"]
        self.num_patches = (cfg["image_size"] // cfg["patch_size"]) ** 2 + 1
        self.gate = nn.Parameter(torch.empty(1))
        self.embedding = nn.Parameter(torch.empty(self.num_patches, self.hidden))
        self.tile_embedding = nn.Embedding(len(cfg["supported_aspect_ratios"]) + 1,
                                           self.max_num_tiles * self.num_patches * self.hidden)

    def forward(self, x: torch.Tensor, aspect_ratio_id: torch.Tensor) -> torch.Tensor:
        gate = self.gate.tanh()
        x = x + (1 - gate) * self.embedding
        tile = self.tile_embedding(aspect_ratio_id).view(self.max_num_tiles, self.num_patches, self.hidden)
        return x + gate * tile


class MllamaVisionAttention(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        hidden = cfg["hidden_size"]
        self.num_heads = cfg["attention_heads"]
        self.head_dim = hidden // self.num_heads
        # checkpoint q_proj / k_proj / v_proj, fused at load (the model's stacked_params)
        self.qkv_proj = MergedLinear(hidden, [hidden, hidden, hidden], bias=False)
        self.o_proj = Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [n, hidden], mask [n, n] bool (True: may attend)."""
        n = x.shape[0]
        q, k, v = (t.view(n, self.num_heads, self.head_dim).transpose(0, 1)
                   for t in self.qkv_proj.split(self.qkv_proj(x)))
        out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask)[0]
        return self.o_proj(out.transpose(0, 1).reshape(n, -1))


class MllamaVisionMLP(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.act = VISION_ACTS[cfg.get("hidden_act", "gelu")]
        self.fc1 = Linear(cfg["hidden_size"], cfg["intermediate_size"], bias=True)
        self.fc2 = Linear(cfg["intermediate_size"], cfg["hidden_size"], bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MllamaVisionEncoderLayer(nn.Module):
    def __init__(self, cfg: dict[str, Any], is_gated: bool) -> None:
        super().__init__()
        eps = cfg.get("norm_eps", 1e-5)
        self.is_gated = is_gated
        self.self_attn = MllamaVisionAttention(cfg)
        self.mlp = MllamaVisionMLP(cfg)
        self.input_layernorm = nn.LayerNorm(cfg["hidden_size"], eps=eps)
        self.post_attention_layernorm = nn.LayerNorm(cfg["hidden_size"], eps=eps)
        if is_gated:
            self.gate_attn = nn.Parameter(torch.empty(1))
            self.gate_ffn = nn.Parameter(torch.empty(1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), mask)
        x = x + (self.gate_attn.tanh() * h if self.is_gated else h)
        h = self.mlp(self.post_attention_layernorm(x))
        return x + (self.gate_ffn.tanh() * h if self.is_gated else h)


class MllamaVisionEncoder(nn.Module):
    def __init__(self, cfg: dict[str, Any], num_layers: int, is_gated: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MllamaVisionEncoderLayer(cfg, is_gated) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, keep: frozenset[int] = frozenset()
                ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """(the last state, {i: the state after layer i} for i in ``keep``)."""
        kept = {}
        for i, layer in enumerate(self.layers):
            x = layer(x, mask)
            if i in keep:
                kept[i] = x
        return x, kept


def vision_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """transformers' MllamaVisionConfig defaults under the checkpoint's keys."""
    defaults = {"hidden_size": 1280, "hidden_act": "gelu", "num_hidden_layers": 32, "num_global_layers": 8,
                "attention_heads": 16, "num_channels": 3, "intermediate_size": 5120, "vision_output_dim": 7680,
                "image_size": 448, "patch_size": 14, "norm_eps": 1e-5, "max_num_tiles": 4,
                "intermediate_layers_indices": [3, 7, 15, 23, 30],
                "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]}
    out = {**defaults, **{k: v for k, v in cfg.items() if v is not None}}
    if "num_attention_heads" in cfg and "attention_heads" not in cfg:
        out["attention_heads"] = cfg["num_attention_heads"]
    return out


class MllamaVisionModel(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        hidden, patch = cfg["hidden_size"], cfg["patch_size"]
        self.max_num_tiles, self.hidden = cfg["max_num_tiles"], hidden
        self.num_patches = (cfg["image_size"] // patch) ** 2 + 1
        n = cfg["num_hidden_layers"]
        self.intermediate = [i % n for i in cfg["intermediate_layers_indices"]]   # negatives as Python indexes
        self.patch_embedding = nn.Conv2d(cfg.get("num_channels", 3), hidden, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(hidden))
        self.gated_positional_embedding = MllamaPrecomputedPositionEmbedding(cfg)
        self.pre_tile_positional_embedding = MllamaPrecomputedAspectRatioEmbedding(cfg)
        self.post_tile_positional_embedding = MllamaPrecomputedAspectRatioEmbedding(cfg)
        self.layernorm_pre = nn.LayerNorm(hidden)
        self.layernorm_post = nn.LayerNorm(hidden)
        self.transformer = MllamaVisionEncoder(cfg, cfg["num_hidden_layers"], is_gated=False)
        self.global_transformer = MllamaVisionEncoder(cfg, cfg["num_global_layers"], is_gated=True)

    def forward(self, pixel_values: torch.Tensor, aspect_ratio_id: int) -> torch.Tensor:
        """Real tiles [n, 3, tile, tile] -> [max_num_tiles, rows, vision_output_dim] (rows: class + patches)."""
        w = self.patch_embedding.weight
        n, tiles, rows, dim = pixel_values.shape[0], self.max_num_tiles, self.num_patches, self.hidden
        if n > tiles:
            raise ValueError(f"Mllama: {n} tiles for a tower of at most {tiles}")
        px = torch.zeros((tiles, *pixel_values.shape[1:]), dtype=w.dtype, device=w.device)
        px[:n] = pixel_values.to(w.device, w.dtype)
        ar = torch.tensor(aspect_ratio_id, device=w.device)
        x = self.patch_embedding(px).flatten(2).transpose(1, 2)                     # [tiles, patches, dim]
        x = self.pre_tile_positional_embedding(x, ar)
        x = torch.cat([self.class_embedding.expand(tiles, 1, dim), x], dim=1)      # [tiles, rows, dim]
        x = self.layernorm_pre(self.gated_positional_embedding(x, ar))
        padded = rows + (8 - rows % 8) % 8
        x = F.pad(x, (0, 0, 0, padded - rows))
        real = torch.zeros(tiles, padded, dtype=torch.bool, device=w.device)
        real[:n, :rows] = True
        real = real.view(-1)
        mask = real[:, None] | real[None, :]
        x, kept = self.transformer(x.view(tiles * padded, dim), mask, frozenset(self.intermediate))
        x = self.post_tile_positional_embedding(self.layernorm_post(x).view(tiles, padded, dim), ar)
        x, _ = self.global_transformer(x.view(tiles * padded, dim), mask)
        inter = torch.stack([kept[i] for i in self.intermediate], dim=-1).view(tiles, padded, -1)
        return torch.cat([x.view(tiles, padded, dim), inter], dim=-1)[:, :rows]
