"""Shared pytest setup: the environment the suite runs in, and the native-kernel fixture.

The suite controls the variables that would change what it tests: ``VISIONZOO_ATTN_BACKEND``
(the default backend) and ``VISIONZOO_NATIVE`` (``0`` turns the C++ kernels off) are removed, and
``TRITON_INTERPRET`` is set before triton is first imported (here, ahead of every test module):
``1``, so that the Triton kernels run on CPU tensors, unless the compiled kernels are asked for
on a machine with a CUDA device: ``--triton-compiled``, or ``TRITON_INTERPRET=0`` set explicitly
(``TRITON_INTERPRET=0 pytest -m gpu``). Without a CUDA device the interpreter is always used.
"""
import os

import pytest
import torch

CONTROLLED = ("VISIONZOO_ATTN_BACKEND", "VISIONZOO_NATIVE")

for _name in CONTROLLED:
    os.environ.pop(_name, None)
_COMPILED_ASKED = os.environ.get("TRITON_INTERPRET") == "0" and torch.cuda.is_available()
os.environ["TRITON_INTERPRET"] = "0" if _COMPILED_ASKED else "1"


def pytest_addoption(parser):
    parser.addoption("--triton-compiled", action="store_true",
                     help="run the Triton kernels compiled (TRITON_INTERPRET=0; needs CUDA) instead of interpreted")


def pytest_configure(config):
    if config.getoption("--triton-compiled"):
        os.environ["TRITON_INTERPRET"] = "0"


@pytest.fixture
def native_kernel():
    """The C++ CPU kernels; the test is skipped, with the reason, when they cannot be built (no C++
    compiler, or a failed build)."""
    from visionzoo.kernels import native

    if not native.available():
        pytest.skip(f"needs the native C++ kernels: {native.unavailable_reason()}")
    return native
