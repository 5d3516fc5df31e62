"""nstm: the NSTM layer, its sub-modules and models (spec §5).

    from nstm import NSTMLayer
    layer = NSTMLayer(d_model=256, num_heads=4, num_states=64, top_k=8)
    y = layer(x)                      # x [B, T, 256] -> y [B, T, 256]
"""
from nstm_kernels import __version__

from .config import NSTMConfig
from .decode import StaticDecoder
from .generation import sample_next
from .layer import LayerOutput, NSTMLayer, NSTMLayerState
from .models import NSTMLM, LMOutput, NSTMBlock, NSTMClassifier, detach_state
from .modules import MLP, RMSNorm, ShortConv
from .router import TokenToStateRouter
from .s2s import StateToStateAttention
from .state_manager import PruneReport, StateManager

__all__ = [
    "__version__", "NSTMConfig", "NSTMLayer", "NSTMLayerState", "LayerOutput", "LMOutput", "detach_state",
    "NSTMBlock", "NSTMLM", "NSTMClassifier", "MLP", "RMSNorm",
    "ShortConv", "TokenToStateRouter", "StateToStateAttention", "StateManager", "PruneReport",
    "sample_next", "StaticDecoder",
]
