"""Agent-Swin and Agent-PVT as mmdet / mmseg backbones: the official dense layout (agents pooled to
larger grids with the agent axis of their biases resized, Agent-Swin's window blocks padded before
the shift at every map size, no output norms for Agent-PVT). An official-layout dense checkpoint
loads strictly and gives the features of a forward written from the official dense backbone."""
import pytest

pytest.importorskip("mmdet")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tests.layers.test_agent_attention import reference_agent_attention  # noqa: E402
from tests.models import test_agent_pvt as pvt  # noqa: E402
from tests.models import test_agent_swin as swin  # noqa: E402
from visionzoo.mm import BACKBONES  # noqa: E402

SWIN_TINY = dict(embed_dim=swin.EMBED, depths=swin.DEPTHS, num_heads=swin.HEADS, attn_types=swin.ATTN,
                 agent_nums=swin.AGENTS)
# the official downstream_agent_shapes of Agent-Swin-T (detection and segmentation)
SWIN_GRIDS = [(9, 9), (12, 12), (14, 14), (7, 7)]


def _dense_checkpoint(sd, channels, seed=1):
    """``backbone.``-prefixed classification weights without the head / final norm, plus output norms."""
    generator = torch.Generator().manual_seed(seed)
    out = {f"backbone.{k}": v for k, v in sd.items() if not k.startswith(("head.", "norm."))}
    for i, dim in enumerate(channels):
        out[f"backbone.norm{i}.weight"] = 1 + 0.2 * torch.randn(dim, generator=generator)
        out[f"backbone.norm{i}.bias"] = 0.2 * torch.randn(dim, generator=generator)
    return out


def official_dense_swin(sd, image, grids):
    """The official dense Agent-Swin (downstream/*/backbones/agent_swin.py): agent blocks over the
    whole map with agents pooled to ``grids``; window blocks with window 7 and shift 3 on odd blocks
    at every map size, zero padded at the end before the shift; per-output LayerNorm."""
    pad = [0, -image.shape[3] % 4, 0, -image.shape[2] % 4]
    x = F.conv2d(F.pad(image, pad), sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=4)
    x = F.layer_norm(x.permute(0, 2, 3, 1), (swin.EMBED,), sd["patch_embed.norm.weight"], sd["patch_embed.norm.bias"])
    outs = []
    for i, (types, heads) in enumerate(zip(swin._block_types(), swin.HEADS)):
        dim = x.shape[-1]
        for j, attn_type in enumerate(types):
            pre = f"layers.{i}.blocks.{j}."
            params = {k[len(pre + "attn."):]: v for k, v in sd.items() if k.startswith(pre + "attn.")}
            y = F.layer_norm(x, (dim,), sd[pre + "norm1.weight"], sd[pre + "norm1.bias"])
            if attn_type == "A":
                y, _ = reference_agent_attention(params, y, heads, agent_shape=grids[i])
            else:
                height, width = y.shape[1:3]
                y = F.pad(y, (0, 0, 0, -width % 7, 0, -height % 7))
                y = swin.reference_window_attention(params, y, heads, 7, 3 if j % 2 else 0)[:, :height, :width]
            x = x + y
            y = F.layer_norm(x, (dim,), sd[pre + "norm2.weight"], sd[pre + "norm2.bias"])
            y = F.gelu(y @ sd[pre + "mlp.fc1.weight"].T + sd[pre + "mlp.fc1.bias"])
            x = x + y @ sd[pre + "mlp.fc2.weight"].T + sd[pre + "mlp.fc2.bias"]
        norm = (sd[f"norm{i}.weight"], sd[f"norm{i}.bias"])
        outs.append(F.layer_norm(x, (dim,), *norm).permute(0, 3, 1, 2))
        if i < len(swin.DEPTHS) - 1:
            pre = f"layers.{i}.downsample."
            x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
            x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
            x = F.layer_norm(x, (4 * dim,), sd[pre + "norm.weight"], sd[pre + "norm.bias"])
            x = x @ sd[pre + "reduction.weight"].T
    return outs


