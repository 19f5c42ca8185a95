"""The native C++ CPU kernel: vector head dims, threading, build cache, and how "cpu" dispatches."""
import pytest
import torch

from visionzoo.kernels import block_sparse_attention, make_params, na2d, na3d, native, resolve_backend
from visionzoo.kernels.reference import neighborhood_attention_reference

CPU = torch.device("cpu")


def _inputs(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=dtype).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("head_dim", [16, 24, 32, 64, 128])
def test_head_dims_against_reference(head_dim, dtype):
    """Head dims that fill whole vectors take the vectorized code, others the scalar loops; both with
    an odd size, non-dividing dilation, a causal axis and rpb, forward and backward."""
    q, k, v = _inputs((2, 11, 9, 2, head_dim), dtype)
    rpb = torch.randn(2, 5, 7, dtype=dtype, requires_grad=True)
    params = make_params(2, (3, 4), 1, (3, 2), (False, True))
    expected = neighborhood_attention_reference(q, k, v, params, head_dim ** -0.5, rpb)
    out = na2d(q, k, v, (3, 4), dilation=(3, 2), is_causal=(False, True), rpb=rpb, backend="native")
    tolerance = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, [q, k, v, rpb], grad),
                         torch.autograd.grad(expected, [q, k, v, rpb], grad)):
        torch.testing.assert_close(got, want, rtol=tolerance * 10, atol=tolerance * 10)


def test_more_keys_than_one_vector_and_3d_stride():
    """A 3D window of 75 keys (several vector groups of scores, a partial last one) with stride."""
    q, k, v = _inputs((1, 6, 9, 10, 2, 32), torch.float32)
    params = make_params(3, (3, 5, 5), (1, 2, 3), 1, False)
    expected = neighborhood_attention_reference(q, k, v, params, 0.2)
    out = na3d(q, k, v, (3, 5, 5), stride=(1, 2, 3), scale=0.2, backend="native")
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, [q, k, v], grad), torch.autograd.grad(expected, [q, k, v], grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend, batch, spatial", [("native", 3, (15, 17)), ("blocked", 1, (14, 14)),
                                                    ("blocked", 8, (14, 14))])
def test_results_do_not_depend_on_the_thread_count(backend, batch, spatial):
    """Both native kernels: the window kernel splits work by (batch, head); the block kernel sums the
    rpb gradient in fixed chunks of tasks whose heads per task do not depend on the thread count
    (batch 1: one head per task; batch 8: all three). Any thread count gives the same bits."""
    q, k, v = _inputs((batch, *spatial, 3, 32), torch.float32)
    rpb = torch.randn(3, 13, 13, requires_grad=True)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            out = na2d(q, k, v, 7, dilation=2, rpb=rpb, backend=backend)
            results.append([out, *torch.autograd.grad(out.square().sum(), [q, k, v, rpb])])
    finally:
        torch.set_num_threads(threads)
    for one, three in zip(*results):
        assert torch.equal(one, three)


def test_library_is_built_once_and_cached():
    native.library()
    built = sorted(native.cache_dir().glob("na_cpu_*.so"))
    assert built, "no cached library"
    assert native.library() is native.library()
    assert sorted(native.cache_dir().glob("na_cpu_*.so")) == built


def test_a_fresh_build_in_a_new_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONZOO_CACHE_DIR", str(tmp_path))
    compiler = native._compiler()
    path = native._build(compiler)
    assert path.parent == tmp_path / "native" and path.exists()
    assert native._bind(path).vz_abi_version() == native.ABI_VERSION
    assert native._build(compiler) == path  # cached: same file, not rebuilt
    assert [p.name for p in (tmp_path / "native").iterdir()] == [path.name]  # no temporary files left


def test_build_failure_is_reported(tmp_path, monkeypatch):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setenv("VISIONZOO_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "SOURCE", broken)
    with pytest.raises(RuntimeError, match="failed"):
        native._build(native._compiler())


def test_disabled_native_kernel_falls_back_to_tiled(monkeypatch):
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_reason", None)
    monkeypatch.setenv("VISIONZOO_NATIVE", "0")
    assert not native.available()
    assert "VISIONZOO_NATIVE=0" in native.unavailable_reason()
    assert resolve_backend("cpu", CPU) == "tiled"
    with pytest.raises(RuntimeError, match="VISIONZOO_NATIVE=0"):
        resolve_backend("native", CPU)


def test_cpu_dispatch():
    assert resolve_backend("cpu", CPU) == "native"
    assert resolve_backend("auto", CPU) == "native"
    assert resolve_backend("tiled", CPU) == "tiled"
    assert resolve_backend("cpu", torch.device("meta")) == "tiled"


@pytest.mark.parametrize("backend", ["cpu", "native", "blocked"])
def test_block_sparse_on_cpu_backends_runs_tiled(backend):
    """No native or blocked block-sparse kernel: those names run it tiled."""
    q = torch.randn(1, 32, 2, 8, dtype=torch.float64)
    mask = torch.tensor([[True, False], [True, True]])
    torch.testing.assert_close(
        block_sparse_attention(q, q, q, mask, 16, backend=backend),
        block_sparse_attention(q, q, q, mask, 16, backend="reference"),
    )


def test_native_refuses_other_devices():
    with pytest.raises(RuntimeError, match="CPU tensors"):
        resolve_backend("native", torch.device("meta"))
