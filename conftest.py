"""pytest settings of the repository root.

``speechbrain_spg/kernels/triton_kernels.py`` imports Triton, which not every
platform has (macOS, some CPU-only builds): its module is collected for
doctests only where Triton is installed; everything else works without it.
"""

import importlib.util

collect_ignore = (
    []
    if importlib.util.find_spec("triton")
    else ["speechbrain_spg/kernels/triton_kernels.py"]
)