@pytest.mark.parametrize("task", ["det", "seg"])
def test_official_dense_agent_swin_checkpoint_loads_strictly_and_gives_its_features(task):
    sd = swin.official_state_dict()
    channels = [swin.EMBED * 2**i for i in range(4)]
    checkpoint = _dense_checkpoint(sd, channels)
    backbone = BACKBONES["AgentSwin"](arch="tiny", dense_schedule=task, **SWIN_TINY).eval()
    backbone.load_state_dict(backbone.convert_state_dict(checkpoint), strict=True)
    reference_sd = {k[len("backbone."):]: v for k, v in checkpoint.items()}
    # stage maps 30x22, 15x11, 8x6, 4x3: windows padded (and shifted) on every stage, agents re-pooled
    image = torch.randn(1, 3, 120, 88, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = backbone(image)
        expected = official_dense_swin(reference_sd, image, SWIN_GRIDS)
    assert [tuple(o.shape) for o in got] == [(1, 16, 30, 22), (1, 32, 15, 11), (1, 64, 8, 6), (1, 128, 4, 3)]
    for out, ref in zip(got, expected):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_agent_swin_dense_grids_are_the_official_ones():
    """The official downstream_agent_shapes 9-12-14-7 (7-7 in the Agent-Swin-S UperNet config, on its
    stage 3 of window blocks: the same model)."""
    with torch.device("meta"):
        small_seg = BACKBONES["AgentSwin"](arch="small", dense_schedule="seg")
        small_det = BACKBONES["AgentSwin"](arch="small", dense_schedule="det")
        classification = BACKBONES["AgentSwin"](arch="tiny", dense_schedule=None)

    def grids(backbone):
        return [sorted({b.attn.agent_shape for b in stage.blocks if hasattr(b.attn, "agent_shape")})
                for stage in backbone.model.stages]

    assert grids(small_seg) == [[(9, 9)], [(12, 12)], [], []]  # stages 3 and 4 are window blocks
    assert grids(small_det) == grids(small_seg)
    assert grids(classification) == [[(3, 3)], [(4, 4)], [(7, 7)], []]
    window_blocks = [b.attn for stage in small_seg.model.stages[2:] for b in stage.blocks]
    assert all(attn.pad_before_shift and attn.window_size == (7, 7) for attn in window_blocks)
    # the stage-4 window blocks keep their shift on the small maps of the dense layout
    assert [attn.shift_size for attn in small_seg.model.stages[3].blocks.modules() if hasattr(attn, "shift_size")] \
        == [(0, 0), (3, 3)]
    with torch.device("meta"):
        base = BACKBONES["AgentSwin"](arch="base", dense_schedule="seg")
    assert grids(base)[2] == [(14, 14)]


def test_official_dense_agent_pvt_checkpoint_loads_strictly_without_output_norms():
    sd = pvt.official_state_dict()
    checkpoint = {f"backbone.{k}": v for k, v in sd.items() if not k.startswith("head.")}
    backbone = BACKBONES["AgentPVT"](arch="tiny", dense_schedule="det", **{
        k: v for k, v in pvt.OVERRIDES.items() if k != "num_classes"}).eval()
    assert not any(name.startswith("norm") for name, _ in backbone.named_parameters())
    backbone.load_state_dict(backbone.convert_state_dict(checkpoint), strict=True)
    grids = [{b.attn.agent_shape for b in stage.blocks} for stage in backbone.model.stages]
    assert grids == [{(12, 12)}, {(16, 16)}, {(28, 28)}, {(28, 28)}]
    # at the trained size (no position-embedding resizing) the features are the official forward's
    # stage outputs with the agents re-pooled
    image = torch.randn(1, 3, pvt.IMG, pvt.IMG, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = backbone(image)
        expected = pvt.official_stages(sd, image, [(12, 12), (16, 16), (28, 28), (28, 28)])
    for out, ref in zip(got, expected):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
