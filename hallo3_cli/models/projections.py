"""Audio and face projections of the Hallo3 main DiT (docs/model.md §4, §5.6)."""

from __future__ import annotations

import torch
from torch import nn


class AudioProjModel(nn.Module):
    """Windowed wav2vec features → per-latent-frame audio tokens.

    ``(B, frames, window, layers, channels)`` → MLP per frame → ``context_tokens × output_dim`` →
    temporal compression with ONE ``conv1`` applied repeatedly (49 → 25 → 13): while the length is
    odd, frame 0 is kept and frames 1.. are convolved pairwise (docs/model.md §8b.8) → LayerNorm.
    """

    def __init__(
        self,
        window: int = 5,
        layers: int = 12,
        channels: int = 768,
        intermediate_dim: int = 512,
        output_dim: int = 768,
        context_tokens: int = 32,
        temporal_steps: int = 2,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.context_tokens = context_tokens
        self.output_dim = output_dim
        self.temporal_steps = temporal_steps
        self.proj1 = nn.Linear(window * layers * channels, intermediate_dim)
        self.proj2 = nn.Linear(intermediate_dim, intermediate_dim)
        self.proj3 = nn.Linear(intermediate_dim, context_tokens * output_dim)
        width = context_tokens * output_dim
        self.conv1 = nn.Conv1d(width, width, kernel_size=2, stride=2)
        self.norm = nn.LayerNorm(output_dim, eps=norm_eps)

    def forward(self, audio_embeds: torch.Tensor) -> torch.Tensor:
        batch, frames = audio_embeds.shape[:2]
        x = audio_embeds.flatten(2)  # (B, F, window·layers·channels)
        x = torch.relu(self.proj1(x))
        x = torch.relu(self.proj2(x))
        x = self.proj3(x).transpose(1, 2)  # (B, tokens·dim, F), token-major channels
        for _ in range(self.temporal_steps):
            if x.shape[-1] % 2 == 1:
                rest = self.conv1(x[..., 1:]) if x.shape[-1] > 1 else x[..., 1:]
                x = torch.cat([x[..., :1], rest], dim=-1)
            else:
                x = self.conv1(x)
        x = x.transpose(1, 2).unflatten(-1, (self.context_tokens, self.output_dim))
        return self.norm(x)  # (B, latent_frames, tokens, dim)


class FaceProjModel(nn.Module):
    """Face embedding (512) → ``num_tokens`` identity tokens of width ``hidden_size``, LayerNorm'd."""

    def __init__(self, embed_dim: int = 512, hidden_size: int = 1024, num_tokens: int = 4, norm_eps: float = 1e-5):
        super().__init__()
        self.num_tokens = num_tokens
        self.hidden_size = hidden_size
        self.proj = nn.Linear(embed_dim, num_tokens * hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=norm_eps)

    def forward(self, face_embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(face_embeds).unflatten(-1, (self.num_tokens, self.hidden_size)))
