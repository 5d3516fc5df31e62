"""Small building blocks shared by the NSTM layer, the NSTM models and the Transformer baseline."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from nstm_kernels import cpu as cpu_kernel


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim, computed in fp32, returned in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's fused rms_norm where it exists (about 17 % less time in training on the CPU)
        if hasattr(F, "rms_norm"):
            return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class ShortConv(nn.Module):
    """Causal depthwise convolution over time, then SiLU (as in Mamba and GLA).

    ``forward(x [B, T, C], cache [B, W-1, C] or None)`` -> ``(y [B, T, C], new cache)``. The cache
    holds the last ``W - 1`` inputs, so that decoding token by token equals one full pass.

    On fp32 / fp64 CPU tensors a multi-token call, packed (``cu_seqlens``) or not, runs the taps
    and the SiLU in one C++ pass (``nstm_kernels.cpu.short_conv``; its backward is one pass too)
    where the C++ kernel builds;
    ``fused = False`` (or ``NSTM_CPU_KERNEL=0``) runs the PyTorch form: the same sums.
    """

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.width = width
        self.fused = True         # the C++ pass on CPU tensors where it can run (False: PyTorch ops)
        self.weight = nn.Parameter(torch.empty(channels, 1, width))
        self.bias = nn.Parameter(torch.zeros(channels))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    def forward(self, x: torch.Tensor, cache: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        if cu_seqlens is not None:
            return self._forward_packed(x, cache, cu_seqlens)
        B, T, C = x.shape
        W1 = self.width - 1
        if T > 1 and self.fused and cpu_kernel.conv_usable(x):
            # the C++ pass: the taps and the SiLU in one loop over the tokens, forward and backward
            # (the multiply-adds below allocate a [B, T, C] tensor per tap, and more in the backward)
            y = cpu_kernel.short_conv(x, cache, self.weight[:, 0].t(), self.bias)
            if T >= W1:
                tail = x[:, T - W1:]
            else:
                tail = torch.cat([x.new_zeros(B, W1, C) if cache is None else cache.to(x.dtype), x],
                                 dim=1)[:, T:]
            return y, tail
        if cache is None:
            cache = x.new_zeros(B, W1, C)
        xc = torch.cat([cache.to(x.dtype), x], dim=1)                      # [B, W-1+T, C]
        if T == 1:
            # One token (decoding): a weighted sum over the window. conv1d's set-up cost was
            # most of this call on the CPU, for W * C multiply-adds.
            y = torch.einsum("bwc,cw->bc", xc, self.weight[:, 0].to(x.dtype)) + self.bias.to(x.dtype)
            y = y.unsqueeze(1)
        else:
            # W shifted multiply-adds: the same sums as conv1d(groups=C), at half its cost on the
            # CPU for these widths (its depthwise backward was ~9 ms per layer at T = 1K, B = 4)
            w = self.weight[:, 0].t().to(x.dtype)                            # [W, C]
            y = torch.addcmul(self.bias.to(x.dtype), xc[:, :T], w[0])
            for j in range(1, self.width):
                y = torch.addcmul(y, xc[:, j:j + T], w[j])
        return F.silu(y), xc[:, xc.shape[1] - (self.width - 1):]

    def _forward_packed(self, x: torch.Tensor, cache: Optional[torch.Tensor],
                        cu_seqlens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """A packed batch ``x [1, T, C]`` of N documents (``cu_seqlens [N + 1]``, already checked):
        each document's window starts from its own cache (``cache [N, W-1, C]``, zeros if None),
        never from the tokens of the document before it. Returns ``(y [1, T, C], caches [N, W-1, C])``.

        The documents are laid out with their W - 1 cache rows in front of each (``E``), and the
        convolution reads each token's window from there: one gather, no loop over documents."""
        _, T, C = x.shape
        W1, N = self.width - 1, cu_seqlens.numel() - 1
        dev = x.device
        cu = cu_seqlens.to(dev)
        if self.fused and cpu_kernel.conv_usable(x):
            # the C++ pass, document by document (its windows never cross a document either)
            y = cpu_kernel.short_conv(x, cache, self.weight[:, 0].t(), self.bias, cu_seqlens=cu)
            return y, _packed_tails(x, cache, cu, W1)
        lens = cu[1:] - cu[:-1]
        doc = torch.repeat_interleave(torch.arange(N, device=dev), lens, output_size=T)       # [T]
        at = torch.arange(T, device=dev) + (doc + 1) * W1                   # token t's row in E
        E = x.new_zeros(T + N * W1, C)
        if cache is not None and W1 > 0:
            rows = (cu[:-1] + torch.arange(N, device=dev) * W1)[:, None] + torch.arange(W1, device=dev)
            E = E.index_copy(0, rows.reshape(-1), cache.to(x.dtype).reshape(N * W1, C))
        E = E.index_copy(0, at, x[0])
        win = at[None, :] - W1 + torch.arange(self.width, device=dev)[:, None]              # [W, T]
        w = self.weight[:, 0].t().to(x.dtype)                                                # [W, C]
        y = torch.addcmul(self.bias.to(x.dtype), E[win[0]], w[0])
        for j in range(1, self.width):
            y = torch.addcmul(y, E[win[j]], w[j])
        ends = cu[1:] + (torch.arange(N, device=dev) + 1) * W1                 # one past each doc's last row
        last = ends[:, None] - W1 + torch.arange(W1, device=dev)[None, :]                   # [N, W-1]
        return F.silu(y).unsqueeze(0), E[last]


