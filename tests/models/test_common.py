"""Checks every registered ``visionzoo_*`` model must pass (timm API conventions).

Cheap checks (build on the meta device) run for every model; forward / backward checks run at low
resolution for the smallest variant of each family (``visionzoo_<family>_<size>``), and
``torch.compile`` for one model per model file, to keep the suite within the CI budget. The FX
checks are those of timm's own ``tests/test_models.py`` (which ``test_timm_suite.py`` runs over
every model at full size), here at low resolution and comparing gradients too.
"""
import functools
import math
import re
from collections import defaultdict

import pytest
import torch
import torch.nn as nn
import timm
from timm.models import get_notrace_functions, get_notrace_modules
from timm.models.vision_transformer import VisionTransformer
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import visionzoo  # noqa: F401  (registers the models)
from visionzoo.layers.token_merging import ToMeBlock

MODELS = timm.list_models("visionzoo_*")
_SIZE_RANK = {"m": 0, "t": 1, "s": 2, "b": 3, "l": 4}
# visionzoo_<family>_<size>[<variant>], e.g. visionzoo_swin_b_384, visionzoo_swin_free_b_dr12,
# visionzoo_vit_s_tome, visionzoo_coatnet_0, visionzoo_mambavision_t2, visionzoo_mambavision_l3_256
_NAME = re.compile(r"^(?P<family>.+?)_(?P<size>[mtsbl]|\d+)(?P<variant>\d+(?:_[a-z0-9]+)?|_[a-z0-9]+)?$")


def _family(name):
    if re.match(r"visionzoo_(se)?halonet", name):  # timm's halonet26t / sehalonet33ts / 50ts and the paper's h0-h7
        return "visionzoo_halonet"  # are one network class (timm's ByobNet with halo attention)
    match = _NAME.match(name)
    return match["family"] if match else name.rsplit("_", 1)[0]


def _rank(name):
    match = _NAME.match(name)
    if match is None:
        return (99, 1, name)
    size = match["size"]
    return (_SIZE_RANK[size] if size in _SIZE_RANK else int(size), match["variant"] is not None, name)


def _smallest(names, group_of):
    groups = defaultdict(list)
    for name in names:
        groups[group_of(name)].append(name)
    return sorted(min(group, key=_rank) for group in groups.values())


# the smallest variant of each family (name without the size) and, of those, one per model file
SMALLEST = _smallest(MODELS, _family)
COMPILE = _smallest(SMALLEST, lambda name: timm.models.model_entrypoint(name).__module__)
SIZE = 64
BATCH = 2


def _create(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, img_size=SIZE, **kwargs)


def _image(height=SIZE, width=SIZE):
    return torch.randn(BATCH, 3, height, width, generator=torch.Generator().manual_seed(1))


@functools.lru_cache(maxsize=None)
def _merges_tokens(name):
    """Token-merging models (ToMe): after merging, the tokens of a ViT no longer form a map."""
    with torch.device("meta"):
        return any(isinstance(module, ToMeBlock) for module in timm.create_model(name).modules())


# the checks below that expect [B, C, H, W] feature maps, or any input size, do not apply to them:
# they are timm's VisionTransformer (fixed img_size, timm's own input errors) whose features are
# token sets [B, N, C]; tests/models/test_tome.py checks those
MERGED_TOKENS = "merges tokens: timm's ViT with token-set features (checked in tests/models/test_tome.py)"


def _feature_info(model):
    return model.feature_info if isinstance(model.feature_info, list) else model.feature_info.info


def test_models_registered():
    assert MODELS and SMALLEST and COMPILE


