"""Symmetric int8 quantisation of weight matrices, one scale per output row.

An ``int8`` compact export stores every gated matrix's kept values as int8
with one float32 scale per output row (a row of an ``nn.Linear`` weight is
one output unit, so its values share a range and one scale loses little):

- ``scale = max|w_row| / 127`` (float32), ``q = round(w / scale)`` clamped
  to ``[-127, 127]`` (127 keeps the range symmetric, so 0 is exact and
  ``-w`` gives ``-q``); every value is then within half a scale of
  ``q * scale``, and the largest of each row is exact up to float rounding;
- a row with no kept value, or only zeros, gets scale 1 (not 0: nothing is
  divided by zero and PyTorch's quantised tensors get a valid scale); its
  values are 0 either way, so the choice changes nothing computed;
- sparse matrices keep their kept values in row-major order (the order of
  ``weight[mask]``), so each value's row follows from the mask's per-row
  counts (``rows_of_mask``) and no index is stored.

Dequantising gives float32 weights (``dequantize_rows``); for CPU inference,
``dynamic_int8_linear`` builds PyTorch's dynamically quantised linear
directly from the stored int8 values and scales (nothing is re-quantised).

Authors
 * speechbrain-spg developers 2026
"""

import warnings

import torch

#: The largest stored magnitude: symmetric int8, -128 unused.
QMAX = 127
#: The scheme, as the export manifest records it.
SCHEME = "int8 symmetric per output row"
#: Scale of a row without any nonzero value (its values are all 0).
EMPTY_ROW_SCALE = 1.0


def rows_of_mask(mask):
    """The row of every kept element of a 2-D mask, in row-major order.

    The kept values of a sparse matrix are stored in the order of
    ``weight[mask]``; this gives each one its row (hence its scale) from the
    mask alone, without storing any index.

    Arguments
    ---------
    mask : torch.Tensor
        Boolean (out_features, in_features) mask.

    Returns
    -------
    torch.Tensor
        int64, one row index per ``True`` of ``mask``, non-decreasing.

    Example
    -------
    >>> rows_of_mask(torch.tensor([[True, True], [False, False], [False, True]]))
    tensor([0, 0, 2])
    """
    counts = mask.sum(dim=1)
    return torch.repeat_interleave(torch.arange(mask.shape[0]), counts)


def row_scales(values, rows, num_rows):
    """One symmetric scale per row: ``max|w_row| / 127``, or 1 for a row
    with no nonzero value (or one so small that its scale is 0 in float32).

    Arguments
    ---------
    values : torch.Tensor
        1-D float values.
    rows : torch.Tensor
        int64 row of every value (``rows_of_mask``).
    num_rows : int
        Number of rows (rows without any value get scale 1).

    Returns
    -------
    torch.Tensor
        float32 (num_rows,) scales, all > 0.

    Example
    -------
    >>> row_scales(torch.tensor([1.27, -2.54, 0.5]), torch.tensor([0, 0, 2]), 3)
    tensor([0.0200, 1.0000, 0.0039])
    """
    peak = torch.zeros(num_rows, dtype=torch.float64)
    magnitude = values.detach().to(torch.float64).abs()
    peak.scatter_reduce_(0, rows, magnitude, reduce="amax")
    scales = (peak / QMAX).to(torch.float32)
    return torch.where(scales > 0, scales, EMPTY_ROW_SCALE)


def quantize_rows(values, rows, num_rows):
    """Quantises values to int8 with one symmetric scale per row.

    Computed in float64, so that ``|w - q * scale| <= scale / 2`` holds for
    every value exactly (``q * scale`` exact; its float32 rounding, as
    ``dequantize_rows`` gives it, adds at most half a float32 ulp).

    Arguments
    ---------
    values : torch.Tensor
        1-D float values (a sparse matrix's kept values, row-major).
    rows : torch.Tensor
        int64 row of every value (``rows_of_mask``).
    num_rows : int
        Number of rows of the matrix.

    Returns
    -------
    q : torch.Tensor
        int8 values in ``[-127, 127]``, as many as ``values``.
    scales : torch.Tensor
        float32 (num_rows,) scales (``row_scales``).

    Example
    -------
    >>> q, scales = quantize_rows(
    ...     torch.tensor([1.27, -2.54, 0.5]), torch.tensor([0, 0, 1]), 2)
    >>> q, scales
    (tensor([  64, -127,  127], dtype=torch.int8), tensor([0.0200, 0.0039]))
    """
    scales = row_scales(values, rows, num_rows)
    ratio = values.detach().to(torch.float64) / scales.double()[rows]
    q = torch.round(ratio).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scales


def dequantize_rows(q, scales, rows):
    """Float32 values of int8 ones: ``q * scale`` of each value's row.

    Arguments
    ---------
    q : torch.Tensor
        int8 values.
    scales : torch.Tensor
        float32 per-row scales.
    rows : torch.Tensor
        int64 row of every value.

    Returns
    -------
    torch.Tensor
        float32 values.

    Example
    -------
    >>> q = torch.tensor([64, -127, 127], dtype=torch.int8)
    >>> dequantize_rows(q, torch.tensor([0.02, 0.5]), torch.tensor([0, 0, 1]))
    tensor([ 1.2800, -2.5400, 63.5000])
    """
    return q.to(torch.float32) * scales.to(torch.float32)[rows]


