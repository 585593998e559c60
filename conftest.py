"""pytest's doctest collection over the package (``--doctest-modules``): the Triton kernels' module
imports Triton, which CPU-only torch does not bring; it has no doctests, so it is not collected
where Triton is missing (tests/test_spline_triton.py tests it where Triton is installed)."""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("triton") else ["krflows/transforms/_spline_triton.py"]