@pytest.mark.parametrize("name", MODELS)
def test_build_and_pretrained_cfg(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    cfg = model.pretrained_cfg
    assert sum(p.numel() for p in model.parameters()) > 0
    first_conv = model.get_submodule(cfg["first_conv"])
    assert isinstance(first_conv, nn.Conv2d) and first_conv.in_channels == cfg["input_size"][0]
    classifier = model.get_submodule(cfg["classifier"])
    assert classifier is model.get_classifier()
    assert isinstance(classifier, nn.Linear) and classifier.out_features == cfg["num_classes"] == model.num_classes
    assert classifier.in_features == model.num_features == model.head_hidden_size
    info = _feature_info(model)
    assert info[-1]["num_chs"] == model.num_features
    assert [f["reduction"] for f in info] == sorted(f["reduction"] for f in info)
    if _merges_tokens(name):
        assert cfg["pool_size"] is None  # no final map
    else:
        assert tuple(cfg["pool_size"]) == tuple(s // info[-1]["reduction"] for s in cfg["input_size"][1:])
    for key in ("mean", "std", "crop_pct", "interpolation", "license"):
        assert cfg.get(key) is not None, key
    parameters = dict(model.named_parameters())
    no_weight_decay = model.no_weight_decay()
    if isinstance(model, VisionTransformer):  # timm's ViT names its optional tokens whether it has them or not
        no_weight_decay -= {"dist_token", "reg_token"}
    assert no_weight_decay <= parameters.keys()
    for coarse in (False, True):
        matcher = model.group_matcher(coarse=coarse)
        groups = timm.models.group_parameters(model, matcher)
        assert groups[0] == [n for n in parameters if re.match(matcher["stem"], n)]  # stem first
        assert len(groups) > len(info)  # stem, then at least one group per feature level


@pytest.mark.parametrize("name", MODELS)
def test_factory_device_and_dtype(name):
    # timm's factory arguments: every tensor created there, also the classifier of a reset
    model = timm.create_model(name, device="meta", dtype=torch.bfloat16)
    tensors = dict(model.named_parameters(), **dict(model.named_buffers()))
    assert all(t.device.type == "meta" for t in tensors.values())
    assert all(t.dtype == torch.bfloat16 for t in tensors.values() if t.is_floating_point())
    model.reset_classifier(0)
    model.reset_classifier(3)
    assert model.get_classifier().weight.device.type == "meta"
    assert model.get_classifier().weight.dtype == torch.bfloat16


@pytest.mark.parametrize("name", SMALLEST)
def test_forward_backward_reaches_every_parameter(name):
    model = _create(name).train()
    out = model(_image())
    assert out.shape == (BATCH, model.num_classes)
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", SMALLEST)
def test_num_classes_and_reset_classifier(name):
    model = _create(name, num_classes=10).eval()
    image = _image()
    with torch.no_grad():
        assert model(image).shape == (BATCH, 10)
        features = model.forward_features(image)
        pooled = model.forward_head(features, pre_logits=True)
        assert pooled.shape == (BATCH, model.num_features)
        model.reset_classifier(0)
        assert model(image).shape == (BATCH, model.num_features)
        torch.testing.assert_close(model(image), pooled)
        model.reset_classifier(5)
        assert model(image).shape == (BATCH, 5)
        assert model.get_classifier().out_features == 5


@pytest.mark.parametrize("name", SMALLEST)
def test_features_only_matches_feature_info(name):
    if _merges_tokens(name):
        pytest.skip(MERGED_TOKENS)
    model = _create(name, features_only=True).eval()
    with torch.no_grad():
        features = model(_image())
    assert len(features) == len(model.feature_info.channels())
    for feature, channels, reduction in zip(features, model.feature_info.channels(), model.feature_info.reduction()):
        assert feature.shape[:2] == (BATCH, channels)  # NCHW
        assert feature.shape[2:] == (math.ceil(SIZE / reduction),) * 2


@pytest.mark.parametrize("name", SMALLEST)
def test_forward_intermediates(name):
    if _merges_tokens(name):
        pytest.skip(MERGED_TOKENS)
    model = _create(name).eval()
    image = _image()
    info = _feature_info(model)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(image)
        torch.testing.assert_close(final, model.forward_features(image))
        assert len(intermediates) == len(info)
        for feature, entry in zip(intermediates, info):
            side = math.ceil(SIZE / entry["reduction"])
            assert feature.shape == (BATCH, entry["num_chs"], side, side)
        last = model.forward_intermediates(image, indices=1, intermediates_only=True, stop_early=True)
        torch.testing.assert_close(last[0], intermediates[-1])
        pruned = model.prune_intermediate_layers(indices=[0], prune_head=True)
        assert pruned == [0]
        first = model.forward_intermediates(image, indices=[0], intermediates_only=True)
        torch.testing.assert_close(first[0], intermediates[0])


@pytest.mark.parametrize("name", SMALLEST)
def test_grad_checkpointing_gives_same_output_and_gradients(name):
    model = _create(name).eval()
    image = _image().requires_grad_()
    plain = model(image)
    (plain_grad,) = torch.autograd.grad(plain.square().sum(), image)
    model.set_grad_checkpointing(True)
    checkpointed = model(image)
    (checkpointed_grad,) = torch.autograd.grad(checkpointed.square().sum(), image)
    torch.testing.assert_close(checkpointed, plain)
    torch.testing.assert_close(checkpointed_grad, plain_grad)


@pytest.mark.parametrize("height, width", [(96, 128), (100, 76), (33, 47)])
@pytest.mark.parametrize("name", SMALLEST)
def test_other_input_sizes(name, height, width):
    if _merges_tokens(name):
        pytest.skip(MERGED_TOKENS)
    model = _create(name).eval()
    image = _image(height, width)
    if model.pretrained_cfg.get("fixed_input_size"):  # e.g. norms over token positions
        with pytest.raises(ValueError, match=f"{height}x{width}"):
            model(image)
        return
    with torch.no_grad():
        assert model(image).shape == (BATCH, model.num_classes)
        features = model.forward_intermediates(image, intermediates_only=True)
    for feature, entry in zip(features, _feature_info(model)):
        assert feature.shape[2:] == (math.ceil(height / entry["reduction"]), math.ceil(width / entry["reduction"]))


@pytest.mark.parametrize("name", SMALLEST)
def test_state_dict_round_trip(name, tmp_path):
    model = _create(name).eval()
    path = tmp_path / "weights.pth"
    torch.save(model.state_dict(), path)
    torch.manual_seed(1)
    loaded = timm.create_model(name, img_size=SIZE, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    image = _image()
    with torch.no_grad():
        torch.testing.assert_close(loaded(image), model(image))


def _parameter_grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("name", COMPILE)
def test_torch_compile_without_graph_breaks_matches_eager(name):
    # aot_eager traces forward and backward through the attention custom ops (fake kernels) in one
    # graph; inductor code generation is checked once, in test_compile.py
    torch._dynamo.reset()
    model = _create(name).eval()
    image = _image()
    expected = model(image)
    expected.square().mean().backward()
    expected_grads = _parameter_grads(model)
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(image)
    torch.testing.assert_close(out, expected)
    out.square().mean().backward()
    grads = _parameter_grads(model)
    for key, grad in expected_grads.items():
        torch.testing.assert_close(grads[key], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")


def _fx_extractor(model):
    """The model's output node traced as timm's tests and feature extraction do (its leaves not traced into)."""
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    _, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(model, return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs), eval_nodes[-1]


@pytest.mark.parametrize("name", SMALLEST)
def test_fx_traced_model_matches_eager_forward_and_backward(name):
    model = _create(name).eval()
    image = _image()
    expected = model(image)
    expected.square().mean().backward()
    expected_grads = _parameter_grads(model)
    model.zero_grad(set_to_none=True)

    traced, output_node = _fx_extractor(model)
    out = traced(image)[output_node]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    out.square().mean().backward()
    grads = _parameter_grads(traced)
    assert grads.keys() == expected_grads.keys()
    for key, grad in expected_grads.items():
        torch.testing.assert_close(grads[key], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("name", SMALLEST)
def test_features_only_fx_matches_feature_getter(name):
    if _merges_tokens(name):
        pytest.skip(MERGED_TOKENS)
    torch.manual_seed(0)
    fx = timm.create_model(name, img_size=SIZE, features_only=True, feature_cls="fx").eval()
    torch.manual_seed(0)
    getter = timm.create_model(name, img_size=SIZE, features_only=True).eval()
    image = _image()
    with torch.no_grad():
        fx_features, features = fx(image), getter(image)
    assert len(fx_features) == len(features) == len(fx.feature_info.channels())
    for fx_feature, feature in zip(fx_features, features):
        # the graph returns the stage outputs in the model's own layout: channels-last [B, H, W, C] for
        # the families built on ChannelsLastModel, NCHW for those built on timm's NCHW networks
        if fx_feature.shape != feature.shape:
            fx_feature = fx_feature.permute(0, 3, 1, 2)
        torch.testing.assert_close(fx_feature, feature)


@pytest.mark.parametrize("name", SMALLEST)
def test_image_that_is_not_a_batch_is_refused(name):
    if _merges_tokens(name):
        pytest.skip(MERGED_TOKENS)
    model = _create(name).eval()
    with pytest.raises(ValueError, match=r"\[B, C, H, W\].*got shape \(3, 64, 64\).*unsqueeze"):
        model(torch.randn(3, SIZE, SIZE))
    with pytest.raises(ValueError, match=r"in_chans = 3, got shape \(2, 1, 64, 64\)"):
        model.forward_intermediates(torch.randn(2, 1, SIZE, SIZE))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        model.forward_features(torch.randn(1, 2, 3, SIZE, SIZE))


@pytest.mark.parametrize("name", MODELS)
def test_missing_pretrained_file_is_named(name, tmp_path):
    missing = tmp_path / "absent.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(f"pretrained_cfg_overlay['file']: no weights file at '{missing}'")):
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(missing)))


def test_weights_at_a_url_that_names_no_file_download_once_under_the_model_name(tmp_path, monkeypatch):
    """The official Agent-Attention weights live at ``.../f/<id>/?dl=1``: torch.hub would cache that
    under an empty file name (the cache directory itself); they are saved as ``<model>.<tag>.pth``."""
    name = "visionzoo_agent_deit_t"
    url = timm.models.get_pretrained_cfg(f"{name}.in1k").url
    assert url.endswith("/?dl=1")
    source = timm.create_model(name, num_classes=1000)
    calls = []

    def download(from_url, to_path, progress=True):
        calls.append((from_url, to_path))
        torch.save({"model": source.state_dict()}, to_path)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    for _ in range(2):
        model = timm.create_model(name, pretrained=True)
        for key, value in source.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), key
    assert calls == [(url, str(tmp_path / "hub" / "checkpoints" / f"{name}.in1k.pth"))]
