"""Token merging (ToMe) on timm ViTs, against an independent statement of the published algorithm.

The reference below is written from the algorithm's description, per image and with explicit
index lists, not from the implementation under test:

- matching: sets A = tokens 0, 2, 4, ..., B = tokens 1, 3, 5, ...; the metric is the attention keys
  averaged over heads, compared by cosine similarity; a class token (first) is never merged, no
  token is merged into a distillation token (second); each A token picks its most similar B token;
  the r = min(r, (N - protected) // 2) A tokens with the highest similarity are merged into their
  picks (ranked by ``argsort(descending=True)``); when r is 0 the tokens stay as they are;
- merge: size-weighted mean (sum of size * x over the tokens joined, divided by the summed size);
- order after the merge: the unmerged A tokens (in spatial order when there is a class token,
  otherwise in descending-similarity order), then the B tokens; with a distillation token the
  class token and distillation token come first;
- proportional attention: log(size) of each key added to the logits, softmax written out;
- the merge happens after the attention residual and before the MLP.
"""
import math

import pytest
import timm
import torch

from visionzoo import apply_tome, remove_tome
from visionzoo.layers.token_merging import (
    Merge2dConfig,
    ToMeBlock,
    _pool_2d,
    apply_merge2d,
    bipartite_soft_matching_2d,
    merge2d_preset,
    parse_r,
    patch_token_ids,
    remove_merge2d,
)


def _reference_match(keys, r, class_token, distill_token):
    """For one image's keys [N, C]: (kept A positions in output order, [(A position, B position)] merged), or None."""
    tokens = keys.shape[0]
    r = min(r, (tokens - int(class_token) - int(distill_token)) // 2)
    if r <= 0:
        return None
    metric = keys / keys.norm(dim=-1, keepdim=True)
    a_positions, b_positions = list(range(0, tokens, 2)), list(range(1, tokens, 2))
    best_score, best_match = [], []
    for i, a in enumerate(a_positions):
        similarity = torch.stack([metric[a] @ metric[b] for b in b_positions])
        if class_token and i == 0:
            similarity[:] = -math.inf
        if distill_token:
            similarity[0] = -math.inf
        best_score.append(similarity.max())
        best_match.append(b_positions[int(similarity.argmax())])
    ranking = torch.stack(best_score).argsort(descending=True).tolist()
    merged = [(a_positions[i], best_match[i]) for i in ranking[:r]]
    kept = [a_positions[i] for i in ranking[r:]]
    if class_token:
        kept = sorted(kept)
    return kept, merged


def _reference_merge(x, size, kept, merged, distill_token):
    """One image's tokens x [N, C] and sizes [N] after merging A into B as matched."""
    groups = {b: [b] for b in range(1, x.shape[0], 2)}
    for a, b in merged:
        groups[b].append(a)
    order = [[a] for a in kept] + [groups[b] for b in sorted(groups)]
    if distill_token:
        order = order[:1] + order[len(kept):len(kept) + 1] + order[1:len(kept)] + order[len(kept) + 1:]
    new_x = torch.stack([(x[group] * size[group, None]).sum(0) / size[group].sum() for group in order])
    new_size = torch.stack([size[group].sum() for group in order])
    return new_x, new_size


def _reference_forward(model, image, schedule, prop_attn=True):
    """Logits of a timm VisionTransformer run as ToMe, image by image."""
    class_token = model.cls_token is not None
    distill_token = getattr(model, "dist_token", None) is not None
    logits = []
    for one in image:
        x = model._pos_embed(model.patch_embed(one[None]))[0]
        size = torch.ones(x.shape[0])
        for block, r in zip(model.blocks, schedule):
            attn = block.attn
            tokens = x.shape[0]
            q, k, v = attn.qkv(block.norm1(x)).reshape(tokens, 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
            q, k = attn.q_norm(q), attn.k_norm(k)
            scores = q @ k.transpose(-1, -2) * attn.head_dim ** -0.5
            if prop_attn:
                scores = scores + size.log()
            heads = scores.softmax(dim=-1) @ v
            x = x + block.ls1(attn.proj(heads.transpose(0, 1).reshape(tokens, -1)))
            matches = _reference_match(k.mean(0), r, class_token, distill_token)
            if matches is not None:
                x, size = _reference_merge(x, size, *matches, distill_token)
            x = x + block.ls2(block.mlp(block.norm2(x)))
        logits.append(model.forward_head(model.norm(x)[None])[0])
    return torch.stack(logits)


def _model(name="vit_small_patch16_224", img_size=160, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, img_size=img_size, **kwargs).eval()


def _image(batch=2, img_size=160):
    return torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))


