"""The C++ CPU kernels built for every instruction set this machine executes (AVX-512 where present,
AVX2, scalar: each built explicitly, whatever the machine's best), against the reference; NaN and inf
propagation; the build (cache, lock, failure, ISA choice); an aarch64 NEON cross build, run under
qemu-user when it is installed."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from visionzoo.kernels import build, make_params, na1d, na2d, na3d, native
from visionzoo.kernels.indexing import neighborhood_mask, relative_index
from visionzoo.kernels.reference import neighborhood_attention_reference

pytestmark = pytest.mark.skipif(build.compiler() is None, reason="no C++ compiler (set CXX or VISIONZOO_CXX)")

ISAS = build.executable_isas()


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("VISIONZOO_NATIVE_ISA", request.param)
    monkeypatch.setattr(build, "_selected", None)  # chosen again from the variable
    native._tile_shape.cache_clear()
    yield request.param
    native._tile_shape.cache_clear()


def _inputs(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=dtype).requires_grad_() for _ in range(3)]


OPS = {1: na1d, 2: na2d, 3: na3d}
# (shape, kernel, stride, dilation, causal, rpb): odd sizes, dilation, stride, causal, 1D/2D/3D
CASES = [
    ((2, 13, 2, 32), 5, 1, 2, True, True),
    ((1, 11, 9, 2, 24), (3, 4), 1, (3, 2), (False, True), True),
    ((1, 11, 9, 2, 32), (3, 4), (1, 2), (3, 2), (False, True), False),
    ((1, 9, 10, 2, 32), 7, 1, 1, False, False),
    ((1, 5, 7, 6, 2, 16), (3, 5, 3), (1, 2, 1), (1, 1, 2), (False, False, True), False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{len(c[0]) - 3}d")
def test_window_kernel_against_reference(isa, case, dtype):
    shape, kernel, stride, dilation, causal, with_rpb = case
    dims = len(shape) - 3
    params = make_params(dims, kernel, stride, dilation, causal)
    q, k, v = _inputs(shape, dtype)
    rpb = (torch.randn(shape[-2], *(2 * x - 1 for x in params.kernel_size), dtype=dtype).requires_grad_()
           if with_rpb else None)
    expected = neighborhood_attention_reference(q, k, v, params, 0.3, rpb)
    out = OPS[dims](q, k, v, kernel, stride, dilation, causal, scale=0.3, rpb=rpb, backend="native")
    assert native.isa() == isa
    tolerance = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)
    inputs = [q, k, v] + ([rpb] if with_rpb else [])
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(got, want, rtol=tolerance * 10, atol=tolerance * 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, kernel, dilation", [((2, 12, 14, 3, 32), (3, 7), 1), ((1, 12, 12, 2, 24), 3, 2),
                                                     ((1, 4, 6, 6, 2, 16), (2, 3, 3), 1)])
def test_block_kernel_against_reference(isa, shape, kernel, dilation, dtype):
    """Windows that are disjoint blocks (stride = kernel), forward and backward, with and without the
    saved probabilities (a window of at most twice the head dim keeps them)."""
    dims = len(shape) - 3
    q, k, v = _inputs(shape, dtype)
    params = make_params(dims, kernel, kernel, dilation, False)
    expected = neighborhood_attention_reference(q, k, v, params, 0.3)
    out = OPS[dims](q, k, v, kernel, kernel, dilation, False, scale=0.3, backend="blocked")
    tolerance = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, [q, k, v], grad), torch.autograd.grad(expected, [q, k, v], grad)):
        torch.testing.assert_close(got, want, rtol=tolerance * 10, atol=tolerance * 10)


def window_exact(q, k, v, params, scale, rpb=None):
    """Neighborhood attention through per-query gathers of the window's keys: the reference's forward,
    with gradients that touch only attended pairs. (The dense reference's backward multiplies the
    zero gradient of every unattended pair as well, so one NaN key reaches every query's gradient of
    its head through 0 * NaN.)"""
    batch, *spatial, heads, head_dim = q.shape
    tokens = q[0, ..., 0, 0].numel()
    mask = neighborhood_mask(spatial, params)
    width = int(mask.sum(1).max())
    order = torch.sort(mask.to(torch.int8), dim=1, descending=True, stable=True)
    index = torch.where(order.values[:, :width].bool(), order.indices[:, :width], tokens)  # pad: a zero row
    valid = index < tokens

    def rows(x):
        x = torch.cat([x.reshape(batch, tokens, heads, head_dim), x.new_zeros(batch, 1, heads, head_dim)], 1)
        return x[:, index]  # [B, N, W, H, D]

    logits = torch.einsum("bnhd,bnwhd->bnhw", q.reshape(batch, tokens, heads, head_dim), rows(k)) * scale
    if rpb is not None:
        bias = rpb.reshape(heads, -1)[:, torch.gather(relative_index(spatial, params), 1, index.clamp(max=tokens - 1))]
        logits = logits + bias.permute(1, 0, 2)
    logits = logits.masked_fill(~valid[None, :, None, :], float("-inf"))
    attn = torch.softmax(logits, dim=-1)
    return torch.einsum("bnhw,bnwhd->bnhd", attn, rows(v)).reshape(q.shape)


@pytest.mark.parametrize("backend, stride", [("native", 1), ("blocked", 3)])
@pytest.mark.parametrize("bad", ["nan q", "nan k", "inf k", "-inf q", "nan scale"])
def test_nan_and_inf_propagate_where_the_reference_has_them(isa, backend, stride, bad):
    """A NaN or inf in q or k (or a NaN scale) gives NaN outputs exactly where the reference does, and
    NaN gradients exactly where the window-exact gather does (the same forward)."""
    q, k, v = _inputs((2, 12, 12, 2, 16), torch.float32)
    scale = 0.25
    with torch.no_grad():
        if bad == "nan q":
            q[1, 5, 4, 0, 3] = float("nan")
        elif bad == "nan k":
            k[0, 6, 5, 1, 2] = float("nan")
        elif bad == "inf k":
            k[0, 6, 5, 1, 2] = float("inf")
        elif bad == "-inf q":
            q[1, 0, 11, 1, 7] = float("-inf")
        else:
            scale = float("nan")
    params = make_params(2, 3, stride, 1, False)
    expected = neighborhood_attention_reference(q, k, v, params, scale)
    exact = window_exact(q, k, v, params, scale)
    out = na2d(q, k, v, 3, stride, scale=scale, backend=backend)
    assert expected.isnan().any()
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(exact.isnan(), expected.isnan())
    grad = torch.randn_like(out)
    for name, got, want in zip("qkv", torch.autograd.grad(out, [q, k, v], grad),
                               torch.autograd.grad(exact, [q, k, v], grad)):
        assert torch.equal(got.isnan(), want.isnan()), f"d{name}: {int(got.isnan().sum())} NaN, expected {int(want.isnan().sum())}"
        finite = ~want.isnan()
        torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# the build
# ----------------------------------------------------------------------------------------------
def test_library_is_built_once_and_cached():
    native.library()
    built = sorted(native.cache_dir().glob("na_cpu_*.so"))
    assert built, "no cached library"
    assert native.library() is native.library()
    assert sorted(native.cache_dir().glob("na_cpu_*.so")) == built


def test_a_fresh_build_in_a_new_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONZOO_CACHE_DIR", str(tmp_path))
    path = build._build(build.compiler(), "scalar")
    assert path.parent == tmp_path / "native" and path.exists()
    lib = build._bind(path)
    assert lib.vz_abi_version() == build.ABI_VERSION and lib.vz_isa() == b"scalar"
    assert build._build(build.compiler(), "scalar") == path  # cached: same file, not rebuilt
    # no temporary files left: the library and its lock file
    assert sorted(p.name for p in (tmp_path / "native").iterdir()) == sorted([path.name, path.with_suffix(".lock").name])


def test_concurrent_processes_share_one_build(tmp_path):
    """Two processes that need the same library at once: one compiles (one notice), the other waits
    for its lock and loads the result."""
    script = "from visionzoo.kernels import build; print(build.library('scalar').vz_isa())"
    env = dict(os.environ, VISIONZOO_CACHE_DIR=str(tmp_path))
    jobs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    results = [job.communicate() for job in jobs]
    assert [out.strip() for out, _ in results] == ["b'scalar'"] * 2
    notices = [err for _, err in results if "compiling the CPU attention kernels for scalar" in err]
    assert len(notices) == 1, [err for _, err in results]
    assert len(list((tmp_path / "native").glob("*.so"))) == 1


def test_build_failure_is_reported(tmp_path, monkeypatch):
    for name in build.SOURCES:
        (tmp_path / name).write_text("this is not C++\n")
    (tmp_path / "abi.h").write_text("")
    monkeypatch.setattr(build, "CSRC", tmp_path)
    monkeypatch.setenv("VISIONZOO_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="failed"):
        build._build(build.compiler(), "scalar")


def test_isa_choice(monkeypatch):
    monkeypatch.setenv("VISIONZOO_NATIVE_ISA", "sse9")
    with pytest.raises(ValueError, match="VISIONZOO_NATIVE_ISA"):
        build.selected_isa()
    monkeypatch.setenv("VISIONZOO_NATIVE_ISA", "neon" if build.machine_isa() != "neon" else "avx2")
    with pytest.raises(ValueError, match="executes only"):
        build.selected_isa()
    monkeypatch.delenv("VISIONZOO_NATIVE_ISA")
    assert build.selected_isa() == build.machine_isa() == ISAS[0]


# ----------------------------------------------------------------------------------------------
# aarch64 NEON, cross-compiled
# ----------------------------------------------------------------------------------------------
CROSS = "aarch64-linux-gnu-g++"

# Runs the window kernel forward and backward on the arrays in argv[1] (flat binary files named there)
# and writes out, lse, dq, dk, dv beside them
DRIVER = textwrap.dedent(r"""
    #include <cstdint>
    #include <cstdio>
    #include <string>
    #include <vector>
    extern "C" {
    void vz_na_forward_f32(const float*, const float*, const float*, const float*, float*, float*, float*,
                           const int64_t*, const int64_t*, const int64_t*, double, int);
    void vz_na_backward_f32(const float*, const float*, const float*, const float*, const float*, const float*,
                            const float*, float*, float*, float*, float*, const int64_t*, const int64_t*,
                            const int64_t*, double, int);
    }
    template <typename T> std::vector<T> read(const std::string& path) {
      FILE* f = std::fopen(path.c_str(), "rb");
      std::fseek(f, 0, SEEK_END);
      std::vector<T> x(std::ftell(f) / sizeof(T));
      std::fseek(f, 0, SEEK_SET);
      if (std::fread(x.data(), sizeof(T), x.size(), f) != x.size()) std::perror("read");
      std::fclose(f);
      return x;
    }
    void write(const std::string& path, const std::vector<float>& x) {
      FILE* f = std::fopen(path.c_str(), "wb");
      std::fwrite(x.data(), sizeof(float), x.size(), f);
      std::fclose(f);
    }
    int main(int, char** argv) {
      const std::string dir = argv[1];
      auto q = read<float>(dir + "/q"), k = read<float>(dir + "/k"), v = read<float>(dir + "/v");
      auto dout = read<float>(dir + "/dout");
      auto geom = read<int64_t>(dir + "/geom"), tables = read<int64_t>(dir + "/tables"), tile = read<int64_t>(dir + "/tile");
      std::vector<float> out(q.size()), lse(q.size() / geom[5]), dq(q.size()), dk(q.size()), dv(q.size());
      vz_na_forward_f32(q.data(), k.data(), v.data(), nullptr, out.data(), lse.data(), nullptr, geom.data(),
                        tables.data(), tile.data(), 0.3, 2);
      vz_na_backward_f32(q.data(), k.data(), v.data(), dout.data(), lse.data(), nullptr, nullptr, dq.data(), dk.data(),
                         dv.data(), nullptr, geom.data(), tables.data(), tile.data(), 0.3, 2);
      write(dir + "/out", out), write(dir + "/dq", dq), write(dir + "/dk", dk), write(dir + "/dv", dv);
    }
