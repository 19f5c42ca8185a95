"""2D token merging (Segformer++) on the zoo's own attention modules: MambaVision, CoAtNet, agent attention.

The reference below restates merged attention from its description, per image, with explicit
loops over cells and positions, not from the implementation under test:

- destinations: the top-left token of every whole ``cell`` of the grid; every other token is a
  source; each source picks its most cosine-similar destination, and the ``int(N * ratio)``
  sources (capped at their number) with the highest similarity join their pick;
- a merged group's value is the mean of its tokens and it stands at its destination's position;
  query pooling averages each cell (partial ones at the border too), standing at its top-left;
- attention between the merged queries and keys/values, with the relative position bias of the
  key's position minus the query's, read from the Swin / CoAtNet query-minus-key table by the
  textbook index ``(qy - ky + H - 1) * (2W - 1) + (qx - kx + W - 1)``; the output projection of a
  query group is copied to every token of the group;
- agent attention: the agents are pooled from every query; they attend the merged keys/values
  (bias column of the group's position), the merged queries attend the agents (bias row of the
  group's position), the result is copied to the group's tokens and the depthwise conv of the full
  values is added; a class token takes part unmerged.
"""
import pytest
import timm
import torch
import torch.nn as nn

from visionzoo.layers import AgentAttention, agent_position_biases
from visionzoo.layers.token_merging import Merge2dConfig, apply_merge2d, gathered_rpb, remove_merge2d
from visionzoo.models.mambavision import WindowSelfAttention
from visionzoo.models.maxxvit import MaxxVitTransformerCfg, PartitionAttention


def _groups(tokens, grid, cell, ratio):
    """One image's merge of ``tokens`` [N, C]: a list of (members, position)."""
    height, width = grid
    whole_h, whole_w = height // cell[0] * cell[0], width // cell[1] * cell[1]
    destinations = [y * width + x for y in range(0, whole_h, cell[0]) for x in range(0, whole_w, cell[1])]
    sources = [p for p in range(height * width) if p not in destinations]
    r = min(int(height * width * ratio), len(sources))
    if r == 0 or not destinations:
        return [([p], p) for p in range(height * width)]
    unit = tokens / tokens.norm(dim=-1, keepdim=True)
    picks = []
    for s in sources:
        similarities = [float(unit[s] @ unit[d]) for d in destinations]
        best = max(range(len(destinations)), key=lambda i: similarities[i])
        picks.append((similarities[best], s, destinations[best]))
    picks.sort(key=lambda pick: -pick[0])
    members = {d: [d] for d in destinations}
    for _, s, d in picks[:r]:
        members[d].append(s)
    return [([s], s) for _, s, _ in picks[r:]] + [(members[d], d) for d in destinations]


def _pooled(grid, cell):
    height, width = grid
    return [
        ([(y + i) * width + x + j for i in range(cell[0]) for j in range(cell[1]) if y + i < height and x + j < width],
         y * width + x)
        for y in range(0, height, cell[0]) for x in range(0, width, cell[1])
    ]


