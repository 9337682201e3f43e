"""A tiny model laid out as jina-clip-v1 is: its own code, reached through ``auto_map``.

As in jina-clip-v1, the image tower is EVA-style, called ``vision_model(x=...)``, returns the
embedding tensor (not a model output) and keeps its blocks in ``.blocks`` followed by ``norm`` and
``head``; the text tower is BERT-style (``transformer.encoder.layer``) called ``text_model(x=...)``
with the padding mask made from the ids; the projections are identities and
``get_image_features`` / ``get_text_features`` return tensors.
"""

import torch
from torch import nn
from transformers import PreTrainedModel

from .configuration_jina_like import JinaLikeConfig


class Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, h, padding=None):
        a = self.norm1(h)
        h = h + self.attn(a, a, a, key_padding_mask=padding, need_weights=False)[0]
        return h + self.mlp(self.norm2(h))


class EVAVisionTransformer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, c.width, c.patch_size, stride=c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, (c.image_size // c.patch_size) ** 2 + 1, c.width))
        self.blocks = nn.ModuleList([Block(c.width, c.heads) for _ in range(c.vision_depth)])
        self.norm = nn.LayerNorm(c.width)
        self.head = nn.Linear(c.width, c.projection_dim)

    def forward(self, x):
        h = self.patch_embed(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls_token.expand(len(h), -1, -1), h], 1) + self.pos_embed
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h[:, 0]))


class BertLikeEncoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layer = nn.ModuleList([Block(c.width, c.heads) for _ in range(c.text_depth)])


class BertLike(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embeddings = nn.Embedding(c.vocab_size, c.width)
        self.position = nn.Parameter(torch.zeros(1, c.max_positions, c.width))
        self.encoder = BertLikeEncoder(c)


class HFTextEncoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.pad_token_id = c.pad_token_id
        self.transformer = BertLike(c)
        self.proj = nn.Linear(c.width, c.projection_dim)

    def forward(self, x):
        padding = x == self.pad_token_id
        h = self.transformer.embeddings(x) + self.transformer.position[:, : x.shape[1]]
        for layer in self.transformer.encoder.layer:
            h = layer(h, padding)
        keep = (~padding).unsqueeze(-1).to(h.dtype)
        return self.proj((h * keep).sum(1) / keep.sum(1).clamp(min=1))


class JinaLikeModel(PreTrainedModel):
    config_class = JinaLikeConfig
    base_model_prefix = "jina_like"

    def __init__(self, config):
        super().__init__(config)
        self.vision_model = EVAVisionTransformer(config)
        self.text_model = HFTextEncoder(config)
        self.visual_projection = nn.Identity()
        self.text_projection = nn.Identity()
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, EVAVisionTransformer):
            nn.init.normal_(module.cls_token, std=0.02)
            nn.init.normal_(module.pos_embed, std=0.02)
        if isinstance(module, BertLike):
            nn.init.normal_(module.position, std=0.02)

    def get_text_features(self, input_ids, *_, **__):
        return self.text_projection(self.text_model(x=input_ids))

    def get_image_features(self, pixel_values, *_, **__):
        return self.visual_projection(self.vision_model(x=pixel_values))
