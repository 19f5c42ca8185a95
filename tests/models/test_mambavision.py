"""MambaVision against the official architecture, written here independently of visionzoo's code.

The official code (NVlabs/MambaVision ``mambavision/models/mamba_vision.py``) needs mamba_ssm's CUDA
scan, so it is not run: this file builds official-layout state dicts from the key / shape layout
of the official modules, and an NCHW reference forward with the official semantics (windows cut
once per stage from the zero-padded map, row-major tokens, the dt bias added twice, symmetric
depthwise convolutions, a sequential scan), and checks that the model loads them strictly and
gives the same logits. Parameter counts come from the official configuration arithmetic.
"""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import visionzoo  # noqa: F401  (registers the models)
from visionzoo.layers import MambaVisionMixer
from visionzoo.models.mambavision import attention_blocks, checkpoint_filter_fn

# the official configs (mamba_vision_{T,T2,S,B,L,L2,L3_256_21k})
OFFICIAL = {
    "visionzoo_mambavision_t": dict(depths=(1, 3, 8, 4), dim=80, in_dim=32, layer_scale=False),
    "visionzoo_mambavision_t2": dict(depths=(1, 3, 11, 4), dim=80, in_dim=32, layer_scale=False),
    "visionzoo_mambavision_s": dict(depths=(3, 3, 7, 5), dim=96, in_dim=64, layer_scale=False),
    "visionzoo_mambavision_b": dict(depths=(3, 3, 10, 5), dim=128, in_dim=64, layer_scale=True),
    "visionzoo_mambavision_l": dict(depths=(3, 3, 10, 5), dim=196, in_dim=64, layer_scale=True),
    "visionzoo_mambavision_l2": dict(depths=(3, 3, 12, 5), dim=196, in_dim=64, layer_scale=True),
    "visionzoo_mambavision_l3_256": dict(depths=(3, 3, 20, 10), dim=256, in_dim=64, layer_scale=True),
}
# /work/shared/specs/hybrids.md: the official code's parameter counts, in millions
SPEC_PARAMS_M = {
    "visionzoo_mambavision_t": 31.79, "visionzoo_mambavision_t2": 35.10, "visionzoo_mambavision_s": 50.14,
    "visionzoo_mambavision_b": 97.69, "visionzoo_mambavision_l": 227.96, "visionzoo_mambavision_l2": 241.55,
    "visionzoo_mambavision_l3_256": 739.57,
}
D_STATE, D_CONV, MLP_RATIO = 8, 3, 4


def is_attention(depth, j):
    """The official ``transformer_blocks`` of a windowed stage."""
    first = depth // 2 + 1 if depth % 2 else depth // 2
    return first <= j < depth


