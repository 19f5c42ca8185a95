"""Agent-DeiT: official checkpoints load strictly and match a forward written from the official architecture."""
import timm
import torch
import torch.nn.functional as F

import visionzoo  # noqa: F401  (registers the models)
from tests.layers.test_agent_attention import reference_agent_attention

# a reduced Agent-DeiT-B: agent attention in the first AGENT_LAYERS blocks, softmax attention after
DIM, DEPTH, HEADS, AGENTS, AGENT_LAYERS, IMG, CLASSES = 24, 3, 3, 9, 2, 96, 10
GRID = IMG // 16
OVERRIDES = dict(
    embed_dim=DIM, depth=DEPTH, num_heads=HEADS, agent_num=AGENTS, agent_layers=AGENT_LAYERS,
    num_classes=CLASSES, img_size=IMG,
)


def official_state_dict(seed=0):
    """Random weights under the official key names and shapes (agent_transformer/models/agent_deit.py)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {
        "cls_token": (1, 1, DIM), "pos_embed": (1, 1 + GRID * GRID, DIM),
        "patch_embed.proj.weight": (DIM, 3, 16, 16), "patch_embed.proj.bias": (DIM,),
        "norm.weight": (DIM,), "norm.bias": (DIM,), "head.weight": (CLASSES, DIM), "head.bias": (CLASSES,),
    }
    for i in range(DEPTH):
        block = f"blocks.{i}."
        shapes.update({
            block + "norm1.weight": (DIM,), block + "norm1.bias": (DIM,),
            block + "attn.qkv.weight": (3 * DIM, DIM), block + "attn.qkv.bias": (3 * DIM,),
            block + "attn.proj.weight": (DIM, DIM), block + "attn.proj.bias": (DIM,),
            block + "norm2.weight": (DIM,), block + "norm2.bias": (DIM,),
            block + "mlp.fc1.weight": (4 * DIM, DIM), block + "mlp.fc1.bias": (4 * DIM,),
            block + "mlp.fc2.weight": (DIM, 4 * DIM), block + "mlp.fc2.bias": (DIM,),
        })
        if i < AGENT_LAYERS:
            shapes.update({
                block + "attn.dwc.weight": (DIM, 1, 3, 3), block + "attn.dwc.bias": (DIM,),
                block + "attn.an_bias": (HEADS, AGENTS, 7, 7), block + "attn.na_bias": (HEADS, AGENTS, 7, 7),
                block + "attn.ah_bias": (1, HEADS, AGENTS, GRID, 1),
                block + "attn.aw_bias": (1, HEADS, AGENTS, 1, GRID),
                block + "attn.ha_bias": (1, HEADS, GRID, 1, AGENTS),
                block + "attn.wa_bias": (1, HEADS, 1, GRID, AGENTS),
                block + "attn.ac_bias": (1, HEADS, AGENTS, 1), block + "attn.ca_bias": (1, HEADS, 1, AGENTS),
            })
    return {key: torch.randn(shape, generator=generator) * 0.2 for key, shape in shapes.items()}


def _softmax_attention(sd, prefix, x):
    batch, tokens, _ = x.shape
    qkv = (x @ sd[prefix + "qkv.weight"].T + sd[prefix + "qkv.bias"]).reshape(batch, tokens, 3, HEADS, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(batch, tokens, DIM)
    return out @ sd[prefix + "proj.weight"].T + sd[prefix + "proj.bias"]


def official_forward(sd, image):
    """The official forward: patches + class token + position embedding, blocks, norm, class-token head."""
    x = F.conv2d(image, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd["pos_embed"]
    for i in range(DEPTH):
        p = f"blocks.{i}."
        y = F.layer_norm(x, (DIM,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        if i < AGENT_LAYERS:
            attn = {k[len(p + "attn."):]: v for k, v in sd.items() if k.startswith(p + "attn.")}
            out_map, out_cls = reference_agent_attention(attn, y[:, 1:].reshape(-1, GRID, GRID, DIM), HEADS, y[:, :1])
            y = torch.cat([out_cls, out_map.flatten(1, 2)], dim=1)
        else:
            y = _softmax_attention(sd, p + "attn.", y)
        x = x + y
        y = F.layer_norm(x, (DIM,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        y = F.gelu(y @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        x = x + y @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
    x = F.layer_norm(x, (DIM,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return x[:, 0] @ sd["head.weight"].T + sd["head.bias"]


def test_official_checkpoint_loads_strictly_and_matches_official_forward(tmp_path):
    sd = official_state_dict()
    path = tmp_path / "agent_deit.pth"
    torch.save({"model": sd}, path)
    model = timm.create_model(
        "visionzoo_agent_deit_b", pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=CLASSES), **OVERRIDES,
    ).eval()
    image = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(image)
    torch.testing.assert_close(out, official_forward(sd, image), rtol=1e-4, atol=1e-4)
    assert sum(v.numel() for v in sd.values()) == sum(p.numel() for p in model.parameters())


def test_checkpoint_of_another_resolution_loads_with_resized_embedding_and_biases(tmp_path):
    sd = official_state_dict()
    path = tmp_path / "agent_deit.pth"
    torch.save({"model": sd}, path)
    model = timm.create_model(
        "visionzoo_agent_deit_b", pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=CLASSES), **dict(OVERRIDES, img_size=128),
    ).eval()
    assert model.pos_embed.shape == (1, 1 + 8 * 8, DIM)
    assert torch.equal(model.pos_embed[:, 0], sd["pos_embed"][:, 0])  # the class token's is kept
    assert model.blocks[0].attn.wa_bias.shape == (1, HEADS, 1, 8, AGENTS)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 128, 128)).shape == (1, CLASSES)


def test_param_counts_equal_the_official_models():
    # counted from the official definitions (agent_deit_{tiny,small,base})
    official = dict(t=6_015_640, s=22_647_112, b=87_204_904)
    for size, count in official.items():
        model = timm.create_model(f"visionzoo_agent_deit_{size}", device="meta")
        assert sum(p.numel() for p in model.parameters()) == count, size
