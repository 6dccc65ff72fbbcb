"""The generator: a cascaded hyper-convolutional decoder from prompt embeddings to weight tokens.

Input: a batch of prompt embeddings ``[B, P, T, H]`` (P prompts, T tokens
each, H the encoder's width; per-token states, not pooled). The prompts are
the channels of a 2-D feature map over (token, feature). Each block of the
cascade mixes channels and neighbourhoods with a 3×3 convolution, then
resizes the two spatial axes with learned linear maps, so the map shrinks
along the token axis and grows along the feature axis while the channel
count moves from P to the number of weight tokens. The last block leaves a
``[B, tokens, 1, token_dim]`` map: one row per weight token of the grid
(``memories.lora.weights``). The final projection starts at zero, so an
untrained generator outputs the collection mean.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class HyperConvConfig:
    prompts: int  # P: prompt windows per batch (channels in)
    prompt_tokens: int  # T
    hidden: int  # H: encoder width
    tokens: int  # weight tokens out
    token_dim: int
    width: int = 64  # features after the input projection
    channels: tuple[int, ...] = (64, 128)  # channels of the intermediate blocks
    heights: tuple[int, ...] = (16, 4)  # token-axis sizes after each intermediate block
    widths: tuple[int, ...] = (64, 128)  # feature-axis sizes after each intermediate block
    dropout: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HyperConvConfig":
        d = dict(d)
        for k in ("channels", "heights", "widths"):
            d[k] = tuple(d[k])
        return cls(**d)


class HyperConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, h_in: int, h_out: int, w_in: int, w_out: int, dropout: float, last: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)
        self.along_h = nn.Linear(h_in, h_out)
        self.along_w = nn.Linear(w_in, w_out)
        self.last = last
        self.norm = nn.Identity() if last else nn.LayerNorm(w_out)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
        x = self.conv(x)
        if not self.last:
            x = nn.functional.gelu(x)
        x = self.along_h(x.transpose(-1, -2)).transpose(-1, -2)
        x = self.along_w(x)
        return x if self.last else self.drop(self.norm(x))


class HyperConvDecoder(nn.Module):
    def __init__(self, cfg: HyperConvConfig):
        super().__init__()
        self.cfg = cfg
        self.project = nn.Sequential(nn.LayerNorm(cfg.hidden), nn.Linear(cfg.hidden, cfg.width))
        chans = (cfg.prompts, *cfg.channels, cfg.tokens)
        heights = (cfg.prompt_tokens, *cfg.heights, 1)
        widths = (cfg.width, *cfg.widths, cfg.token_dim)
        n = len(chans) - 1
        self.blocks = nn.ModuleList(
            HyperConvBlock(chans[i], chans[i + 1], heights[i], heights[i + 1], widths[i], widths[i + 1], cfg.dropout, last=i == n - 1) for i in range(n)
        )
        last = self.blocks[-1].along_w
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, prompts: torch.Tensor) -> torch.Tensor:
        """[B, P, T, H] → standardised weight tokens [B, tokens, token_dim]."""
        x = self.project(prompts)
        for block in self.blocks:
            x = block(x)
        return x.squeeze(-2)
