"""omnimoe: the OmniMoE Mixture-of-Experts layer for PyTorch.

    layer = omnimoe.OmniMoE(hidden_size=1024, intermediate_size=4096, num_experts=(256, 256), top_k=16)
    y = layer(x)  # x [..., 1024]

The math runs in the omnimoe C++/CUDA library, called through the torch ops
torch.ops.omnimoe.layer_forward / layer_backward (custom ops with fake kernels and autograd:
they work under torch.compile(fullgraph=True)).

The paper's baseline layers, omnimoe.Dense, GShard, DeepSeekMoE, PKM and PEER (and their
functional form omnimoe.baseline_layer), run the library's baselines through
torch.ops.omnimoe.baseline_forward. They are trainable: the library has only their forward,
and their backward (torch.ops.omnimoe.baseline_backward) is PyTorch autograd of a
recomputation of the layer on the routing the library chose (see omnimoe.baselines).
"""

import torch  # noqa: F401  (loads libtorch, which the extension links)

from . import _C
from ._ops import accumulation_dtype
from .baselines import BASELINE_KINDS, DeepSeekMoE, Dense, GShard, PEER, PKM, baseline_layer
from .functional import ACTIVATIONS, GATES, ROUTER_NORMS, SCHEDULES, Routing, omnimoe_layer
from .modules import OmniMoE

__version__ = "0.1.0"

#: True when this build has the CUDA backend (it still needs a GPU at run time).
cuda_built: bool = _C.cuda_built


def cuda_available() -> bool:
    """True when this build has the CUDA backend and a CUDA device is present."""
    return bool(_C.cuda_available())


__all__ = [
    "OmniMoE", "omnimoe_layer", "Routing", "accumulation_dtype", "cuda_built", "cuda_available",
    "ROUTER_NORMS", "GATES", "ACTIVATIONS", "SCHEDULES",
    "Dense", "GShard", "DeepSeekMoE", "PKM", "PEER", "baseline_layer", "BASELINE_KINDS",
]