def _relative_error(actual, expected):
    return float((actual - expected).norm() / expected.norm())


@pytest.mark.parametrize("r", [8, 13])
def test_vit_small_equals_reference(r):
    model, image = _model(), _image()
    with torch.no_grad():
        expected = _reference_forward(model, image, [r] * 12)
        logits = apply_tome(model, r)(image)
    assert _relative_error(logits, expected) < 1e-4
    # 101 tokens: r tokens per block while the clamp (half the patch tokens) allows
    sizes = [101]
    for _ in range(12):
        sizes.append(sizes[-1] - min(r, (sizes[-1] - 1) // 2))
    assert [s.shape[1] if s is not None else 101 for s in model._tome_state.size] == sizes
    # and not what the unmerged model gives
    with torch.no_grad():
        assert _relative_error(remove_tome(model)(image), expected) > 1e-2


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("vit_small_patch16_224", dict(class_token=False, global_pool="avg")),  # descending-similarity order
        ("deit_small_distilled_patch16_224", {}),
        ("deit3_small_patch16_224", {}),  # LayerScale
        ("vit_small_patch16_224", dict(qk_norm=True, init_values=0.1)),
    ],
)
def test_variants_equal_reference(name, kwargs):
    model, image = _model(name, img_size=96, depth=4, **kwargs), _image(img_size=96)
    schedule = [6, 3, 0, 5]
    with torch.no_grad():
        expected = _reference_forward(model, image, schedule)
        assert _relative_error(apply_tome(model, schedule)(image), expected) < 1e-4
        expected = _reference_forward(model, image, schedule, prop_attn=False)
        assert _relative_error(apply_tome(model, schedule, prop_attn=False)(image), expected) < 1e-4


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("vit_small_patch16_224", {}),
        ("vit_small_patch16_224", dict(init_values=0.1)),
        ("vit_small_patch16_224", dict(qk_norm=True, init_values=0.1)),
        ("deit3_small_patch16_224", {}),
        ("deit_small_distilled_patch16_224", {}),
    ],
)
def test_r0_and_remove_restore_the_model_exactly(name, kwargs):
    model, image = _model(name, img_size=96, depth=3, **kwargs), _image(img_size=96)
    model_class = type(model)
    with torch.no_grad():
        expected = model(image)
        assert torch.equal(apply_tome(model, 0)(image), expected)
        assert not torch.equal(apply_tome(model, 4)(image), expected)
        state = model.state_dict()
        remove_tome(model)
        assert torch.equal(model(image), expected)
    assert type(model) is model_class
    assert all(type(block) is timm.models.vision_transformer.Block for block in model.blocks)
    assert not any(block.attn.k_norm._forward_hooks for block in model.blocks)
    assert not hasattr(model, "_tome_state") and not hasattr(model.blocks[0], "_tome_r")
    assert state.keys() == model.state_dict().keys()  # no parameters or buffers added


def test_training_mode_backward_and_grad_checkpointing():
    model = _model(img_size=64, depth=3, drop_path_rate=0.0).train()
    apply_tome(model, 4)
    image = _image(img_size=64).requires_grad_()
    plain = model(image)
    (plain_grad,) = torch.autograd.grad(plain.square().sum(), image)
    model.set_grad_checkpointing(True)
    checkpointed = model(image)
    (checkpointed_grad,) = torch.autograd.grad(checkpointed.square().sum(), image)
    torch.testing.assert_close(checkpointed, plain)
    torch.testing.assert_close(checkpointed_grad, plain_grad)


def test_distillation_and_class_tokens_are_never_merged():
    model = _model("deit_small_distilled_patch16_224", img_size=64, depth=4)
    apply_tome(model, 100, trace_source=True)  # clamped: as many merges as the tokens allow
    with torch.no_grad():
        model(_image(img_size=64))
    source = model._tome_state.source[-1]
    assert source.shape == (2, 3, 18)  # 16 patches + 2 protected -> 2 protected + 1 merged token
    torch.testing.assert_close(source[:, 0], torch.eye(18)[0].expand(2, 18))
    torch.testing.assert_close(source[:, 1], torch.eye(18)[1].expand(2, 18))


