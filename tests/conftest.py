"""Shared pytest setup: the environment the suite runs in, and the native-kernel fixture.

The suite controls the variables that would change what it tests: ``VISIONZOO_ATTN_BACKEND``
(the default backend) and ``VISIONZOO_NATIVE`` (``0`` turns the C++ kernels off) are removed, and
``TRITON_INTERPRET`` is set before triton is first imported (here, ahead of every test module):
``1``, so that the Triton kernels run on CPU tensors, unless ``--triton-compiled`` asks for the
compiled kernels (``pytest -m gpu --triton-compiled`` on a CUDA machine).
"""
import os

import pytest

CONTROLLED = ("VISIONZOO_ATTN_BACKEND", "VISIONZOO_NATIVE")

for _name in CONTROLLED:
    os.environ.pop(_name, None)
os.environ["TRITON_INTERPRET"] = "1"


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