def quantize_matrix(weight, mask=None):
    """Quantises a weight matrix (only its kept values, with a mask).

    Arguments
    ---------
    weight : torch.Tensor
        (out_features, in_features) float matrix.
    mask : torch.Tensor, optional
        Boolean mask of the kept values: then only those are quantised, in
        row-major order (each row's scale from its kept values).

    Returns
    -------
    q : torch.Tensor
        int8: the matrix's shape, or 1-D (the kept values) with ``mask``.
    scales : torch.Tensor
        float32 (out_features,) scales.

    Example
    -------
    >>> w = torch.tensor([[0.0, 2.0], [-1.0, 0.5]])
    >>> quantize_matrix(w)[0]
    tensor([[   0,  127],
            [-127,   64]], dtype=torch.int8)
    >>> quantize_matrix(w, w != 0)[0]
    tensor([ 127, -127,   64], dtype=torch.int8)
    """
    num_rows = weight.shape[0]
    if mask is None:
        mask = torch.ones(weight.shape, dtype=torch.bool)
        q, scales = quantize_rows(
            weight.reshape(-1), rows_of_mask(mask), num_rows
        )
        return q.reshape(weight.shape), scales
    return quantize_rows(weight[mask], rows_of_mask(mask), num_rows)


def dequantize_matrix(q, scales, mask=None):
    """The float32 matrix of ``quantize_matrix``'s output (pruned values 0).

    Arguments
    ---------
    q : torch.Tensor
        int8 matrix, or with ``mask`` its kept values (row-major).
    scales : torch.Tensor
        float32 per-row scales.
    mask : torch.Tensor, optional
        Boolean mask of the kept values.

    Returns
    -------
    torch.Tensor
        float32 matrix (the mask's shape with ``mask``).

    Example
    -------
    >>> w = torch.tensor([[0.0, 2.0], [-1.0, 0.5]])
    >>> dequantize_matrix(*quantize_matrix(w, w != 0), w != 0)
    tensor([[ 0.0000,  2.0000],
            [-1.0000,  0.5039]])
    """
    if mask is None:
        rows = torch.arange(q.shape[0]).repeat_interleave(q.shape[1])
        return dequantize_rows(q.reshape(-1), scales, rows).reshape(q.shape)
    dense = torch.zeros(mask.shape, dtype=torch.float32)
    dense[mask] = dequantize_rows(q, scales, rows_of_mask(mask))
    return dense


def int8_matrix(q, mask):
    """The dense int8 matrix of sparse int8 kept values (pruned ones 0).

    Arguments
    ---------
    q : torch.Tensor
        int8 kept values, row-major.
    mask : torch.Tensor
        Boolean mask of the kept values.

    Returns
    -------
    torch.Tensor
        int8 matrix of the mask's shape.

    Example
    -------
    >>> int8_matrix(torch.tensor([5, -7], dtype=torch.int8),
    ...             torch.tensor([[False, True], [True, False]]))
    tensor([[ 0,  5],
            [-7,  0]], dtype=torch.int8)
    """
    dense = torch.zeros(mask.shape, dtype=torch.int8)
    dense[mask] = q
    return dense


def dynamic_int8_linear(q, scales, bias=None):
    """PyTorch's dynamically quantised int8 linear over stored int8 weights.

    The weight is assembled from the int8 values and the per-row scales as
    they are (``torch._make_per_channel_quantized_tensor``, zero points 0,
    axis 0), not re-quantised from float: it holds exactly what the export
    stored. The module runs on CPU only; its inputs are quantised per batch
    at run time (PyTorch's dynamic quantisation), the output is float32.
    PyTorch has deprecated its quantised tensors (its issue 184982): this
    needs a PyTorch that still has them (2.14 does; the deprecation warning
    is not shown, as nothing here can act on it).

    Arguments
    ---------
    q : torch.Tensor
        int8 (out_features, in_features) matrix.
    scales : torch.Tensor
        float32 (out_features,) scales, all > 0.
    bias : torch.Tensor, optional
        float (out_features,) bias.

    Returns
    -------
    torch.ao.nn.quantized.dynamic.Linear

    Example
    -------
    >>> w = torch.tensor([[0.0, 2.0], [-1.0, 0.5]])
    >>> linear = dynamic_int8_linear(*quantize_matrix(w), torch.zeros(2))
    >>> linear.weight().int_repr()
    tensor([[   0,  127],
            [-127,   64]], dtype=torch.int8)
    >>> linear(torch.tensor([[1.0, 1.0]])).round(decimals=1)
    tensor([[ 2.0000, -0.5000]])
    """
    from torch.ao.nn.quantized.dynamic import Linear

    out_features, in_features = q.shape
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*quantized tensor creation functions"
        )
        weight = torch._make_per_channel_quantized_tensor(
            q.to(torch.int8).contiguous(),
            scales.to(torch.float64),
            torch.zeros(out_features, dtype=torch.int64),
            0,
        )
        linear = Linear(
            in_features, out_features, bias_=bias is not None, dtype=torch.qint8
        )
        bias = None if bias is None else bias.detach().float().contiguous()
        linear.set_weight_bias(weight, bias)
    return linear