""")


@pytest.mark.skipif(shutil.which(CROSS) is None, reason=f"no aarch64 cross compiler ({CROSS}: apt-get install g++-aarch64-linux-gnu)")
def test_neon_cross_build(tmp_path):
    """The NEON build compiles for aarch64; under qemu-aarch64 (when installed) the window kernel
    matches the reference, forward and backward."""
    library = tmp_path / "na_cpu_neon.so"
    build.compile_library(CROSS, "neon", library, tune_native=False)
    assert library.stat().st_size > 0
    qemu = shutil.which("qemu-aarch64")
    if qemu is None:
        pytest.skip("built; qemu-aarch64 absent (apt-get install qemu-user), so not run")
    (tmp_path / "driver.cpp").write_text(DRIVER)
    driver = tmp_path / "driver"
    subprocess.run([CROSS, "-O1", str(tmp_path / "driver.cpp"), str(library), "-o", str(driver),
                    f"-Wl,-rpath,{tmp_path}"], check=True, capture_output=True)
    params = make_params(2, (5, 3), 1, (1, 2), (False, True))
    q, k, v = _inputs((1, 9, 11, 2, 16), torch.float32)
    dout = torch.randn_like(q)
    geom, tables = native._geometry(q, params, None)
    tile = native._tile_shape((9, 11), params, 4)  # 16-byte vectors: 4 float lanes
    for name, x in dict(q=q, k=k, v=v, dout=dout, geom=geom, tables=tables, tile=tile).items():
        x.detach().numpy().tofile(tmp_path / name)
    subprocess.run([qemu, "-L", "/usr/aarch64-linux-gnu", str(driver), str(tmp_path)], check=True, timeout=300)
    expected = neighborhood_attention_reference(q, k, v, params, 0.3)
    grads = torch.autograd.grad(expected, [q, k, v], dout)
    for name, want in zip(("out", "dq", "dk", "dv"), (expected, *grads)):
        got = torch.from_numpy(__import__("numpy").fromfile(tmp_path / name, dtype="float32")).reshape(q.shape)
        torch.testing.assert_close(got, want.detach(), rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 37, 5, 7), (2, 64, 4, 4)])  # a period of several rows; whole vectors
def test_batch_norm_act_kernel_against_aten(isa, shape, dtype):
    from visionzoo.kernels import batch_norm_act

    generator = torch.Generator().manual_seed(0)
    x, residual = (torch.randn(shape, generator=generator, dtype=dtype).contiguous(memory_format=torch.channels_last)
                   for _ in range(2))
    weight, bias = (torch.randn(shape[1], generator=generator, dtype=dtype) for _ in range(2))
    leaves = [t.requires_grad_() for t in (x, weight, bias, residual)]
    out = batch_norm_act(x, weight, bias, 1e-5, "relu", residual=residual)[0]
    assert native.isa() == isa
    pre = torch.nn.functional.batch_norm(x, None, None, weight, bias, True, 0.0, 1e-5) + residual
    tolerance = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out, pre.relu(), rtol=tolerance, atol=tolerance)
    grad = torch.randn(shape, generator=generator, dtype=dtype)
    expected = pre * (out > 0)  # the same ReLU mask (values within rounding of 0 may fall either side)
    for got, want in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(expected, leaves, grad)):
        torch.testing.assert_close(got, want, rtol=tolerance * 10, atol=tolerance * 10)
