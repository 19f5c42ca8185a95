"""Halo attention against its plain definition (written here, loop over blocks), forward and backward,
and against timm's ``HaloAttn`` given the same weights."""
import pytest
import torch
import torch.nn.functional as F
from timm.layers.halo_attn import HaloAttn

from visionzoo.layers import HaloAttention, halo_attention


def reference_halo_attention(query, key, value, block, halo, rel_height, rel_width, scale, scale_pos_embed=False):
    """The definition: each ``block / s`` query block attends the ``(block + 2 halo)^2`` window around its
    ``block`` key block on the zero-padded map; logit = scale q.k + q.rel_h[ky - qy + win - 1] +
    q.rel_w[kx - qx + win - 1] (times scale too with ``scale_pos_embed``). ``[B, H, W, heads, d]``."""
    batch, height, width, heads, _ = key.shape
    stride = height // query.shape[1]
    block_q = block // stride
    window = block + 2 * halo
    padded_k = F.pad(key, (0, 0, 0, 0, halo, halo, halo, halo))
    padded_v = F.pad(value, (0, 0, 0, 0, halo, halo, halo, halo))
    rows = []
    for by in range(height // block):
        cols = []
        for bx in range(width // block):
            k = padded_k[:, by * block: by * block + window, bx * block: bx * block + window]  # [B, win, win, heads, d]
            v = padded_v[:, by * block: by * block + window, bx * block: bx * block + window]
            q = query[:, by * block_q: (by + 1) * block_q, bx * block_q: (bx + 1) * block_q]  # [B, bq, bq, heads, d]
            logits = torch.einsum("byxhd,bijhd->bhyxij", q, k) * scale
            qy = torch.arange(block_q)[:, None]
            ky = torch.arange(window)[None, :]
            rel = (ky - qy + window - 1)  # [bq, win]
            rel_h = torch.einsum("byxhd,yid->bhyxi", q, rel_height[rel])
            rel_w = torch.einsum("byxhd,xjd->bhyxj", q, rel_width[rel])
            relative = rel_h[..., :, None] + rel_w[..., None, :]
            logits = logits + (relative * scale if scale_pos_embed else relative)
            probs = logits.flatten(-2).softmax(-1).view_as(logits)
            cols.append(torch.einsum("bhyxij,bijhe->byxhe", probs, v))
        rows.append(torch.cat(cols, dim=2))
    return torch.cat(rows, dim=1)


def _inputs(batch, height, width, heads, dim, block, halo, stride=1, dim_v=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    window = block + 2 * halo
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return (
        make(batch, height // stride, width // stride, heads, dim),
        make(batch, height, width, heads, dim),
        make(batch, height, width, heads, dim_v or dim),
        make(2 * window - 1, dim) * 0.5,
        make(2 * window - 1, dim) * 0.5,
    )


# (B, H, W, heads, d, block, halo, stride, dv, scale_pos_embed): odd blocks and maps, non-square,
# halo 0, halo larger than the block, strided queries, wider values, scaled relative terms
CASES = [
    (2, 16, 24, 2, 8, 8, 3, 1, None, False),
    (1, 15, 9, 3, 4, 3, 2, 1, None, False),
    (2, 8, 12, 2, 6, 4, 0, 1, None, True),
    (1, 6, 6, 1, 5, 2, 3, 1, None, False),
    (2, 16, 8, 2, 8, 8, 2, 2, None, False),
    (1, 12, 12, 2, 4, 6, 1, 2, 10, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_forward_and_backward_match_definition(case):
    batch, height, width, heads, dim, block, halo, stride, dim_v, scaled = case
    query, key, value, rel_height, rel_width = _inputs(batch, height, width, heads, dim, block, halo, stride, dim_v)
    leaves = (query, key, value, rel_height, rel_width)
    scale = dim ** -0.5
    out = halo_attention(query, key, value, block, halo, rel_height, rel_width, scale_pos_embed=scaled)
    expected = reference_halo_attention(query, key, value, block, halo, rel_height, rel_width, scale, scaled)
    assert out.shape == (batch, height // stride, width // stride, heads, dim_v or dim)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, leaves, grad)
    expected_grads = torch.autograd.grad(expected, leaves, grad)
    for name, got, want in zip(("query", "key", "value", "rel_height", "rel_width"), grads, expected_grads):
        # the tables' gradients are float32 sums over every query and key: absolute error grows with them
        atol = 1e-4 if name.startswith("rel_") else 1e-5
        torch.testing.assert_close(got, want, rtol=1e-4, atol=atol, msg=lambda m: f"{name}: {m}")
    with torch.no_grad():  # the inference path (mask straight into the fused kernel)
        torch.testing.assert_close(
            halo_attention(query, key, value, block, halo, rel_height, rel_width, scale_pos_embed=scaled), out
        )


@pytest.mark.parametrize("stride", [1, 2])
def test_gradcheck_float64(stride):
    inputs = _inputs(1, 4, 6, 2, 3, 2, 1, stride, dtype=torch.float64, seed=stride)
    inputs = tuple(t.detach().requires_grad_() for t in inputs)
    fn = lambda q, k, v, h, w: halo_attention(q, k, v, 2, 1, h, w)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        (dict(block_size=8, halo_size=3), (1, 16, 16, 24)),
        (dict(block_size=8, halo_size=2, stride=2, num_heads=4), (1, 32, 16, 16)),
        (dict(block_size=6, halo_size=2, dim_out=48, qk_ratio=0.5, qkv_bias=True), (1, 16, 12, 18)),
        (dict(block_size=7, halo_size=2, stride=2), (1, 16, 14, 14)),  # odd block: average-pooled output
        (dict(block_size=4, halo_size=1, scale_pos_embed=True, num_heads=2), (2, 8, 8, 12)),
    ],
)
def test_module_equals_timm(kwargs, shape):
    torch.manual_seed(0)
    theirs = HaloAttn(shape[1], **kwargs)
    ours = HaloAttention(shape[1], **kwargs)
    ours.load_state_dict(theirs.state_dict())  # timm's parameter names
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(shape).contiguous(memory_format=memory_format).requires_grad_()
        expected, out = theirs(x), ours(x)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        grad = torch.randn_like(out)
        want = torch.autograd.grad(expected, [x, *theirs.parameters()], grad)
        got = torch.autograd.grad(out, [x, *ours.parameters()], grad)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_map_not_divisible_by_block_is_refused():
    layer = HaloAttention(16, block_size=8, halo_size=2, num_heads=2)
    with pytest.raises(ValueError, match=r"12x16 map must be a multiple of block_size 8"):
        layer(torch.randn(1, 16, 12, 16))
    query, key, value, rel_height, rel_width = _inputs(1, 8, 12, 1, 4, 4, 1)
    with pytest.raises(ValueError, match=r"8x12 map must be a multiple of block_size 8"):
        halo_attention(query, key, value, 8, 1, rel_height, rel_width)
    with pytest.raises(ValueError, match=r"rel_height and rel_width must be \[15, 4\]"):
        halo_attention(query, key, value, 4, 2, rel_height, rel_width)
    with pytest.raises(ValueError, match=r"query .* stride that divides block_size"):
        halo_attention(query[:, :3], key, value, 4, 1, rel_height, rel_width)
    with pytest.raises(ValueError, match=r"stride must be 1 or 2"):
        HaloAttention(16, stride=4)


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        (dict(block_size=4, halo_size=1, num_heads=2), (2, 16, 9, 14)),
        (dict(block_size=8, halo_size=3, num_heads=2), (1, 16, 5, 3)),  # a map smaller than one block
        (dict(block_size=4, halo_size=2, stride=2, num_heads=2), (1, 16, 11, 6)),  # strided queries
        (dict(block_size=5, halo_size=1, stride=2), (1, 16, 7, 12)),  # odd block: average-pooled output
    ],
)
def test_pad_to_block_is_timm_on_the_zero_padded_map_cropped(kwargs, shape):
    """The dense layout: timm's HaloAttn on the map zero padded at the bottom / right to whole blocks,
    cropped to ``ceil(side / stride)`` (what a stride-2 convolution beside it gives)."""
    torch.manual_seed(0)
    theirs = HaloAttn(shape[1], **kwargs)
    ours = HaloAttention(shape[1], pad_to_block=True, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(shape, requires_grad=True)
    block, stride = kwargs["block_size"], kwargs.get("stride", 1)
    height, width = shape[2:]
    expected = theirs(F.pad(x, (0, -width % block, 0, -height % block)))
    expected = expected[..., : -(-height // stride), : -(-width // stride)]
    out = ours(x)
    assert out.shape[2:] == (-(-height // stride), -(-width // stride))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, [x, *ours.parameters()], grad),
                    torch.autograd.grad(expected, [x, *theirs.parameters()], grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # a map of whole blocks is not padded: the layer is timm's
    whole = torch.randn(1, shape[1], 2 * block, 2 * block)
    torch.testing.assert_close(ours(whole), theirs(whole), rtol=1e-5, atol=1e-5)
