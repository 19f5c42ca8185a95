"""Agent-Swin: official checkpoints load strictly and match a forward written from the official
architecture; param counts and the resolution-dependent layout are the official ones."""
import pytest
import timm
import torch
import torch.nn.functional as F

import visionzoo  # noqa: F401  (registers the models)
from tests.layers.test_agent_attention import reference_agent_attention
from visionzoo.models.agent_swin import block_attention_types

# a reduced Agent-Swin with every official stage type: A, A, M2 (agent, agent, window, shifted
# window), B; at 224 the stage maps are 56, 28, 14, 7 and the window blocks' window is 7
EMBED, DEPTHS, HEADS, AGENTS = 16, (2, 1, 4, 2), (1, 2, 2, 4), (9, 4, 9, 4)
ATTN = ("A", "A", "M2", "B")
IMG, CLASSES, WINDOW = 224, 10, 7
OVERRIDES = dict(embed_dim=EMBED, depths=DEPTHS, num_heads=HEADS, attn_types=ATTN, agent_nums=AGENTS,
                 num_classes=CLASSES, img_size=IMG)


def _block_types():
    """Per stage, per block: 'A' or 'B' as the official BasicLayer expands attn_type ('M2': A, A, B...)."""
    out = []
    for stage_type, depth in zip(ATTN, DEPTHS):
        count = int(stage_type[1:]) if stage_type.startswith("M") else None
        out.append([("A" if j < count else "B") if count is not None else stage_type for j in range(depth)])
    return out


def official_state_dict(seed=0):
    """Random weights under the official key names and shapes (agent_transformer/models/agent_swin.py)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {"patch_embed.proj.weight": (EMBED, 3, 4, 4), "patch_embed.proj.bias": (EMBED,),
              "patch_embed.norm.weight": (EMBED,), "patch_embed.norm.bias": (EMBED,)}
    buffers = {}
    for i, (types, heads, agents) in enumerate(zip(_block_types(), HEADS, AGENTS)):
        dim, res = EMBED * 2**i, IMG // 4 // 2**i
        for j, attn_type in enumerate(types):
            block = f"layers.{i}.blocks.{j}."
            shapes.update({
                block + "norm1.weight": (dim,), block + "norm1.bias": (dim,),
                block + "attn.qkv.weight": (3 * dim, dim), block + "attn.qkv.bias": (3 * dim,),
                block + "attn.proj.weight": (dim, dim), block + "attn.proj.bias": (dim,),
                block + "norm2.weight": (dim,), block + "norm2.bias": (dim,),
                block + "mlp.fc1.weight": (4 * dim, dim), block + "mlp.fc1.bias": (4 * dim,),
                block + "mlp.fc2.weight": (dim, 4 * dim), block + "mlp.fc2.bias": (dim,),
            })
            if attn_type == "A":  # the window is the whole stage map
                shapes.update({
                    block + "attn.dwc.weight": (dim, 1, 3, 3), block + "attn.dwc.bias": (dim,),
                    block + "attn.an_bias": (heads, agents, 7, 7), block + "attn.na_bias": (heads, agents, 7, 7),
                    block + "attn.ah_bias": (1, heads, agents, res, 1),
                    block + "attn.aw_bias": (1, heads, agents, 1, res),
                    block + "attn.ha_bias": (1, heads, res, 1, agents),
                    block + "attn.wa_bias": (1, heads, 1, res, agents),
                })
            else:
                window = min(WINDOW, res)
                shapes[block + "attn.relative_position_bias_table"] = ((2 * window - 1) ** 2, heads)
                buffers[block + "attn.relative_position_index"] = _index(window)
                if j % 2 and res > window:  # the official shifted blocks save their mask
                    buffers[block + "attn_mask"] = torch.zeros((res // window) ** 2, window**2, window**2)
        if i < len(DEPTHS) - 1:
            shapes[f"layers.{i}.downsample.norm.weight"] = (4 * dim,)
            shapes[f"layers.{i}.downsample.norm.bias"] = (4 * dim,)
            shapes[f"layers.{i}.downsample.reduction.weight"] = (2 * dim, 4 * dim)
    last = EMBED * 2 ** (len(DEPTHS) - 1)
    shapes.update({"norm.weight": (last,), "norm.bias": (last,),
                   "head.weight": (CLASSES, last), "head.bias": (CLASSES,)})
    sd = {key: torch.randn(shape, generator=generator) * 0.2 for key, shape in shapes.items()}
    return dict(sd, **buffers)


def _index(window):
    """Swin's relative position index: (dy + w - 1) * (2w - 1) + (dx + w - 1), query minus key."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :] + window - 1
    return rel[0] * (2 * window - 1) + rel[1]


