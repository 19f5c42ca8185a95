"""Kernel tests parametrized over backends: those that force a C++ implementation (``"cpu"``,
``"cpu:window"``, ``"cpu:blocks"`` and the old names ``"native"`` / ``"blocked"``) are skipped with
the reason when the native kernels cannot be built."""
import pytest

from visionzoo.kernels.dispatch import ALIASES


@pytest.fixture(autouse=True)
def _cpu_backends_need_the_native_kernel(request):
    callspec = getattr(request.node, "callspec", None)
    if callspec is None:
        return
    for value in callspec.params.values():
        if isinstance(value, str) and ALIASES.get(value, value).startswith("cpu"):
            request.getfixturevalue("native_kernel")
            return
