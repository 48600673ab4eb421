"""pytest collects examples/ before test_dopsd.py, and the tests here import dopsd.py, which imports triton. Triton
chooses between its CPU interpreter and compiled kernels when a kernel is decorated, at that first import, so the
variable test_dopsd.py sets at its top must already be set here, or its fused-loss tests find a compiled kernel
that cannot run on a CPU. One intra-op thread, before torch loads: see test_dopsd.py's top."""
import os

os.environ["TRITON_INTERPRET"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"