def _packed_tails(x: torch.Tensor, cache: Optional[torch.Tensor], cu: torch.Tensor, W1: int) -> torch.Tensor:
    """Each packed document's last ``W1`` conv inputs, ``[N, W1, C]``: its own tokens, preceded by
    the rows of its cache (zeros if None) where the document is shorter than ``W1``."""
    N, C = cu.numel() - 1, x.shape[-1]
    if W1 == 0:
        return x.new_zeros(N, 0, C)
    p = cu[1:, None] - W1 + torch.arange(W1, device=x.device)            # [N, W1] token index in x
    start = cu[:-1, None]
    mine = x[0, p.clamp(min=0)]                                          # [N, W1, C]
    inside = (p >= start)[..., None]
    if cache is None:
        return torch.where(inside, mine, torch.zeros((), dtype=x.dtype, device=x.device))
    back = (W1 + p - start).clamp(0, W1 - 1)                            # the cache row, outside
    theirs = cache.to(x.dtype).gather(1, back[..., None].expand(N, W1, C))
    return torch.where(inside, mine, theirs)


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(a) * b)`` with ``a, b = up(x)``; hidden ``int(D * ratio * 2/3)``."""

    def __init__(self, d_model: int, ratio: float = 4.0):
        super().__init__()
        hidden = int(d_model * ratio * 2 / 3)
        self.up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        a, b = self.up(x).chunk(2, dim=-1)
        return self.down(F.silu(a) * b)


def _desc(x) -> str:
    return f"{getattr(x, 'dtype', type(x).__name__)} {list(getattr(x, 'shape', []))}"


def check_classifier_inputs(x, input_dim: Optional[int]) -> None:
    """A classifier's input: floats ``[B, T, input_dim]`` (``input_dim`` given) or int64 token ids
    ``[B, T]`` (``input_dim`` None)."""
    if input_dim is not None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 3 \
                or x.shape[-1] != input_dim:
            raise ValueError(f"x must be a float tensor [B, T, input_dim={input_dim}], got {_desc(x)}")
    elif not isinstance(x, torch.Tensor) or x.dtype != torch.int64 or x.dim() != 2:
        raise ValueError(f"x must be int64 token ids [B, T], got {_desc(x)}")
    if x.shape[1] < 1:
        raise ValueError(f"x must hold at least one position (T >= 1), got {_desc(x)}")


def pool_hidden(h: torch.Tensor, pool: str, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean or last-position pooling of ``h [B, T, D]``; with ``lengths [B]`` only the first
    ``lengths[b]`` positions of sequence ``b`` count (right padding is ignored)."""
    if lengths is None:
        return h.mean(1) if pool == "mean" else h[:, -1]
    B, T, _ = h.shape
    if not isinstance(lengths, torch.Tensor) or lengths.dtype not in (torch.int64, torch.int32) \
            or tuple(lengths.shape) != (B,):
        raise ValueError(f"lengths must be an int tensor of shape [B={B}], got {_desc(lengths)}")
    lengths = lengths.to(h.device)
    if lengths.min() < 1 or lengths.max() > T:
        raise ValueError(f"lengths must be in [1, T={T}], got range "
                         f"[{int(lengths.min())}, {int(lengths.max())}]")
    if pool == "last":
        return h[torch.arange(B, device=h.device), lengths.long() - 1]
    mask = torch.arange(T, device=h.device)[None, :] < lengths[:, None]
    return (h * mask[..., None].to(h.dtype)).sum(1) / lengths[:, None].to(h.dtype)
