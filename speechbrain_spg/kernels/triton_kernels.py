"""Hand-written Triton kernels that gate up to six matrices in one launch.

Imported only where Triton is (``kernels.triton`` imports it on first use).
The math is that of ``speechbrain_spg.gate`` (the clipped sigmoid, the chain
rule of ``gate.chain_rule``); the layout is Triton's: a launch covers
``SLOTS`` matrices, passed as separate pointer arguments (no pointer table
to copy to the device), on a grid of ``(programs per matrix, matrices)``.
Each program strides over its matrix ``BLOCK`` elements at a time and
writes ONE partial sum (of ``1 - M`` forward, of the threshold gradient
backward) to a ``(matrices, programs)`` buffer, which the caller adds up:
no atomics, so the sums are the same from run to run.

Authors
 * speechbrain-spg developers 2026
"""

import triton
import triton.language as tl

#: Matrices per launch: one transformer block (``chunks.MATRICES_PER_CALL``).
SLOTS = 6

#: Elements each program handles per loop iteration.
BLOCK = 1024


@triton.jit
def _pick(m, a0, a1, a2, a3, a4, a5):
    """Argument ``m`` of six (a pointer or a size)."""
    if m == 0:
        r = a0
    elif m == 1:
        r = a1
    elif m == 2:
        r = a2
    elif m == 3:
        r = a3
    elif m == 4:
        r = a4
    else:
        r = a5
    return r


@triton.jit
def _mask(x, t, tau, saturation):
    """``sigmoid(min((x^2 - t^2) / (2 tau), saturation))``."""
    # NaN kept (Triton's default would return the saturation), as in the
    # reference: a NaN weight then gives a NaN soft-zero count.
    x = (x * x - t * t) / (2 * tau)
    return tl.sigmoid(
        tl.minimum(x, saturation, propagate_nan=tl.PropagateNan.ALL)
    )


#: Sizes are never specialised: a size of 1 would become a constant, of
#: another type than the other slots' sizes in ``_pick``. Nor is ``first``.
_SIZES = ["n0", "n1", "n2", "n3", "n4", "n5", "first"]


@triton.jit(do_not_specialize=_SIZES)
def gate_forward_kernel(
    w0, w1, w2, w3, w4, w5,
    o0, o1, o2, o3, o4, o5,
    n0, n1, n2, n3, n4, n5,
    first, thresholds, taus, partial_zeros, saturation,
    BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    """``o = w * M`` (in ``o``'s dtype) and partial sums of ``1 - M``.

    The vectors (``thresholds``, ``taus``, rows of ``partial_zeros``) cover
    every matrix of the call; this launch's start at ``first``."""
    p = tl.program_id(0)
    m = tl.program_id(1)
    programs = tl.num_programs(0)
    w = _pick(m, w0, w1, w2, w3, w4, w5)
    o = _pick(m, o0, o1, o2, o3, o4, o5)
    n = _pick(m, n0, n1, n2, n3, n4, n5)
    t = tl.load(thresholds + first + m).to(tl.float32)
    tau = tl.load(taus + first + m).to(tl.float32)
    acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    for start in range(p * BLOCK_SIZE, n, programs * BLOCK_SIZE):
        offsets = start + tl.arange(0, BLOCK_SIZE)
        inside = offsets < n
        x = tl.load(w + offsets, mask=inside, other=0.0).to(tl.float32)
        mask = _mask(x, t, tau, saturation)
        tl.store(o + offsets, (x * mask).to(o.dtype.element_ty), mask=inside)
        acc += tl.where(inside, 1.0 - mask, 0.0)
    tl.store(partial_zeros + (first + m) * programs + p, tl.sum(acc, axis=0))


@triton.jit(do_not_specialize=_SIZES)
def gate_backward_kernel(
    w0, w1, w2, w3, w4, w5,
    g0, g1, g2, g3, g4, g5,
    d0, d1, d2, d3, d4, d5,
    n0, n1, n2, n3, n4, n5,
    first, thresholds, taus, grad_zeros, partial_thresholds, saturation,
    BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    """``d = g (M + w^2 slope)`` and partial threshold gradients
    ``t sum(slope (grad_zeros - g w))``, ``slope = M (1 - M) / tau``,
    recomputing ``M``. ``d`` may be ``g`` (in place: each element is read
    before it is written, by the same program). The vectors cover every
    matrix of the call, as in ``gate_forward_kernel``."""
    p = tl.program_id(0)
    m = tl.program_id(1)
    programs = tl.num_programs(0)
    w = _pick(m, w0, w1, w2, w3, w4, w5)
    g = _pick(m, g0, g1, g2, g3, g4, g5)
    d = _pick(m, d0, d1, d2, d3, d4, d5)
    n = _pick(m, n0, n1, n2, n3, n4, n5)
    t = tl.load(thresholds + first + m).to(tl.float32)
    tau = tl.load(taus + first + m).to(tl.float32)
    gz = tl.load(grad_zeros + first + m).to(tl.float32)
    acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    for start in range(p * BLOCK_SIZE, n, programs * BLOCK_SIZE):
        offsets = start + tl.arange(0, BLOCK_SIZE)
        inside = offsets < n
        x = tl.load(w + offsets, mask=inside, other=0.0).to(tl.float32)
        grad = tl.load(g + offsets, mask=inside, other=0.0).to(tl.float32)
        mask = _mask(x, t, tau, saturation)
        slope = mask * (1.0 - mask) / tau
        acc += tl.where(inside, slope * (gz - grad * x), 0.0)
        factor = mask + x * x * slope
        tl.store(
            d + offsets, (grad * factor).to(d.dtype.element_ty), mask=inside
        )
    tl.store(
        partial_thresholds + (first + m) * programs + p,
        t * tl.sum(acc, axis=0),
    )
