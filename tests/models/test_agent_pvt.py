"""Agent-PVT: official checkpoints load strictly and match a forward written from the official architecture."""
import timm
import torch
import torch.nn.functional as F

import visionzoo  # noqa: F401  (registers the models)
from tests.layers.test_agent_attention import reference_agent_attention

# a reduced Agent-PVT-T: the official layout with narrower stages and fewer blocks
DIMS, DEPTHS, HEADS, MLP, AGENTS = (16, 32, 40, 64), (1, 2, 1, 1), (1, 2, 5, 8), (8, 8, 4, 4), (9, 16, 49, 49)
IMG, CLASSES = 128, 10
OVERRIDES = dict(embed_dims=DIMS, depths=DEPTHS, num_heads=HEADS, agent_nums=AGENTS, num_classes=CLASSES, img_size=IMG)


def official_state_dict(seed=0):
    """Random weights under the official key names and shapes (agent_transformer/models/agent_pvt.py)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {}
    in_chans = 3
    for i, (dim, depth, heads, mlp, agents) in enumerate(zip(DIMS, DEPTHS, HEADS, MLP, AGENTS), start=1):
        patch, grid = (4, IMG // 4) if i == 1 else (2, IMG // 2 ** (i + 1))
        shapes[f"patch_embed{i}.proj.weight"] = (dim, in_chans, patch, patch)
        shapes[f"patch_embed{i}.proj.bias"] = (dim,)
        shapes[f"patch_embed{i}.norm.weight"] = (dim,)
        shapes[f"patch_embed{i}.norm.bias"] = (dim,)
        shapes[f"pos_embed{i}"] = (1, grid * grid, dim)
        for j in range(depth):
            block = f"block{i}.{j}."
            shapes.update({
                block + "norm1.weight": (dim,), block + "norm1.bias": (dim,),
                block + "attn.q.weight": (dim, dim), block + "attn.q.bias": (dim,),
                block + "attn.kv.weight": (2 * dim, dim), block + "attn.kv.bias": (2 * dim,),
                block + "attn.proj.weight": (dim, dim), block + "attn.proj.bias": (dim,),
                block + "attn.dwc.weight": (dim, 1, 3, 3), block + "attn.dwc.bias": (dim,),
                block + "attn.an_bias": (heads, agents, 7, 7), block + "attn.na_bias": (heads, agents, 7, 7),
                block + "attn.ah_bias": (1, heads, agents, grid, 1),
                block + "attn.aw_bias": (1, heads, agents, 1, grid),
                block + "attn.ha_bias": (1, heads, grid, 1, agents),
                block + "attn.wa_bias": (1, heads, 1, grid, agents),
                block + "norm2.weight": (dim,), block + "norm2.bias": (dim,),
                block + "mlp.fc1.weight": (dim * mlp, dim), block + "mlp.fc1.bias": (dim * mlp,),
                block + "mlp.fc2.weight": (dim, dim * mlp), block + "mlp.fc2.bias": (dim,),
            })
        in_chans = dim
    shapes["head.weight"] = (CLASSES, DIMS[-1])
    shapes["head.bias"] = (CLASSES,)
    return {key: torch.randn(shape, generator=generator) * 0.2 for key, shape in shapes.items()}


def official_stages(sd, image, agent_shapes=(None,) * 4):
    """The official stage outputs ``[B, C, H, W]`` at its own resolution: PVTv1 stages of agent-attention
    blocks; ``agent_shapes``: the agents of each stage pooled to that grid (the official dense backbone)."""
    x, outs = image, []
    for i, (dim, depth, heads, agent_shape) in enumerate(zip(DIMS, DEPTHS, HEADS, agent_shapes), start=1):
        x = F.conv2d(x, sd[f"patch_embed{i}.proj.weight"], sd[f"patch_embed{i}.proj.bias"], stride=4 if i == 1 else 2)
        height, width = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)
        x = F.layer_norm(x, (dim,), sd[f"patch_embed{i}.norm.weight"], sd[f"patch_embed{i}.norm.bias"], eps=1e-5)
        x = x + sd[f"pos_embed{i}"]
        for j in range(depth):
            p = f"block{i}.{j}."
            y = F.layer_norm(x, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
            attn = {k[len(p + "attn."):]: v for k, v in sd.items() if k.startswith(p + "attn.")}
            y, _ = reference_agent_attention(attn, y.reshape(-1, height, width, dim), heads, agent_shape=agent_shape)
            x = x + y.reshape(x.shape)
            y = F.layer_norm(x, (dim,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
            y = F.gelu(y @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
            x = x + y @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
        x = x.transpose(1, 2).reshape(-1, dim, height, width)
        outs.append(x)
    return outs


def official_forward(sd, image):
    """The official classification forward: the stages, mean pool, head."""
    return official_stages(sd, image)[-1].mean(dim=(2, 3)) @ sd["head.weight"].T + sd["head.bias"]


def test_official_checkpoint_loads_strictly_and_matches_official_forward(tmp_path):
    sd = official_state_dict()
    path = tmp_path / "agent_pvt.pth"
    torch.save({"model": sd}, path)
    model = timm.create_model(
        "visionzoo_agent_pvt_t", pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=CLASSES), **OVERRIDES,
    ).eval()
    image = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(image)
    torch.testing.assert_close(out, official_forward(sd, image), rtol=1e-4, atol=1e-4)
    # what was loaded is the checkpoint: converted keys cover the model exactly
    assert sum(v.numel() for v in sd.values()) == sum(p.numel() for p in model.parameters())


def test_checkpoint_of_another_resolution_loads_with_resized_embeddings_and_biases(tmp_path):
    path = tmp_path / "agent_pvt.pth"
    torch.save({"model": official_state_dict()}, path)
    model = timm.create_model(
        "visionzoo_agent_pvt_t", pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=CLASSES), **dict(OVERRIDES, img_size=160),
    ).eval()
    assert model.patch_embed.pos_embed.shape == (1, 40 * 40, DIMS[0])
    assert model.stages[3].downsample.pos_embed.shape == (1, 5 * 5, DIMS[3])
    assert model.stages[0].blocks[0].attn.ah_bias.shape == (1, HEADS[0], AGENTS[0], 40, 1)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 160, 160)).shape == (1, CLASSES)


def test_param_counts_equal_the_official_models():
    # counted from the official definitions (agent_pvt_{tiny,small,medium,large}, agents 9-16-49-49)
    official = dict(t=11_570_352, s=20_635_066, m=35_921_746, l=48_738_180)
    for size, count in official.items():
        model = timm.create_model(f"visionzoo_agent_pvt_{size}", device="meta")
        assert sum(p.numel() for p in model.parameters()) == count, size
