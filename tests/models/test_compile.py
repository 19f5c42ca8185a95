"""torch.compile with the default (inductor) backend: outputs and parameter gradients equal eager's.

Inductor generates C++ for CPU tensors, so this needs a C++ compiler. The shared checks in
test_common.py trace every family with the cheaper ``aot_eager`` backend.
"""
import shutil

import pytest
import timm
import torch

import visionzoo  # noqa: F401  (registers the models)

pytestmark = pytest.mark.skipif(
    not any(shutil.which(compiler) for compiler in ("g++", "c++", "clang++")),
    reason="torch.compile's inductor backend needs a C++ compiler for CPU tensors, none found",
)


def test_inductor_forward_and_backward_equal_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    # DiNAT-Mini's layout at two blocks per stage: NA and dilated NA (dilation 2 in stage 0 at
    # 64x64), conv downsamplers, head
    model = timm.create_model("visionzoo_dinat_m", img_size=64, depths=(2, 2, 2, 2), drop_path_rate=0.0)
    assert [block.attn.dilation for block in model.stages[0].blocks] == [(1, 1), (2, 2)]
    image = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))

    expected = model(image)
    expected.square().mean().backward()
    expected_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    out = torch.compile(model, fullgraph=True)(image)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    out.square().mean().backward()
    for name, grad in expected_grads.items():
        param = model.get_parameter(name)
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, grad, rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")