def test_source_map_and_patch_token_ids():
    model = _model()
    apply_tome(model, 13, trace_source=True)
    image = _image()
    ids = patch_token_ids(model, image)
    state = model._tome_state
    source, size = state.source[-1], state.size[-1]
    assert ids.shape == (2, 10, 10) and ids.dtype == torch.long
    assert source.shape == (2, size.shape[1], 101)
    # every input token sits in exactly one output token, and a token's size is its source count
    torch.testing.assert_close(source.sum(dim=1), torch.ones(2, 101))
    assert source.sum(dim=(1, 2)).tolist() == [101.0, 101.0]
    torch.testing.assert_close(source.sum(dim=-1, keepdim=True), size)
    assert ids.min() >= 1 and ids.max() < size.shape[1]  # the class token holds no patch
    counts = torch.stack([torch.bincount(i.flatten(), minlength=size.shape[1]) for i in ids])
    torch.testing.assert_close(counts[:, 1:].float(), size[:, 1:, 0])
    with pytest.raises(ValueError, match="trace_source=True"):
        patch_token_ids(apply_tome(model, 13), image)


def test_schedules():
    assert parse_r(4, 3) == [3, 3, 3, 3]
    assert parse_r(4, [5, 1]) == [5, 1, 0, 0]
    assert parse_r(5, (4, 0.5)) == [2, 3, 4, 5, 6]  # mean r, rising: merges more in late blocks
    assert parse_r(5, (4, -0.5)) == [6, 5, 4, 3, 2]
    assert parse_r(1, (4, 1.0)) == [0]
    model = apply_tome(_model(img_size=96, depth=4), [5, 0, 2])
    assert [block._tome_r for block in model.blocks] == [5, 0, 2, 0]
    with torch.no_grad():
        model(_image(img_size=96))
    assert [s.shape[1] for s in model._tome_state.size[1:]] == [32, 32, 30, 30]


@pytest.mark.parametrize(
    "r, error, match",
    [
        (-1, ValueError, "r must be >= 0"),
        ([2, -1], ValueError, "per-layer values must be >= 0"),
        ([1] * 5, ValueError, "per-layer list of 5 values for a model of 4 blocks"),
        ((4, 1.5), ValueError, "inflection must lie in"),
        (2.5, TypeError, "r must be an int"),
        ([1.5], TypeError, "per-layer list must hold ints"),
    ],
)
def test_bad_r_is_refused(r, error, match):
    model = _model(img_size=64, depth=4)
    with pytest.raises(error, match=match):
        apply_tome(model, r)
    assert type(model.blocks[0]) is not ToMeBlock  # nothing patched


def test_unsupported_models_are_refused():
    with pytest.raises(TypeError, match="ResNet has no global-attention transformer block"):
        apply_tome(timm.create_model("resnet10t"), 4)
    with pytest.raises(TypeError, match="its blocks are ResPostBlock"):
        post_norm = timm.models.vision_transformer.ResPostBlock
        apply_tome(timm.create_model("vit_small_patch16_224", img_size=64, depth=2, block_fn=post_norm), 4)
    with pytest.raises(TypeError, match="register tokens"):
        apply_tome(timm.create_model("vit_small_patch16_224", img_size=64, depth=2, reg_tokens=4), 4)
    model = apply_tome(_model(img_size=64, depth=2), 4)
    with pytest.raises(ValueError, match="attn_mask and is_causal"):
        model.blocks[0](torch.randn(1, 17, 384), attn_mask=torch.zeros(17, 17))


# 2D merging (Segformer++) --------------------------------------------------------------------


def test_merge2d_ratio_0_and_remove_restore_the_model_exactly():
    model, image = _model(img_size=96, depth=3, init_values=0.1), _image(img_size=96)
    with torch.no_grad():
        expected = model(image)
        assert torch.equal(apply_merge2d(model, Merge2dConfig(q_ratio=0.0, kv_ratio=0.0))(image), expected)
        assert not torch.equal(apply_merge2d(model, "fast")(image), expected)
        assert torch.equal(remove_merge2d(model)(image), expected)
    assert all(type(block) is timm.models.vision_transformer.Block for block in model.blocks)
    assert not model.patch_embed._forward_hooks


