"""Shared pytest setup.

The Triton interpreter must be selected before triton is imported (here, ahead of every test
module), so that the Triton kernels also run on CPU tensors. Set ``TRITON_INTERPRET=0`` in the
environment to run the ``gpu`` tests with compiled kernels on a CUDA machine.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
