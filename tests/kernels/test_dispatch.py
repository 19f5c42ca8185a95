"""Backend names, aliases and refusals, and where the portable ("torch") path runs its attention."""
import pytest
import torch

from tests.kernels.test_na import _inputs
from visionzoo.kernels import (
    ALIASES,
    BACKENDS,
    block_sparse_attention,
    can_run,
    dispatch,
    make_params,
    na1d,
    na2d,
    portable,
    resolve_backend,
    use_backend,
)

CPU, META = torch.device("cpu"), torch.device("meta")


def test_public_names_and_aliases():
    assert BACKENDS == ("auto", "reference", "cpu", "torch", "triton")
    assert ALIASES == {"native": "cpu:window", "blocked": "cpu:blocks", "tiled": "torch:tiles"}
    blocks, window = ((14, 14), make_params(2, 7, 1, 2)), ((56, 56), make_params(2, 7))
    assert resolve_backend("tiled", META, *window) == "torch:tiles"
    assert resolve_backend("tiled", CPU, *blocks) == "torch:tiles"  # the old name ran tiles whatever the geometry
    assert resolve_backend("blocked", META, *blocks) == "torch:blocks"  # no C++ kernels for meta tensors
    with pytest.raises(ValueError, match="needs disjoint blocks"):
        resolve_backend("blocked", META, *window)
    with pytest.raises(ValueError, match="unknown attention backend 'cuda-magic'; choose one of auto, reference, cpu, "
                                         "torch, triton \\(old names: native = cpu:window, blocked = cpu:blocks, "
                                         "tiled = torch:tiles\\)"):
        resolve_backend("cuda-magic", CPU)


def test_torch_picks_blocks_for_disjoint_blocks_and_tiles_otherwise():
    assert resolve_backend("torch", CPU, (14, 14), make_params(2, 7, 1, 2)) == "torch:blocks"
    assert resolve_backend("torch", META, (56, 56), make_params(2, 7, 7)) == "torch:blocks"
    assert resolve_backend("torch", CPU, (56, 56), make_params(2, 7)) == "torch:tiles"
    assert resolve_backend("torch", CPU, block_sparse=True) == "torch:tiles"
    assert resolve_backend("cpu", CPU, block_sparse=True) == "torch:tiles"
    with pytest.raises(ValueError, match="needs disjoint blocks: .*spatial \\[56, 56\\]"):
        resolve_backend("torch:blocks", CPU, (56, 56), make_params(2, 7))


def test_auto_on_other_devices_is_torch():
    assert resolve_backend("auto", META, (56, 56), make_params(2, 7)) == "torch:tiles"
    assert can_run("torch", META) is None and can_run("reference", META) is None


def test_refusals_say_why(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert can_run("triton", CPU) == "triton: not installed (pip install visionzoo[triton])"
    with pytest.raises(RuntimeError, match="backend='triton' cannot run: triton: not installed"):
        resolve_backend("triton", CPU)
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert can_run("triton", CPU).startswith("triton on CPU tensors needs TRITON_INTERPRET=1")
    assert can_run("cpu", META) == "cpu: the C++ kernels run on CPU tensors, got a tensor on meta"
    with pytest.raises(RuntimeError, match="backend='native' cannot run: cpu: the C\\+\\+ kernels run on CPU tensors"):
        resolve_backend("native", META)


def test_auto_on_cuda_falls_back_to_torch_without_triton(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    cuda = torch.device("cuda")
    assert resolve_backend("auto", cuda, (56, 56), make_params(2, 7)) == "torch:tiles"
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    assert resolve_backend("auto", cuda, (56, 56), make_params(2, 7)) == "triton"


def test_thread_default_accepts_old_names():
    q = torch.randn(1, 9, 9, 1, 4, dtype=torch.float64)
    with use_backend("tiled"):
        out = na2d(q, q, q, 3)
    torch.testing.assert_close(out, na2d(q, q, q, 3, backend="reference"))


def _cpu_op_refuses(monkeypatch):
    """The CPU-only ATen kernels raise if anything calls them."""
    def refuse(*args, **kwargs):
        raise AssertionError("a CPU-only op was called")

    monkeypatch.setattr(portable, "_flash", refuse)
    monkeypatch.setattr(portable, "_flash_backward", refuse)


@pytest.mark.parametrize("with_rpb", [False, True])
def test_torch_path_on_meta_tensors_never_calls_the_cpu_op(with_rpb, monkeypatch):
    """Shapes come out right, forward and backward, through the custom op, without the CPU kernel."""
    _cpu_op_refuses(monkeypatch)
    q, k, v = (torch.randn(2, 9, 10, 2, 8, device="meta", requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 5, device="meta", requires_grad=True) if with_rpb else None
    out = na2d(q, k, v, 3, dilation=(2, 1), rpb=rpb, backend="torch")
    assert out.shape == q.shape and out.device.type == "meta"
    grads = torch.autograd.grad(out.sum(), [q, k, v] + ([rpb] if with_rpb else []))
    assert [g.shape for g in grads] == [q.shape] * 3 + ([rpb.shape] if with_rpb else [])
    mask = torch.tensor([[True, False], [True, True]], device="meta")
    q = torch.randn(1, 32, 2, 8, device="meta", requires_grad=True)
    out = block_sparse_attention(q, q, q, mask, 16, backend="torch")
    assert out.shape == q.shape
    assert torch.autograd.grad(out.sum(), q)[0].shape == q.shape


@pytest.mark.parametrize("spatial, kernel, dilation, causal",
                         [((9, 10), 3, (2, 1), (False, True)), ((13,), 4, 3, False)])
def test_torch_path_off_cpu_matches_the_reference(spatial, kernel, dilation, causal, monkeypatch):
    """The matmul route that other devices take (CUDA without triton, MPS), run on CPU tensors here
    with the CPU-only op refused: outputs and gradients equal the reference's, for neighborhood
    (with rpb) and block-sparse attention (with partial and empty blocks)."""
    _cpu_op_refuses(monkeypatch)
    monkeypatch.setattr(portable, "_fused_cpu", lambda tensor: False)
    q, k, v = _inputs(spatial, 2, 8, torch.float64, requires_grad=True)
    rpb = torch.randn(2, *(2 * kernel - 1 for _ in spatial), dtype=torch.float64, requires_grad=True)
    op = {1: na1d, 2: na2d}[len(spatial)]
    expected = op(q, k, v, kernel, dilation=dilation, is_causal=causal, rpb=rpb, backend="reference")
    out = op(q, k, v, kernel, dilation=dilation, is_causal=causal, rpb=rpb, backend="torch:tiles")
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, [q, k, v, rpb], grad),
                         torch.autograd.grad(expected, [q, k, v, rpb], grad)):
        torch.testing.assert_close(got, want)
    mask = torch.tensor([[True, False], [False, False], [True, True]])
    q, k, v = (torch.randn(2, 40, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    expected = block_sparse_attention(q, k, v, mask, (14, 20), backend="reference")
    out = block_sparse_attention(q, k, v, mask, (14, 20), backend="torch")
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, [q, k, v], grad), torch.autograd.grad(expected, [q, k, v], grad)):
        torch.testing.assert_close(got, want)