@torch.no_grad()
def _reference(attn, x, config, table=None):
    """Merged attention of ``attn`` on ``x`` [B, H, W, C]; ``table`` the query-minus-key bias table."""
    batch, height, width, channels = x.shape
    heads = attn.num_heads
    out = torch.empty(batch, height * width, attn.proj.out_features, dtype=torch.float64)
    weight, bias = attn.qkv.weight.double(), attn.qkv.bias.double()
    head_dim = weight.shape[0] // (3 * heads)
    for b in range(batch):
        tokens = x[b].reshape(-1, channels).double()
        if config.q_pool:
            query_groups = _pooled((height, width), config.q_cell)
        else:
            query_groups = _groups(tokens, (height, width), config.q_cell, config.q_ratio)
        key_groups = _groups(tokens, (height, width), config.kv_cell, config.kv_ratio)

        def project(groups, which):
            means = torch.stack([tokens[members].mean(0) for members, _ in groups])
            qkv = (means @ weight.T + bias).reshape(len(groups), *((heads, 3) if attn.head_first else (3, heads)),
                                                    head_dim)
            return qkv[:, :, which] if attn.head_first else qkv[:, which]

        q, k, v = project(query_groups, 0), project(key_groups, 1), project(key_groups, 2)
        for gq, (members, q_position) in enumerate(query_groups):
            heads_out = []
            for h in range(heads):
                logits = []
                for gk, (_, k_position) in enumerate(key_groups):
                    logit = float(q[gq, h] @ k[gk, h]) * head_dim**-0.5
                    if table is not None:
                        qy, qx = divmod(q_position, width)
                        ky, kx = divmod(k_position, width)
                        logit += float(table[(qy - ky + height - 1) * (2 * width - 1) + (qx - kx + width - 1), h])
                    logits.append(logit)
                weights = torch.tensor(logits, dtype=torch.float64).softmax(0)
                heads_out.append(weights @ v[:, h])
            projected = torch.cat(heads_out) @ attn.proj.weight.double().T + attn.proj.bias.double()
            out[b, members] = projected
    return out.reshape(batch, height, width, -1)


def _coatnet_attention(grid, head_first=True):
    torch.manual_seed(0)
    cfg = MaxxVitTransformerCfg(dim_head=8, head_first=head_first)
    return PartitionAttention(16, 16, "global", grid, cfg).eval()


CONFIGS = [
    Merge2dConfig(q_ratio=0.5, q_cell=(2, 2), kv_ratio=0.6, kv_cell=(2, 2)),
    Merge2dConfig(q_ratio=0.8, q_cell=(4, 4)),
    Merge2dConfig(q_pool=True, q_cell=(2, 2), kv_ratio=0.9, kv_cell=(3, 3)),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("head_first", [True, False])
def test_coatnet_global_attention_equals_reference_with_gathered_bias(config, head_first):
    grid = (5, 6)
    attn = _coatnet_attention(grid, head_first)
    x = torch.randn(2, *grid, 16, generator=torch.Generator().manual_seed(1))
    table = attn.rel_pos.relative_position_bias_table.detach().double()
    with torch.no_grad():
        actual = apply_merge2d(attn, config)(x)
    expected = _reference(attn, x, config, table)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(actual.double(), _reference(attn, x, Merge2dConfig(), table), atol=1e-3)


def test_mambavision_window_attention_equals_reference():
    torch.manual_seed(0)
    attn = WindowSelfAttention(16, 2, window_size=6).eval()
    x = torch.randn(3, 36, 16, generator=torch.Generator().manual_seed(1))  # 3 windows of 6 x 6 tokens
    with torch.no_grad():
        actual = apply_merge2d(attn, CONFIGS[0])(x)
    attn.head_first = False  # the reference's name for the qkv channel order
    expected = _reference(attn, x.reshape(3, 6, 6, 16), CONFIGS[0]).reshape(3, 36, 16)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def _agent_reference(attn, x, config, cls_token=None):
    """Merged agent attention of ``attn`` on ``x`` [B, H, W, C] (and ``cls_token`` [B, 1, C])."""
    batch, height, width, channels = x.shape
    heads, head_dim, prefix = attn.num_heads, attn.head_dim, int(cls_token is not None)
    agent_bias, query_bias = agent_position_biases(
        attn.an_bias, attn.na_bias, attn.ah_bias, attn.aw_bias, attn.ha_bias, attn.wa_bias, height, width,
        getattr(attn, "ac_bias", None), getattr(attn, "ca_bias", None), attn.agent_shape,
    )
    out_map, out_cls = torch.empty_like(x), torch.empty(batch, prefix, channels)
    for b in range(batch):
        tokens = x[b].reshape(-1, channels)
        full = tokens if cls_token is None else torch.cat([cls_token[b], tokens])
        q, k, v = attn._project(full[None])
        q, k, v = q[0], k[0], v[0]
        agents = attn.pool(q[prefix:].T.reshape(channels, height, width)).flatten(1).T  # every query
        if config.q_pool:
            query_groups = _pooled((height, width), config.q_cell)
        else:
            query_groups = _groups(tokens, (height, width), config.q_cell, config.q_ratio)
        key_groups = _groups(tokens, (height, width), config.kv_cell, config.kv_ratio)
        # (rows of q / k / v, bias index) of the prefix tokens, then of the groups
        keys = [([i], i) for i in range(prefix)] + [([prefix + m for m in members], prefix + position)
                                                     for members, position in key_groups]
        queries = [([i], i) for i in range(prefix)] + [([prefix + m for m in members], prefix + position)
                                                        for members, position in query_groups]
        attended = torch.empty(len(full), channels)
        for h in range(heads):
            part = slice(h * head_dim, (h + 1) * head_dim)
            agent_v = []
            for a in range(len(agents)):
                logits = torch.stack([agents[a, part] @ k[rows, part].mean(0) * attn.scale + agent_bias[0, h, a, index]
                                      for rows, index in keys])
                agent_v.append(sum(w * v[rows, part].mean(0) for w, (rows, _) in zip(logits.softmax(0), keys)))
            agent_v = torch.stack(agent_v)
            for rows, index in queries:
                logits = torch.stack([q[rows, part].mean(0) @ agents[a, part] * attn.scale + query_bias[0, h, index, a]
                                      for a in range(len(agents))])
                attended[rows, part] = logits.softmax(0) @ agent_v
        grid_v = v[prefix:].T.reshape(1, channels, height, width)
        attended[prefix:] += attn.dwc(grid_v).flatten(2)[0].T
        out = attn.proj(attended)
        out_map[b], out_cls[b] = out[prefix:].reshape(height, width, channels), out[:prefix]
    return out_map if cls_token is None else (out_map, out_cls)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("class_token", [False, True])
def test_agent_attention_equals_reference(config, class_token):
    torch.manual_seed(0)
    attn = AgentAttention(16, 2, agent_num=4, window_size=(5, 6), split_qkv=not class_token,
                          class_token=class_token).eval()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 6, 16, generator=generator)
    cls_token = torch.randn(2, 1, 16, generator=generator) if class_token else None
    with torch.no_grad():
        actual = apply_merge2d(attn, config)(x, cls_token) if class_token else apply_merge2d(attn, config)(x)
        unmerged = remove_merge2d(attn)(x, cls_token) if class_token else remove_merge2d(attn)(x)
    expected = _agent_reference(attn, x, config, cls_token)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(actual[0] if class_token else actual, unmerged[0] if class_token else unmerged,
                              atol=1e-3)


