"""The one tester every neighborhood-attention implementation runs through: its output and
gradients against the reference's."""
import torch

from visionzoo.kernels import neighborhood_attention


def check_against_reference(backend, query, key, value, kernel_size, stride=1, dilation=1, is_causal=False,
                            scale=None, rpb=None, tolerance=1e-4, grad_tolerance=None, shift=0):
    """Run ``backend`` and ``"reference"`` on the same leaves (``rpb`` optional): outputs within
    ``tolerance``, the gradients of ``query``, ``key``, ``value`` (and ``rpb``) from one random output
    gradient within ``grad_tolerance`` (default ``tolerance``)."""
    inputs = [query, key, value] + ([rpb] if rpb is not None else [])
    args = (query, key, value, kernel_size, stride, dilation, is_causal, scale, rpb)
    expected = neighborhood_attention(*args, backend="reference", shift=shift)
    out = neighborhood_attention(*args, backend=backend, shift=shift)
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)
    grad = torch.randn_like(out)
    grad_tolerance = tolerance if grad_tolerance is None else grad_tolerance
    for name, got, want in zip(["dq", "dk", "dv", "drpb"], torch.autograd.grad(out, inputs, grad),
                               torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(got, want, rtol=grad_tolerance, atol=grad_tolerance,
                                   msg=lambda message, n=name: f"{n}: {message}")
