"""Block-sparse attention: reference vs brute force, CPU path vs reference, checks."""
import pytest
import torch

from visionzoo.kernels import block_sparse_attention

# (batch, num_q, num_k, heads, head_dim, block_size, per_head)
CASES = [
    (2, 32, 32, 2, 8, 8, False),
    (1, 37, 29, 3, 8, (8, 5), True),  # partial last blocks, per-head layout
    (2, 10, 13, 2, 4, (4, 4), True),
    (1, 16, 40, 1, 16, (16, 8), False),  # one query block
]


def _case_inputs(case, dtype, seed=0):
    batch, num_q, num_k, heads, head_dim, block_size, per_head = case
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, num_q, heads, head_dim, generator=generator, dtype=dtype)
    k = torch.randn(batch, num_k, heads, head_dim, generator=generator, dtype=dtype)
    v = torch.randn(batch, num_k, heads, head_dim, generator=generator, dtype=dtype)
    q_block, kv_block = (block_size, block_size) if isinstance(block_size, int) else block_size
    layout = (heads,) if per_head else ()
    mask = torch.rand(*layout, -(-num_q // q_block), -(-num_k // kv_block), generator=generator) < 0.5
    mask[..., 0, :] = False  # an empty query block: zero output
    mask[..., -1, -1] = True
    return q, k, v, mask, block_size


def _brute_force(q, k, v, mask, block_size):
    q_block, kv_block = (block_size, block_size) if isinstance(block_size, int) else block_size
    out = torch.zeros_like(q, dtype=torch.float64)
    batch, num_q, heads, head_dim = q.shape
    for b in range(batch):
        for h in range(heads):
            layout = mask[h] if mask.dim() == 3 else mask
            for i in range(num_q):
                keys = [j for j in range(k.shape[1]) if layout[i // q_block, j // kv_block]]
                if not keys:
                    continue
                logits = torch.stack([q[b, i, h].double() @ k[b, j, h].double() for j in keys]) * head_dim ** -0.5
                weights = torch.softmax(logits, 0)
                out[b, i, h] = sum(w * v[b, j, h].double() for w, j in zip(weights, keys))
    return out


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_brute_force(case):
    q, k, v, mask, block_size = _case_inputs(case, torch.float64)
    out = block_sparse_attention(q, k, v, mask, block_size, backend="reference")
    torch.testing.assert_close(out, _brute_force(q, k, v, mask, block_size))


@pytest.mark.parametrize("case", CASES)
def test_cpu_matches_reference(case):
    q, k, v, mask, block_size = _case_inputs(case, torch.float32)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    expected = block_sparse_attention(*inputs, mask, block_size, backend="reference")
    out = block_sparse_attention(*inputs, mask, block_size, backend="tiled")
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_empty_rows_give_zero_output_and_gradient():
    q, k, v, mask, block_size = _case_inputs(CASES[0], torch.float32)
    q.requires_grad_()
    out = block_sparse_attention(q, k, v, mask, block_size, backend="tiled")
    assert torch.all(out[:, :8] == 0)
    out.sum().backward()
    assert torch.all(q.grad[:, :8] == 0)


def test_all_empty_mask():
    q, k, v, mask, block_size = _case_inputs(CASES[0], torch.float32)
    out = block_sparse_attention(q, k, v, torch.zeros_like(mask), block_size, backend="tiled")
    assert torch.all(out == 0)


@pytest.mark.parametrize("case", [(1, 11, 9, 2, 4, (4, 3), True), (1, 8, 8, 1, 4, 4, False)])
def test_cpu_gradcheck_fp64(case):
    q, k, v, mask, block_size = _case_inputs(case, torch.float64)
    inputs = [t[:1].clone().requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(
        lambda *args: block_sparse_attention(*args, mask, block_size, backend="tiled"), inputs, eps=1e-6, atol=1e-6
    )


def test_dense_mask_equals_sdpa():
    q, k, v, _, _ = _case_inputs(CASES[0], torch.float32)
    out = block_sparse_attention(q, k, v, torch.ones(4, 4, dtype=torch.bool), 8, backend="tiled")
    expected = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "mask_shape, block_size, message",
    [
        ((3, 4), 8, "block_mask must have shape"),
        ((2, 4, 4, 1), 8, "block_mask must have shape"),
        ((4, 4), 0, "block sizes must be >= 1"),
        ((4, 4), (8, 8, 8), "block_size must be an int or"),
    ],
)
def test_bad_input_raises_clear_error(mask_shape, block_size, message):
    q = torch.randn(1, 32, 2, 8)
    with pytest.raises(ValueError, match=message):
        block_sparse_attention(q, q, q, torch.ones(mask_shape, dtype=torch.bool), block_size)


def test_float_mask_is_refused():
    q = torch.randn(1, 32, 2, 8)
    with pytest.raises(ValueError, match="bool tensor"):
        block_sparse_attention(q, q, q, torch.ones(4, 4), 8)
