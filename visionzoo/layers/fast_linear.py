"""Linear layers for CPU inference: oneDNN's matmul with the bias and GELU in its epilogue.

On CPU, ``F.linear`` is ATen's ``addmm``: the output is first filled with the bias (a copy), then the
GEMM accumulates into it, and an activation is one more pass over the output. oneDNN's linear
(``torch.ops.mkldnn._linear_pointwise``, the op torch.compile's CPU backend emits for frozen linears)
adds the bias and applies GELU while the GEMM's tiles are still in cache. Measured one thread on a Zen 4
core (``tools/benchmark.py``): Swin-T's MLP ``[25088, 96] -> 384`` + GELU 59 -> 39 ms, its ``384 -> 96``
27 -> 20 ms; the GEMMs are 70% of a Swin-T forward.

It has no backward, so it runs only where nothing needs a gradient (``torch.no_grad`` /
``inference_mode`` or frozen weights and inputs), on float32 CPU tensors, outside tracing,
compilation and dispatch modes (FLOP counting); everywhere else :func:`linear` is ``F.linear``.
The results equal ``F.linear``'s up to float32 summation order (relative 1e-7).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import is_in_torch_dispatch_mode
from timm.layers import Mlp as _TimmMlp
from timm.layers.activations import GELU as _TimmGELU
from timm.layers.activations import GELUTanh as _TimmGELUTanh

__all__ = ["Mlp", "fused_linear_available", "linear", "split_linear"]


def fused_linear_available() -> bool:
    """oneDNN's fused linear exists in this torch build (x86 / ARM builds with mkldnn)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_AVAILABLE = fused_linear_available()


def _fast_path(x: torch.Tensor, layer: nn.Linear) -> bool:
    if not _AVAILABLE or torch.compiler.is_compiling() or torch.fx._symbolic_trace.is_fx_symbolic_tracing():
        return False
    if is_in_torch_dispatch_mode():  # e.g. FlopCounterMode, which counts aten::addmm, not oneDNN's op
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or layer.weight.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in layer.parameters())):
        return False
    return x.numel() > 0


def _gelu_algorithm(act: nn.Module) -> Optional[str]:
    """oneDNN's name of ``act``'s GELU (``'none'``: erf, ``'tanh'``), or None if it is not a GELU."""
    if isinstance(act, _TimmGELUTanh):
        return "tanh"
    if isinstance(act, _TimmGELU):
        return "none"
    if type(act) is nn.GELU:
        return act.approximate
    return None


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], gelu: Optional[str] = None):
    """``x @ weight.T + bias`` (then GELU with ``approximate=gelu``) on oneDNN, ``x`` of any rank."""
    shape = x.shape
    out = torch.ops.mkldnn._linear_pointwise(
        x.reshape(-1, shape[-1]), weight, bias, "gelu" if gelu is not None else "none", [],
        gelu if gelu is not None else "",
    )
    return out.view(*shape[:-1], out.shape[-1])


def linear(x: torch.Tensor, layer: nn.Linear, gelu: Optional[str] = None) -> torch.Tensor:
    """``layer(x)`` (then GELU with ``approximate=gelu`` when given), on oneDNN where it may run (module docstring)."""
    if _fast_path(x, layer):
        return _onednn(x, layer.weight, layer.bias, gelu)
    out = layer(x)
    return F.gelu(out, approximate=gelu) if gelu is not None else out


def split_linear(x: torch.Tensor, layer: nn.Linear, chunks: int) -> List[torch.Tensor]:
    """``layer(x).chunk(chunks, dim=-1)`` (e.g. q, k, v of a fused qkv projection). On oneDNN each chunk is
    its own GEMM on a slice of the weight, so each comes out contiguous: the attention kernels then read
    them without the copies that strided views of one output would cost (10-20% of Swin-T's qkv time)."""
    if not _fast_path(x, layer):
        return list(layer(x).chunk(chunks, dim=-1))
    biases = layer.bias.chunk(chunks) if layer.bias is not None else (None,) * chunks
    return [_onednn(x, weight, bias) for weight, bias in zip(layer.weight.chunk(chunks), biases)]


class Mlp(_TimmMlp):
    """timm's ``Mlp`` (same submodules and keys) whose inference on CPU runs ``fc1`` + GELU and ``fc2`` through
    :func:`linear`, when the activation is a GELU, there is no hidden norm and dropout is inactive."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gelu = _gelu_algorithm(self.act)
        dropping = self.training and (self.drop1.p > 0 or self.drop2.p > 0)
        if (gelu is None or dropping or not isinstance(self.norm, nn.Identity) or not isinstance(self.fc1, nn.Linear)
                or not _fast_path(x, self.fc1)):
            return super().forward(x)
        return linear(_onednn(x, self.fc1.weight, self.fc1.bias, gelu), self.fc2)
