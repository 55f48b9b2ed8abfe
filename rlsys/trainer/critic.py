"""PPO critic: a transformer backbone with a scalar value head, V(s_t) for every position.

The value of response token t is read at the position that *predicts* it (t - 1), the same
convention as the policy's logprobs, so V_t, logp_t and the token's reward line up.
"""

from __future__ import annotations

import torch
from torch import nn


class Critic(nn.Module):
    def __init__(
        self, model_path: str, dtype: torch.dtype = torch.float32, packed_attention: bool = True
    ) -> None:
        super().__init__()
        from transformers import AutoModel

        from rlsys.trainer.attention import use_packed_attention

        self.backbone = AutoModel.from_pretrained(model_path, dtype=dtype)
        if packed_attention:  # trainer.packed_attention
            use_packed_attention(self.backbone)
        self.backbone.config.use_cache = False
        self.backbone.train()
        hidden = self.backbone.config.hidden_size
        self.head = nn.Linear(hidden, 1, dtype=dtype)
        nn.init.normal_(self.head.weight, std=1.0 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Values [B, L] at response positions (0 elsewhere); masks as in `token_logprobs`."""
        from rlsys.trainer.attention import varlen_kwargs

        if position_ids is None:
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        h = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **varlen_kwargs(cu_seqlens),
        ).last_hidden_state
        v = self.head(h).squeeze(-1).float()  # [B, L]: value of the state after token l
        out = torch.zeros_like(v)
        out[:, 1:] = v[:, :-1]
        return out * response_mask
