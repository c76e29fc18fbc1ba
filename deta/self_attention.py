"""Multi-head self-attention of the decoder's queries, with nn.MultiheadAttention's parameter names."""
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class QuerySelfAttention(nn.Module):
    """Self-attention where queries and keys carry the position embedding and the values do not.

    The parameters are nn.MultiheadAttention's (`in_proj_weight`, `in_proj_bias`, `out_proj`), so official
    checkpoints load unchanged; unlike it, the output projection runs through its module's forward, so hooks,
    LoRA and quantisation reach it.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query_key: Tensor, value: Tensor) -> Tensor:
        """(B, Q, C) queries-and-keys input and (B, Q, C) value input → (B, Q, C)."""
        batch, queries, channels = value.shape
        weight_qk, weight_v = self.in_proj_weight.split((2 * channels, channels))
        bias_qk, bias_v = self.in_proj_bias.split((2 * channels, channels))
        q, k = F.linear(query_key, weight_qk, bias_qk).chunk(2, -1)
        v = F.linear(value, weight_v, bias_v)
        q, k, v = (x.view(batch, queries, self.n_heads, -1).transpose(1, 2) for x in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(attended.transpose(1, 2).reshape(batch, queries, channels))