def _mambavision(window_size=(8, 8, 4, 4)):
    torch.manual_seed(0)
    return timm.create_model(
        "visionzoo_mambavision_t", num_classes=0, dim=16, in_dim=8, depths=(1, 1, 2, 2), num_heads=(1, 1, 2, 2),
        window_size=window_size,
    ).eval()


def _coatnet():
    torch.manual_seed(0)
    return timm.create_model("visionzoo_coatnet_0", img_size=128, depths=(1, 1, 2, 1), num_classes=0).eval()


def _agent_pvt():
    torch.manual_seed(0)
    return timm.create_model("visionzoo_agent_pvt_t", img_size=128, depths=(1, 1, 1, 1), num_classes=0).eval()


@pytest.mark.parametrize("build, first_merged", [(_mambavision, 2), (_coatnet, 2), (_agent_pvt, 0)],
                         ids=["mambavision", "coatnet", "agent_pvt"])
def test_ratio_0_and_remove_restore_exactly_and_merged_maps_keep_their_shape(build, first_merged):
    model = build()
    image = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.forward_intermediates(image, intermediates_only=True)
        unmerged = apply_merge2d(model, Merge2dConfig(q_ratio=0.0, kv_ratio=0.0))
        assert all(map(torch.equal, unmerged.forward_intermediates(image, intermediates_only=True), expected))
        for preset in ("hq", "fast", "2x2"):
            features = apply_merge2d(model, preset).forward_intermediates(image, intermediates_only=True)
            assert [f.shape for f in features] == [f.shape for f in expected]
            assert all(map(torch.equal, features[:first_merged], expected[:first_merged]))  # conv stages
            assert not torch.allclose(features[-1], expected[-1])
        remove_merge2d(model)
        assert all(map(torch.equal, model.forward_intermediates(image, intermediates_only=True), expected))
    assert not any("Merge2d" in type(module).__name__ for module in model.modules())