def _windows(x, window):
    b, h, w, c = x.shape
    return x.reshape(b, h // window, window, w // window, window, c).transpose(2, 3).reshape(-1, window * window, c)


def reference_window_attention(p, x, heads, window, shift):
    """Swin's W-MSA / SW-MSA as the official code: roll by -shift, window partition, -100 mask."""
    b, h, w, c = x.shape
    if shift:
        x = torch.roll(x, (-shift, -shift), (1, 2))
    tokens = _windows(x, window)
    qkv = (tokens @ p["qkv.weight"].T + p["qkv.bias"]).reshape(tokens.shape[0], -1, 3, heads, c // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    bias = p["relative_position_bias_table"][_index(window).reshape(-1)].reshape(window**2, window**2, heads)
    attn = q @ k.transpose(-1, -2) * (c // heads) ** -0.5 + bias.permute(2, 0, 1)
    if shift:
        region = torch.zeros(1, h, w, 1)
        cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
        for n, (rows, cols) in enumerate((r, s) for r in cuts for s in cuts):
            region[:, rows, cols] = n
        labels = _windows(region, window)[..., 0]
        mask = (labels[:, None, :] != labels[:, :, None]).float() * -100.0
        attn = (attn.reshape(b, -1, heads, window**2, window**2) + mask[None, :, None]).flatten(0, 1)
    out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(-1, window, window, c)
    out = out.reshape(b, h // window, w // window, window, window, c).transpose(2, 3).reshape(b, h, w, c)
    if shift:
        out = torch.roll(out, (shift, shift), (1, 2))
    return out @ p["proj.weight"].T + p["proj.bias"]


def official_forward(sd, image):
    """The official forward at its own resolution (224)."""
    x = F.conv2d(image, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=4).permute(0, 2, 3, 1)
    x = F.layer_norm(x, (EMBED,), sd["patch_embed.norm.weight"], sd["patch_embed.norm.bias"])
    for i, (types, heads) in enumerate(zip(_block_types(), HEADS)):
        dim, res = x.shape[-1], x.shape[1]
        for j, attn_type in enumerate(types):
            pre = f"layers.{i}.blocks.{j}."
            params = {k[len(pre + "attn."):]: v for k, v in sd.items() if k.startswith(pre + "attn.")}
            y = F.layer_norm(x, (dim,), sd[pre + "norm1.weight"], sd[pre + "norm1.bias"])
            if attn_type == "A":
                y, _ = reference_agent_attention(params, y, heads)
            else:
                window = min(WINDOW, res)
                shift = window // 2 if j % 2 and res > window else 0
                y = reference_window_attention(params, y, heads, window, shift)
            x = x + y
            y = F.layer_norm(x, (dim,), sd[pre + "norm2.weight"], sd[pre + "norm2.bias"])
            y = F.gelu(y @ sd[pre + "mlp.fc1.weight"].T + sd[pre + "mlp.fc1.bias"])
            x = x + y @ sd[pre + "mlp.fc2.weight"].T + sd[pre + "mlp.fc2.bias"]
        if i < len(DEPTHS) - 1:
            pre = f"layers.{i}.downsample."
            x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
            x = F.layer_norm(x, (4 * dim,), sd[pre + "norm.weight"], sd[pre + "norm.bias"])
            x = x @ sd[pre + "reduction.weight"].T
    x = F.layer_norm(x, (x.shape[-1],), sd["norm.weight"], sd["norm.bias"])
    return x.mean(dim=(1, 2)) @ sd["head.weight"].T + sd["head.bias"]


def _load(tmp_path, sd, **overrides):
    path = tmp_path / "agent_swin.pth"
    torch.save({"model": sd}, path)
    return timm.create_model(
        "visionzoo_agent_swin_t", pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=CLASSES), **dict(OVERRIDES, **overrides),
    ).eval()


def test_official_checkpoint_loads_strictly_and_matches_official_forward(tmp_path):
    sd = official_state_dict()
    model = _load(tmp_path, sd)
    # the stage types as built: agent / window blocks, and the shift parity inside the M2 stage
    shifts = [[getattr(block.attn, "shift_size", "A") for block in stage.blocks] for stage in model.stages]
    assert shifts == [["A", "A"], ["A"], ["A", "A", (0, 0), (3, 3)], [(0, 0), (0, 0)]]
    image = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(image)
    torch.testing.assert_close(out, official_forward(sd, image), rtol=1e-4, atol=1e-4)
    # what was loaded is the checkpoint: converted keys cover the model exactly
    params = sum(v.numel() for k, v in sd.items() if not k.endswith(("relative_position_index", "attn_mask")))
    assert params == sum(p.numel() for p in model.parameters())


def test_checkpoint_of_another_resolution_loads_with_resized_biases(tmp_path):
    """224 weights into the 288 layout: agent biases 56 -> 72 and window bias tables 7 -> 9 resized."""
    model = _load(tmp_path, official_state_dict(), img_size=288)
    assert model.stages[0].blocks[0].attn.ah_bias.shape == (1, HEADS[0], AGENTS[0], 72, 1)
    assert model.stages[2].blocks[3].attn.window_size == (9, 9)
    assert model.stages[2].blocks[3].attn.relative_position_bias_table.shape == (17 * 17, HEADS[2])
    with torch.no_grad():
        assert model(torch.randn(1, 3, 288, 288)).shape == (1, CLASSES)


def test_param_counts_equal_the_official_models():
    # counted from the official AgentSwinTransformer with the cfgs/agent_swin_*.yaml settings
    official = {
        ("t", 224): 28_902_964, ("s", 224): 49_666_684, ("b", 224): 88_095_096,
        ("s", 288): 49_707_964, ("b", 384): 88_305_016,
    }
    for (size, img), count in official.items():
        model = timm.create_model(f"visionzoo_agent_swin_{size}", img_size=img, device="meta")
        assert sum(p.numel() for p in model.parameters()) == count, (size, img)


def test_pretrained_tags_build_at_their_resolution():
    model = timm.create_model("visionzoo_agent_swin_b.in1k_384", device="meta")
    assert model.stages[0].blocks[0].attn.ha_bias.shape == (1, 4, 96, 1, 9)
    windows = {block.attn.window_size for block in model.stages[2].blocks[2:]}
    assert windows == {(12, 12)}


@pytest.mark.parametrize("size, img, stage_types", [
    ("t", 224, ["AA", "AA", "AAAAAA", "BB"]),
    ("s", 224, ["AA", "AA", "B" * 18, "BB"]),
    ("b", 224, ["AA", "AA", "AA" + "B" * 16, "BB"]),
])
def test_official_stage_layouts(size, img, stage_types):
    model = timm.create_model(f"visionzoo_agent_swin_{size}", img_size=img, device="meta")
    built = ["".join("A" if hasattr(block.attn, "agent_num") else "B" for block in stage.blocks)
             for stage in model.stages]
    assert built == stage_types
    assert [stage.blocks[0].attn.agent_num for stage in model.stages[:2]] == [9, 16]
    window_blocks = [block.attn for stage in model.stages for block in stage.blocks
                     if not hasattr(block.attn, "agent_num")]
    assert {attn.window_size for attn in window_blocks} == {(7, 7)}
    # stage 4 (7x7) never shifts; in stage 3 the odd blocks shift by 3 (M2's first window block is index 2)
    assert all(attn.shift_size == (0, 0) for attn in model.stages[3].blocks.modules() if hasattr(attn, "shift_size"))
    for j, block in enumerate(model.stages[2].blocks):
        if not hasattr(block.attn, "agent_num"):
            assert block.attn.shift_size == ((3, 3) if j % 2 else (0, 0))


def test_any_input_size_runs():
    model = timm.create_model("visionzoo_agent_swin_t", **dict(OVERRIDES, img_size=64)).eval()
    with torch.no_grad():
        for height, width in [(64, 64), (100, 76), (36, 52)]:
            assert model(torch.randn(1, 3, height, width)).shape == (1, CLASSES)


def test_bad_stage_types_are_named():
    assert block_attention_types("M2", 4) == ["A", "A", "B", "B"]
    with pytest.raises(ValueError, match="attn_types entries must be 'A', 'B' or 'M<k>'"):
        block_attention_types("C", 2)
    with pytest.raises(ValueError, match=r"attn_types \('A', 'B'\) must have one entry per stage"):
        timm.create_model("visionzoo_agent_swin_t", attn_types=("A", "B"), device="meta")