def official_shapes(arch, num_classes=1000):
    """Key -> shape of the official model's state dict (parameters and BatchNorm buffers)."""
    shapes = {}

    def batch_norm(prefix, channels):
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (channels,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    dim, in_dim, depths = arch["dim"], arch["in_dim"], arch["depths"]
    shapes["patch_embed.conv_down.0.weight"] = (in_dim, 3, 3, 3)
    batch_norm("patch_embed.conv_down.1", in_dim)
    shapes["patch_embed.conv_down.3.weight"] = (dim, in_dim, 3, 3)
    batch_norm("patch_embed.conv_down.4", dim)
    for i, depth in enumerate(depths):
        c = dim * 2**i
        for j in range(depth):
            p = f"levels.{i}.blocks.{j}."
            if i < 2:
                for conv in ("conv1", "conv2"):
                    shapes[p + conv + ".weight"], shapes[p + conv + ".bias"] = (c, c, 3, 3), (c,)
                batch_norm(p + "norm1", c)
                batch_norm(p + "norm2", c)
                continue
            for norm in ("norm1", "norm2"):
                shapes[p + norm + ".weight"] = shapes[p + norm + ".bias"] = (c,)
            shapes[p + "mlp.fc1.weight"], shapes[p + "mlp.fc1.bias"] = (MLP_RATIO * c, c), (MLP_RATIO * c,)
            shapes[p + "mlp.fc2.weight"], shapes[p + "mlp.fc2.bias"] = (c, MLP_RATIO * c), (c,)
            if arch["layer_scale"]:
                shapes[p + "gamma_1"] = shapes[p + "gamma_2"] = (c,)
            if is_attention(depth, j):
                shapes[p + "mixer.qkv.weight"], shapes[p + "mixer.qkv.bias"] = (3 * c, c), (3 * c,)
                shapes[p + "mixer.proj.weight"], shapes[p + "mixer.proj.bias"] = (c, c), (c,)
            else:
                rank, half = math.ceil(c / 16), c // 2
                shapes[p + "mixer.in_proj.weight"] = (c, c)
                shapes[p + "mixer.x_proj.weight"] = (rank + 2 * D_STATE, half)
                shapes[p + "mixer.dt_proj.weight"], shapes[p + "mixer.dt_proj.bias"] = (half, rank), (half,)
                shapes[p + "mixer.A_log"] = (half, D_STATE)
                shapes[p + "mixer.D"] = (half,)
                shapes[p + "mixer.out_proj.weight"] = (c, c)
                shapes[p + "mixer.conv1d_x.weight"] = shapes[p + "mixer.conv1d_z.weight"] = (half, 1, D_CONV)
        if i < len(depths) - 1:
            shapes[f"levels.{i}.downsample.reduction.0.weight"] = (2 * c, c, 3, 3)
    features = dim * 2 ** (len(depths) - 1)
    batch_norm("norm", features)
    shapes["head.weight"], shapes["head.bias"] = (num_classes, features), (num_classes,)
    return shapes


def official_state_dict(arch, num_classes=10, seed=0):
    """Random official-layout weights, scaled so that activations stay O(1)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in official_shapes(arch, num_classes).items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0)
        elif key.endswith("A_log"):  # A = -exp(A_log) around -(1 .. d_state)
            state[key] = torch.log(torch.arange(1.0, D_STATE + 1)).repeat(shape[0], 1) + 0.1 * torch.randn(
                shape, generator=generator)
        elif key.endswith(("running_var", "norm1.weight", "norm2.weight", "norm.weight", ".1.weight", ".4.weight", "D")):
            state[key] = 1 + 0.2 * torch.rand(shape, generator=generator)
        elif key.endswith(("gamma_1", "gamma_2")):
            state[key] = 0.5 + 0.5 * torch.rand(shape, generator=generator)
        elif len(shape) == 1:
            state[key] = 0.1 * torch.randn(shape, generator=generator)
        else:
            fan_in = math.prod(shape[1:])
            state[key] = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
    return state


# ----------------------------------------------------------------------------------------------
# independent reference forward (NCHW, as the official code)
# ----------------------------------------------------------------------------------------------
def _batch_norm(sd, prefix, x, eps=1e-5):
    return F.batch_norm(x, sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"], sd[f"{prefix}.weight"],
                        sd[f"{prefix}.bias"], False, 0.0, eps)


def _mixer(sd, p, x):
    """The official MambaVisionMixer on ``[b, L, C]`` with a sequential scan."""
    channels = x.shape[-1]
    half = channels // 2
    xz = F.linear(x, sd[p + "in_proj.weight"]).transpose(1, 2)  # [b, C, L]
    u = F.silu(F.conv1d(xz[:, :half], sd[p + "conv1d_x.weight"], padding=(D_CONV - 1) // 2, groups=half))
    z = F.silu(F.conv1d(xz[:, half:], sd[p + "conv1d_z.weight"], padding=(D_CONV - 1) // 2, groups=half))
    dbl = F.linear(u.transpose(1, 2), sd[p + "x_proj.weight"])  # [b, L, rank + 2N]
    rank = dbl.shape[-1] - 2 * D_STATE
    dt, b_ssm, c_ssm = dbl[..., :rank], dbl[..., rank:rank + D_STATE], dbl[..., rank + D_STATE:]
    bias = sd[p + "dt_proj.bias"]
    delta = F.softplus(F.linear(dt, sd[p + "dt_proj.weight"], bias) + bias)  # [b, L, half]: the bias twice
    a = -torch.exp(sd[p + "A_log"])  # [half, N]
    state = x.new_zeros(x.shape[0], half, D_STATE)
    ys = []
    for step in range(x.shape[1]):
        d = delta[:, step, :, None]
        state = torch.exp(d * a) * state + d * u[:, :, step, None] * b_ssm[:, step, None, :]
        ys.append((state * c_ssm[:, step, None, :]).sum(-1))
    y = torch.stack(ys, dim=-1) + sd[p + "D"][:, None] * u
    return F.linear(torch.cat([y, z], dim=1).transpose(1, 2), sd[p + "out_proj.weight"])


def _attention(sd, p, x, num_heads):
    b, n, c = x.shape
    qkv = F.linear(x, sd[p + "qkv.weight"], sd[p + "qkv.bias"]).reshape(b, n, 3, num_heads, c // num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-2, -1) * (c // num_heads) ** -0.5).softmax(-1)
    return F.linear((attn @ v).transpose(1, 2).reshape(b, n, c), sd[p + "proj.weight"], sd[p + "proj.bias"])


def official_forward(sd, arch, image, num_heads, windows):
    x = F.relu(_batch_norm(sd, "patch_embed.conv_down.1", F.conv2d(image, sd["patch_embed.conv_down.0.weight"],
                                                                   stride=2, padding=1), eps=1e-4))
    x = F.relu(_batch_norm(sd, "patch_embed.conv_down.4", F.conv2d(x, sd["patch_embed.conv_down.3.weight"],
                                                                   stride=2, padding=1), eps=1e-4))
    depths = arch["depths"]
    for i, depth in enumerate(depths):
        if i < 2:
            for j in range(depth):
                p = f"levels.{i}.blocks.{j}."
                y = _batch_norm(sd, p + "norm1", F.conv2d(x, sd[p + "conv1.weight"], sd[p + "conv1.bias"], padding=1))
                y = F.gelu(y, approximate="tanh")
                x = x + _batch_norm(sd, p + "norm2", F.conv2d(y, sd[p + "conv2.weight"], sd[p + "conv2.bias"], padding=1))
        else:
            batch, channels, height, width = x.shape
            w = windows[i]
            x = F.pad(x, (0, -width % w, 0, -height % w))
            hp, wp = x.shape[2:]
            t = x.view(batch, channels, hp // w, w, wp // w, w).permute(0, 2, 4, 3, 5, 1).reshape(-1, w * w, channels)
            for j in range(depth):
                p = f"levels.{i}.blocks.{j}."
                h = F.layer_norm(t, (channels,), sd[p + "norm1.weight"], sd[p + "norm1.bias"])
                h = _attention(sd, p + "mixer.", h, num_heads[i]) if is_attention(depth, j) else _mixer(sd, p + "mixer.", h)
                t = t + (sd[p + "gamma_1"] * h if arch["layer_scale"] else h)
                h = F.layer_norm(t, (channels,), sd[p + "norm2.weight"], sd[p + "norm2.bias"])
                h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                             sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
                t = t + (sd[p + "gamma_2"] * h if arch["layer_scale"] else h)
            x = t.reshape(batch, hp // w, wp // w, w, w, channels).permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, hp, wp)
            x = x[:, :, :height, :width]
        if i < len(depths) - 1:
            x = F.conv2d(x, sd[f"levels.{i}.downsample.reduction.0.weight"], stride=2, padding=1)
    x = _batch_norm(sd, "norm", x).mean(dim=(2, 3))
    return F.linear(x, sd["head.weight"], sd["head.bias"])


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------
def official_param_count(arch, num_classes=1000):
    """From the official configuration: stem, conv blocks, mixer / attention blocks, downsamplers, head."""
    dim, in_dim, depths = arch["dim"], arch["in_dim"], arch["depths"]
    total = 27 * in_dim + 2 * in_dim + 9 * in_dim * dim + 2 * dim
    for i, depth in enumerate(depths):
        c = dim * 2**i
        for j in range(depth):
            if i < 2:
                total += 2 * (9 * c * c + c) + 2 * 2 * c
                continue
            total += 4 * c + 2 * MLP_RATIO * c * c + MLP_RATIO * c + c + (2 * c if arch["layer_scale"] else 0)
            if is_attention(depth, j):
                total += 4 * c * c + 4 * c
            else:
                rank, half = math.ceil(c / 16), c // 2
                total += 2 * c * c + half * (rank + 2 * D_STATE) + rank * half + half + half * D_STATE + half + 2 * half * D_CONV
        if i < len(depths) - 1:
            total += 18 * c * c
    features = dim * 2 ** (len(depths) - 1)
    return total + 2 * features + features * num_classes + num_classes


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_parameter_counts_equal_the_official_code(name):
    arch = OFFICIAL[name]
    with torch.device("meta"):
        model = timm.create_model(name)
    counted = sum(p.numel() for p in model.parameters())
    assert counted == official_param_count(arch)
    assert round(counted / 1e6, 2) == SPEC_PARAMS_M[name]
    # and the state dict has the official keys and shapes, renamed
    official = {key: torch.empty(shape, device="meta") for key, shape in official_shapes(arch).items()}
    renamed = {key: tuple(value.shape) for key, value in checkpoint_filter_fn(official, model).items()}
    assert {key: tuple(value.shape) for key, value in model.state_dict().items()} == renamed


def test_attention_blocks_are_the_official_second_halves():
    # /work/shared/specs/hybrids.md: T 4-7 / 2-3, T2 6-10 / 2-3, S 4-6 / 3-4, B 5-9 / 3-4
    assert [list(attention_blocks(d)) for d in (8, 4, 11, 7, 5, 10)] == [
        [4, 5, 6, 7], [2, 3], [6, 7, 8, 9, 10], [4, 5, 6], [3, 4], [5, 6, 7, 8, 9]]
    assert list(attention_blocks(1)) == []


# small widths, odd and even depths, windows that need padding and several windows per map
TINY = dict(dim=16, in_dim=8, depths=(1, 2, 3, 2), num_heads=(1, 1, 2, 4), window_size=(8, 8, 3, 2))


@pytest.mark.parametrize("name, height, width", [
    ("visionzoo_mambavision_t", 72, 88),  # stage 3: 5x6 padded to 6x6 (4 windows); stage 4: 3x3 padded to 4x4
    ("visionzoo_mambavision_b", 64, 64),  # layer scale
])
def test_official_checkpoint_loads_strictly_and_matches_the_reference_forward(name, height, width, tmp_path):
    arch = dict(OFFICIAL[name], dim=TINY["dim"], in_dim=TINY["in_dim"], depths=TINY["depths"])
    official = official_state_dict(arch)
    path = tmp_path / "official.pth.tar"
    torch.save({"state_dict": official, "epoch": 300}, path)
    # timm loads strictly (the classifier too, as the checkpoint's class count is declared)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
                              num_classes=10, **TINY).eval()
    image = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = official_forward(official, arch, image, TINY["num_heads"], TINY["window_size"])
        logits = model(image)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_padded_tokens_take_part():
    """The map is padded to whole windows before the blocks, and the padding changes the result of
    the real tokens (the official behaviour): a 3x3 map in a 3x3 window differs from the same map
    in a 4x4 window, whose padding reaches every real token through the scan and the attention."""
    torch.manual_seed(0)
    exact = timm.create_model("visionzoo_mambavision_t", num_classes=0, **dict(TINY, window_size=3)).eval()
    padded = timm.create_model("visionzoo_mambavision_t", num_classes=0, **dict(TINY, window_size=4)).eval()
    padded.load_state_dict(exact.state_dict())
    image = torch.randn(1, 3, 96, 96)  # stages 3 and 4: 6x6 (four 3x3 windows) and 3x3
    with torch.no_grad():
        features = [m.forward_intermediates(image, indices=[3], intermediates_only=True)[0] for m in (exact, padded)]
    assert features[0].shape == features[1].shape == (1, 128, 3, 3)
    assert (features[1] - features[0]).abs().max() > 1e-3


def test_mixer_rejects_odd_widths_and_the_model_bad_windows():
    with pytest.raises(ValueError, match="dim must be even"):
        MambaVisionMixer(15)
    with pytest.raises(ValueError, match=r"window_size must be one int or one per stage \(4\)"):
        timm.create_model("visionzoo_mambavision_t", window_size=(7, 7))
    with pytest.raises(ValueError, match="window_size must be >= 1"):
        timm.create_model("visionzoo_mambavision_t", window_size=(8, 8, 0, 7))
