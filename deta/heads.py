"""Class and box prediction heads, one per decoder layer plus one for the encoder proposals."""
import copy
import itertools
import math

from torch import Tensor, nn


class MLP(nn.Module):
    """Linear layers with ReLU between them."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in itertools.pairwise(dims))
        self.activation = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
        return self.layers[-1](x)


def build_heads(hidden_dim: int, num_classes: int, num_heads: int, shared: bool) -> tuple[nn.ModuleList, nn.ModuleList]:
    """`num_heads` class heads (Linear) and box heads (3-layer MLP), separate or one shared module.

    Class biases start at a 1% prior probability (focal-loss practice) and box heads at zero, so
    the first predicted boxes are exactly the reference boxes.
    """
    class_head = nn.Linear(hidden_dim, num_classes)
    nn.init.constant_(class_head.bias, -math.log((1 - 0.01) / 0.01))
    box_head = MLP(hidden_dim, hidden_dim, 4, 3)
    nn.init.zeros_(box_head.layers[-1].weight)
    nn.init.zeros_(box_head.layers[-1].bias)
    if shared:
        return nn.ModuleList([class_head] * num_heads), nn.ModuleList([box_head] * num_heads)
    return (nn.ModuleList(copy.deepcopy(class_head) for _ in range(num_heads)),
            nn.ModuleList(copy.deepcopy(box_head) for _ in range(num_heads)))
