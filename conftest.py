"""Collection rules for the whole suite (tests, doctests, benchmarks).

The examples of ``speechbrain_spg/native_gate.py`` that run its kernels need
a machine the kernels run on (x86-64 Linux, AVX2, a C compiler); elsewhere
they are skipped with the reason, as ``tests/test_native_gate.py`` is.
"""

import pytest

#: Examples in native_gate.py that call the built kernels.
NATIVE_EXAMPLES = ("forward", "soft_zeros", "backward", "backward_from_gated")


def pytest_collection_modifyitems(config, items):
    """Skips the kernel-running examples of ``native_gate`` where the
    kernels cannot run."""
    from speechbrain_spg import native_gate

    if native_gate.available():
        return
    names = {f"speechbrain_spg.native_gate.{name}" for name in NATIVE_EXAMPLES}
    skip = pytest.mark.skip(
        reason="native kernels need an x86-64 Linux CPU with AVX2 and a C compiler"
    )
    for item in items:
        if item.name in names:
            item.add_marker(skip)
