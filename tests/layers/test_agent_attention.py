"""Agent attention against a reference written from the paper's formulas with a materialised softmax."""
import math

import pytest
import torch
import torch.nn.functional as F

from visionzoo.layers import AgentAttention, resize_agent_biases


def _randomize(module, seed=0):
    # biases well away from zero, so that a bias in the wrong place or orientation shows
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.5)
    return module


def _linear_resize(table, size):
    """``table [..., L]`` resized to ``[..., size]`` by 1D linear interpolation (align_corners=False)."""
    lead = table.shape[:-1]
    return F.interpolate(table.reshape(1, -1, table.shape[-1]), size=size, mode="linear").reshape(*lead, size)


def reference_agent_attention(params, x, heads, cls_token=None, agent_shape=None):
    """V_A = softmax(A K^T s + B1) V, O = softmax(Q A^T s + B2) V_A + dwc(V), then proj; written out.

    ``params``: the official parameter names (``q.weight``, ``kv.weight`` or ``qkv.weight``, ``an_bias``, ...).
    ``agent_shape``: agents pooled to this grid, the biases of the trained square grid resized to it
    as the official dense backbones do (bilinear over the ``[heads, tokens, side, side]`` grid).
    Returns ``(out [B, H, W, C], class-token out [B, P, C])``.
    """
    batch, height, width, dim = x.shape
    agents = params["an_bias"].shape[1]
    head_dim, side = dim // heads, math.isqrt(agents)
    tokens = x.reshape(batch, height * width, dim)
    if cls_token is not None:
        tokens = torch.cat([cls_token, tokens], 1)
    prefix = tokens.shape[1] - height * width
    if "q.weight" in params:
        q = tokens @ params["q.weight"].T + params["q.bias"]
        kv = tokens @ params["kv.weight"].T + params["kv.bias"]
        k, v = kv[..., :dim], kv[..., dim:]
    else:
        qkv = tokens @ params["qkv.weight"].T + params["qkv.bias"]
        q, k, v = qkv[..., :dim], qkv[..., dim:2 * dim], qkv[..., 2 * dim:]
    grid = q[:, prefix:].reshape(batch, height, width, dim)
    # agents: mean of the queries over each adaptive-pool cell, cell (r, c) spanning rows
    # floor(r*H/n_rows) .. ceil((r+1)*H/n_rows) - 1
    n_rows, n_cols = agent_shape or (side, side)
    cells = []
    for r in range(n_rows):
        for c in range(n_cols):
            rows = slice(r * height // n_rows, -(-(r + 1) * height // n_rows))
            cols = slice(c * width // n_cols, -(-(c + 1) * width // n_cols))
            cells.append(grid[:, rows, cols].mean(dim=(1, 2)))
    agent = torch.stack(cells, 1)  # [B, n, C]

    def split(t):
        return t.reshape(batch, -1, heads, head_dim).permute(0, 2, 1, 3)

    q, k, v, agent = split(q), split(k), split(v), split(agent)
    an = F.interpolate(params["an_bias"], size=(height, width), mode="bilinear")  # [h, n, H, W]
    na = F.interpolate(params["na_bias"], size=(height, width), mode="bilinear")
    ah = _linear_resize(params["ah_bias"][0, :, :, :, 0], height)  # [h, n, H]
    aw = _linear_resize(params["aw_bias"][0, :, :, 0, :], width)  # [h, n, W]
    ha = _linear_resize(params["ha_bias"][0, :, :, 0, :].transpose(1, 2), height)  # [h, n, H]
    wa = _linear_resize(params["wa_bias"][0, :, 0, :, :].transpose(1, 2), width)  # [h, n, W]
    b1 = torch.empty(heads, agents, prefix + height * width, dtype=x.dtype)
    b2 = torch.empty(heads, prefix + height * width, agents, dtype=x.dtype)
    for i in range(height):
        for j in range(width):
            b1[:, :, prefix + i * width + j] = an[:, :, i, j] + ah[:, :, i] + aw[:, :, j]
            b2[:, prefix + i * width + j, :] = na[:, :, i, j] + ha[:, :, i] + wa[:, :, j]
    if prefix:
        b1[:, :, 0] = params["ac_bias"][0, :, :, 0]
        b2[:, 0, :] = params["ca_bias"][0, :, 0, :]
    if agent_shape is not None:
        tokens_ = prefix + height * width
        b1 = F.interpolate(b1.transpose(1, 2).reshape(heads, tokens_, side, side), size=agent_shape, mode="bilinear")
        b1 = b1.reshape(heads, tokens_, -1).transpose(1, 2)
        b2 = F.interpolate(b2.reshape(heads, tokens_, side, side), size=agent_shape, mode="bilinear")
        b2 = b2.reshape(heads, tokens_, -1)
    scale = head_dim**-0.5
    agent_v = torch.softmax(agent @ k.transpose(-1, -2) * scale + b1, dim=-1) @ v
    out = torch.softmax(q @ agent.transpose(-1, -2) * scale + b2, dim=-1) @ agent_v
    out = out.permute(0, 2, 1, 3).reshape(batch, -1, dim)
    v_map = v[:, :, prefix:].permute(0, 1, 3, 2).reshape(batch, dim, height, width)
    local = F.conv2d(v_map, params["dwc.weight"], params["dwc.bias"], padding=1, groups=dim)
    out[:, prefix:] = out[:, prefix:] + local.flatten(2).transpose(1, 2)
    out = out @ params["proj.weight"].T + params["proj.bias"]
    return out[:, prefix:].reshape(batch, height, width, dim), out[:, :prefix]


CASES = [
    # (height, width, window, agent_num, split_qkv): at the window size, smaller, non-square, larger
    (7, 7, 7, 9, False),
    (7, 7, 7, 4, True),
    (5, 9, 6, 9, False),
    (12, 10, 8, 16, True),
    (3, 4, 7, 9, False),
]


@pytest.mark.parametrize("class_token", [False, True])
@pytest.mark.parametrize("height, width, window, agent_num, split_qkv", CASES)
def test_matches_reference(height, width, window, agent_num, split_qkv, class_token):
    dim, heads = 12, 3
    module = AgentAttention(dim, heads, agent_num, window, split_qkv=split_qkv, class_token=class_token)
    module = _randomize(module.double()).eval()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, height, width, dim, generator=generator, dtype=torch.float64)
    cls = torch.randn(2, 1, dim, generator=generator, dtype=torch.float64) if class_token else None
    expected, expected_cls = reference_agent_attention(dict(module.named_parameters()), x, heads, cls)
    with torch.no_grad():
        out = module(x, cls)
    if class_token:
        out, out_cls = out
        torch.testing.assert_close(out_cls, expected_cls, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("height, width, agent_num, agent_shape, class_token", [
    (10, 12, 9, (5, 5), False),  # more agents than trained (the official dense backbones)
    (6, 5, 4, (3, 4), True),  # a non-square grid, with a class token
    (4, 4, 9, (6, 6), False),  # more agents than tokens: pool cells repeat tokens
    (9, 9, 16, (2, 2), False),  # fewer agents
])
def test_agents_pooled_to_another_grid_match_reference(height, width, agent_num, agent_shape, class_token):
    dim, heads = 12, 3
    module = AgentAttention(dim, heads, agent_num, (7, 8), agent_shape=agent_shape, class_token=class_token)
    module = _randomize(module.double()).eval()
    assert module.agent_shape == agent_shape and module.an_bias.shape[1] == agent_num
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, height, width, dim, generator=generator, dtype=torch.float64)
    cls = torch.randn(2, 1, dim, generator=generator, dtype=torch.float64) if class_token else None
    params = dict(module.named_parameters())
    expected, expected_cls = reference_agent_attention(params, x, heads, cls, agent_shape=agent_shape)
    with torch.no_grad():
        out = module(x, cls)
    if class_token:
        out, out_cls = out
        torch.testing.assert_close(out_cls, expected_cls, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    # the same weights on the trained grid differ: the grid matters
    trained = _randomize(AgentAttention(dim, heads, agent_num, (7, 8), class_token=class_token).double()).eval()
    with torch.no_grad():
        other = trained(x, cls)
    assert not torch.allclose(other[0] if class_token else other, out)


def test_gradients_match_reference():
    module = _randomize(AgentAttention(8, 2, 4, (5, 6), class_token=True).double())
    x = torch.randn(2, 4, 7, 8, dtype=torch.float64, requires_grad=True)
    cls = torch.randn(2, 1, 8, dtype=torch.float64, requires_grad=True)
    out, out_cls = module(x, cls)
    grads = torch.autograd.grad((out.sin().sum() + out_cls.cos().sum()), [x, cls, *module.parameters()])
    ref, ref_cls = reference_agent_attention(dict(module.named_parameters()), x, 2, cls)
    ref_grads = torch.autograd.grad((ref.sin().sum() + ref_cls.cos().sum()), [x, cls, *module.parameters()])
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-10)


def test_official_parameter_names_and_shapes():
    pvt = AgentAttention(64, 1, 9, 56, split_qkv=True)
    deit = AgentAttention(192, 3, 49, 14, class_token=True)
    assert {n: tuple(p.shape) for n, p in pvt.named_parameters()} == {
        "q.weight": (64, 64), "q.bias": (64,), "kv.weight": (128, 64), "kv.bias": (128,),
        "proj.weight": (64, 64), "proj.bias": (64,), "dwc.weight": (64, 1, 3, 3), "dwc.bias": (64,),
        "an_bias": (1, 9, 7, 7), "na_bias": (1, 9, 7, 7), "ah_bias": (1, 1, 9, 56, 1),
        "aw_bias": (1, 1, 9, 1, 56), "ha_bias": (1, 1, 56, 1, 9), "wa_bias": (1, 1, 1, 56, 9),
    }
    names = {n for n, _ in deit.named_parameters()}
    assert {"qkv.weight", "qkv.bias", "ac_bias", "ca_bias"} <= names and "q.weight" not in names


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="agent_num must be a positive square"):
        AgentAttention(12, 3, 10, 7)
    with pytest.raises(ValueError, match="agent_shape must be a grid of at least 1x1 agents"):
        AgentAttention(12, 3, 9, 7, agent_shape=(0, 3))
    with pytest.raises(ValueError, match=r"dim \(10\) must be divisible by num_heads \(3\)"):
        AgentAttention(10, 3, 9, 7)
    module = AgentAttention(12, 3, 9, 7)
    with pytest.raises(ValueError, match="cls_token must be given exactly when"):
        module(torch.randn(1, 7, 7, 12), torch.randn(1, 1, 12))
    with pytest.raises(ValueError, match="cls_token must be given exactly when"):
        AgentAttention(12, 3, 9, 7, class_token=True)(torch.randn(1, 7, 7, 12))


def test_resize_agent_biases_to_another_resolution():
    source = _randomize(AgentAttention(12, 3, 9, (6, 6)))
    target = AgentAttention(12, 3, 9, (9, 5))
    state = dict(source.state_dict(), extra=torch.ones(2))
    resized = resize_agent_biases(state, target)
    assert resized["an_bias"] is state["an_bias"] and resized["extra"] is state["extra"]
    torch.testing.assert_close(resized["ah_bias"][0, :, :, :, 0], _linear_resize(state["ah_bias"][0, :, :, :, 0], 9))
    torch.testing.assert_close(resized["wa_bias"][0, :, 0].transpose(1, 2),
                               _linear_resize(state["wa_bias"][0, :, 0].transpose(1, 2), 5))
    target.load_state_dict({k: v for k, v in resized.items() if k != "extra"})  # strict: every shape fits