@pytest.mark.parametrize(
    "grid, cell, ratio, tokens_left",
    [((8, 8), (2, 2), 0.5, 32), ((8, 8), (2, 2), 0.9, 16), ((7, 5), (2, 2), 0.9, 6), ((8, 8), (4, 4), 0.8, 13)],
)
def test_merge2d_groups_are_cell_destinations_with_mean_values(grid, cell, ratio, tokens_left):
    tokens = grid[0] * grid[1]
    x = torch.randn(2, tokens, 8, generator=torch.Generator().manual_seed(0))
    merge, unmerge = bipartite_soft_matching_2d(x, grid, cell, ratio)
    merged = merge(x)
    # r = int(N * ratio), capped at the tokens outside the cells' top-left corners
    assert merged.shape == (2, tokens_left, 8)
    assert tokens - tokens_left == min(int(tokens * ratio), tokens - (grid[0] // cell[0]) * (grid[1] // cell[1]))
    group = unmerge(torch.arange(tokens_left, dtype=x.dtype)[None, :, None].expand(2, -1, 1))[..., 0].long()
    torch.testing.assert_close(merge(unmerge(merged)), merged)
    rows, cols = torch.arange(tokens) // grid[1], torch.arange(tokens) % grid[1]
    in_whole_cell = (rows < grid[0] // cell[0] * cell[0]) & (cols < grid[1] // cell[1] * cell[1])
    is_dst = (rows % cell[0] == 0) & (cols % cell[1] == 0) & in_whole_cell
    for b in range(2):
        for g in range(tokens_left):
            members = (group[b] == g).nonzero()[:, 0]
            torch.testing.assert_close(merged[b, g], x[b, members].mean(0))
            if len(members) > 1:  # a merged token: sources averaged into one cell destination
                assert int(is_dst[members].sum()) == 1
        destination_groups = group[b, is_dst].tolist()
        assert len(set(destination_groups)) == len(destination_groups)  # destinations are never merged together


def test_merge2d_presets_keep_the_full_map():
    hq_first, hq_second = Merge2dConfig(kv_ratio=0.6, kv_cell=(2, 2)), Merge2dConfig(q_ratio=0.8, q_cell=(4, 4))
    assert merge2d_preset("hq", 4) == [hq_first] * 2 + [hq_second] * 2
    assert merge2d_preset("fast", 2) == [Merge2dConfig(q_ratio=0.9, q_cell=(4, 4), kv_ratio=0.9, kv_cell=(4, 4))] * 2
    assert merge2d_preset("2x2", 1) == [Merge2dConfig(q_pool=True, q_cell=(2, 2))]
    model = _model(img_size=64, depth=4, dynamic_img_size=True)
    image = _image(img_size=64)
    wide = torch.cat([image, image], -1)
    with torch.no_grad():
        expected = model.forward_intermediates(wide, intermediates_only=True)
        for preset in ("hq", "fast", "2x2"):
            features = apply_merge2d(model, preset).forward_intermediates(wide, intermediates_only=True)
            assert [f.shape for f in features] == [(2, 384, 4, 8)] * 4  # a 64 x 128 input: 4 x 8 patches
            assert not torch.allclose(features[-1], expected[-1])


def test_merge2d_query_pooling_is_cell_average_and_nearest_upsampling():
    merge, unmerge, positions = _pool_2d((5, 4), (2, 2))
    x = torch.randn(1, 20, 3)
    pooled = merge(x)
    assert pooled.shape == (1, 6, 3)
    grid = x.reshape(5, 4, 3)
    torch.testing.assert_close(pooled[0, 0], grid[:2, :2].reshape(-1, 3).mean(0))
    torch.testing.assert_close(pooled[0, 5], grid[4:, 2:].reshape(-1, 3).mean(0))  # the partial last row
    up = unmerge(pooled).reshape(5, 4, 3)
    torch.testing.assert_close(up[1, 1], pooled[0, 0])
    torch.testing.assert_close(up[4, 3], pooled[0, 5])


def test_merge2d_refuses_bad_settings():
    model = _model(img_size=64, depth=2)
    with pytest.raises(ValueError, match="preset must be 'hq', 'fast' or '2x2'"):
        apply_merge2d(model, "turbo")
    with pytest.raises(ValueError, match="q_ratio must lie in"):
        Merge2dConfig(q_ratio=1.0)
    with pytest.raises(ValueError, match="one Merge2dConfig per block"):
        apply_merge2d(model, [Merge2dConfig()])
    apply_tome(model, 2)
    with pytest.raises(TypeError, match=r"undo the other merging first: remove_tome\(model\)"):
        apply_merge2d(model, "hq")
    remove_tome(model)
    apply_merge2d(model, "hq")
    with pytest.raises(TypeError, match=r"remove_merge2d\(model\)"):
        apply_tome(model, 2)