def test_coatnet_dense_layout_merges_each_padded_window():
    attn = apply_merge2d(_coatnet_attention((4, 4)), CONFIGS[0])
    x = torch.randn(2, 6, 7, 16, generator=torch.Generator().manual_seed(1))  # padded to 2 x 2 windows of 4 x 4
    padded = torch.nn.functional.pad(x, (0, 0, 0, 1, 0, 2))
    with torch.no_grad():
        actual = attn(x)
        windows = [attn(padded[:, i:i + 4, j:j + 4]) for i in (0, 4) for j in (0, 4)]
    expected = torch.cat([torch.cat(windows[:2], 2), torch.cat(windows[2:], 2)], 1)[:, :6, :7]
    torch.testing.assert_close(actual, expected)
    model = timm.create_model("visionzoo_coatnet_0", img_size=64, depths=(1, 1, 1, 1), num_classes=0,
                              pad_to_window=True).eval()
    image = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(image)
        assert torch.equal(apply_merge2d(model, Merge2dConfig())(image), expected)
        merged = apply_merge2d(model, "fast")(image)
    assert merged.shape == expected.shape and not torch.allclose(merged, expected)


def test_mambavision_padded_dense_windows_merge():
    model = _mambavision(window_size=(8, 8, 8, 8))  # 64 px: 4 x 4 and 2 x 2 maps padded to 8 x 8 windows
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(image)
        merged = apply_merge2d(model, "fast")(image)
    assert merged.shape == expected.shape and torch.isfinite(merged).all()
    assert not torch.equal(merged, expected)


def test_hq_preset_splits_hierarchical_models_by_stage():
    hq_kv, hq_q = Merge2dConfig(kv_ratio=0.6, kv_cell=(2, 2)), Merge2dConfig(q_ratio=0.8, q_cell=(4, 4))
    model = apply_merge2d(_mambavision(), "hq")  # attention in stages 3-4 of 4: queries merged
    assert [m._merge2d for m in model.modules() if hasattr(m, "_merge2d")] == [hq_q, hq_q]

    class TwoStages(nn.Module):
        def __init__(self):
            super().__init__()
            self.stages = nn.Sequential(*[
                nn.Sequential(*[WindowSelfAttention(8, 1, window_size=4) for _ in range(2)]) for _ in range(2)
            ])

    model = apply_merge2d(TwoStages(), "hq")
    assert [m._merge2d for m in model.modules() if hasattr(m, "_merge2d")] == [hq_kv, hq_kv, hq_q, hq_q]


def test_unsupported_modules_are_refused_with_the_reason():
    cfg = MaxxVitTransformerCfg(dim_head=8)
    maxvit = nn.Sequential(*[PartitionAttention(16, 16, partition, (7, 7), cfg) for partition in ("block", "grid")])
    with pytest.raises(TypeError, match="MaxViT's block / grid attention is not merged"):
        apply_merge2d(maxvit, "hq")
    with pytest.raises(TypeError, match="Conv2d has no attention that 2D merging runs"):
        apply_merge2d(nn.Conv2d(3, 8, 3), "hq")
    with pytest.raises(ValueError, match=r"one Merge2dConfig per block \(2 merge\)"):
        apply_merge2d(_mambavision(), [Merge2dConfig()])
    positions = torch.arange(32)[None]
    with pytest.raises(ValueError, match="bias covers offsets .* not those of the 4x8 grid"):
        gathered_rpb(torch.zeros(2, 7, 7), (4, 8), positions, positions)
    with pytest.raises(ValueError, match="35 tokens do not fill a"):
        apply_merge2d(WindowSelfAttention(16, 2, window_size=6), CONFIGS[0])(torch.randn(1, 35, 16))
