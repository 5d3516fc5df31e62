"""nstm: the NSTM layer, its sub-modules and models (spec §5).

    from nstm import NSTMLayer
    layer = NSTMLayer(d_model=256, num_heads=4, num_states=64, top_k=8)
    y = layer(x)                      # x [B, T, 256] -> y [B, T, 256]
"""
from .decode import StaticDecoder
from .layer import NSTMLayer, NSTMLayerState
from .models import MLP, NSTMBlock, NSTMClassifier, NSTMLM, sample_next
from .modules import RMSNorm, ShortConv
from .router import TokenToStateRouter
from .s2s import StateToStateAttention
from .state_manager import PruneReport, StateManager

__all__ = [
    "NSTMLayer", "NSTMLayerState", "NSTMBlock", "NSTMLM", "NSTMClassifier", "MLP", "RMSNorm",
    "ShortConv", "TokenToStateRouter", "StateToStateAttention", "StateManager", "PruneReport",
    "sample_next", "StaticDecoder",
]
