"""Memory for one tensor, handed out again once nobody holds it.

On a CPU, a training step of the gate writes its gated weights into new
memory: for wav2vec2-base 340 MB per step, for HuBERT-large 1.2 GB. The C
library's allocator gives such blocks back to the system when they are
freed and takes them again at the next step, and the system zeroes every
page it hands out: in a profile of HuBERT-large steps the gate's forward
kernel, which first writes them, took 0.98 ns per weight in new memory and
0.60 ns in kept memory (``benchmarks/RESULTS.md``).
``ReusedMemory`` keeps the memory of one gated matrix from step to step:
its gated weight during the forward and backward passes, then (written by
the gate's backward) the weight's gradient until the optimiser clears it.
Those are the times the gated weight and the gradient would be held
anyway, so the peak memory should not grow (measured in RESULTS.md).

The memory is handed out again only when no tensor holds it any more (the
storage's reference count, ``torch._C._storage_Use_Count``): a gated weight
kept by a second forward pass before the backward, by the user, or a
gradient kept by ``zero_grad(set_to_none=False)`` makes ``take`` return new
memory, which is then the one kept. Where PyTorch has no such count,
``take`` always returns new memory.

Authors
 * speechbrain-spg developers 2026
"""

import torch

_use_count = getattr(torch._C, "_storage_Use_Count", None)


def storage_holders(storage):
    """Number of references to a storage (its tensors, its Python object),
    or None where PyTorch does not tell.

    Arguments
    ---------
    storage : torch.UntypedStorage

    Returns
    -------
    int or None

    Example
    -------
    >>> storage = torch.empty(3).untyped_storage()
    >>> before = storage_holders(storage)
    >>> view = torch.empty(0).set_(storage)
    >>> before is None or storage_holders(storage) == before + 1
    True
    """
    if _use_count is None:
        return None
    return _use_count(storage._cdata)


class ReusedMemory:
    """One block of memory, handed out as a tensor while nobody else holds
    it (see the module docstring).

    Copies of the object (``copy.deepcopy``, pickling with its module) keep
    no memory: a copied model starts with none.

    Example
    -------
    >>> memory = ReusedMemory()
    >>> a = memory.take(torch.zeros(2, 3))
    >>> b = memory.take(torch.zeros(2, 3))  # a still holds the memory
    >>> a.data_ptr() != b.data_ptr()
    True
    >>> kept = b.data_ptr()
    >>> del a, b
    >>> c = memory.take(torch.zeros(6))
    >>> c.shape, c.data_ptr() == kept or storage_holders(c.untyped_storage()) is None
    (torch.Size([6]), True)
    """

    def __init__(self):
        self._storage = None
        self._alone = None

    def take(self, like):
        """An uninitialised contiguous tensor of ``like``'s shape, dtype and
        device: in the kept memory if nobody holds it and it is the right
        size, else in new memory, which is kept from then on.

        Arguments
        ---------
        like : torch.Tensor

        Returns
        -------
        torch.Tensor
            A tensor that owns no autograd history and shares nothing with
            ``like``.
        """
        tensor = self.take_if_free(like)
        if tensor is None:
            self._storage = torch.empty(
                like.numel() * like.element_size(),
                dtype=torch.uint8,
                device=like.device,
            ).untyped_storage()
            self._alone = storage_holders(self._storage)
            tensor = tensor_on(self._storage, like)
        return tensor

    def take_if_free(self, like):
        """Like ``take``, but None instead of new memory.

        Arguments
        ---------
        like : torch.Tensor

        Returns
        -------
        torch.Tensor or None
            In the kept memory, if nobody holds it and it is ``like``'s
            size in bytes, on ``like``'s device.

        Example
        -------
        >>> memory = ReusedMemory()
        >>> memory.take_if_free(torch.zeros(3)) is None  # nothing kept yet
        True
        >>> taken = memory.take(torch.zeros(3))
        >>> memory.take_if_free(torch.zeros(3)) is None  # held by `taken`
        True
        """
        nbytes = like.numel() * like.element_size()
        if (
            self._storage is None
            or self._storage.nbytes() != nbytes
            or self._storage.device != like.device
            or not self.only_held_by(0)
        ):
            return None
        return tensor_on(self._storage, like)

    def only_held_by(self, tensors):
        """Whether exactly ``tensors`` tensors hold the kept memory besides
        this object (False when nothing is kept or PyTorch does not count).

        Arguments
        ---------
        tensors : int
            Tensors over the kept memory the caller knows of.

        Returns
        -------
        bool

        Example
        -------
        >>> memory = ReusedMemory()
        >>> mine = memory.take(torch.zeros(3))
        >>> memory.only_held_by(1) or storage_holders(mine.untyped_storage()) is None
        True
        >>> theirs = mine.view(3, 1)
        >>> memory.only_held_by(1)
        False
        """
        if self._storage is None or self._alone is None:
            return False
        return storage_holders(self._storage) == self._alone + tensors

    @property
    def held(self):
        """Bytes of memory kept (0 when none)."""
        return 0 if self._storage is None else self._storage.nbytes()

    def release(self):
        """Lets go of the kept memory (tensors handed out keep theirs)."""
        self.__init__()

    def __deepcopy__(self, memo):
        return ReusedMemory()

    def __getstate__(self):
        return ReusedMemory().__dict__


def tensor_on(storage, like, offset=0):
    """A new contiguous tensor over ``storage`` with ``like``'s shape and
    dtype (not a view: its own version counter and autograd identity).

    Arguments
    ---------
    storage : torch.UntypedStorage
        At least ``offset`` plus ``like``'s size in bytes.
    like : torch.Tensor
    offset : int
        Where the tensor starts, in bytes (a multiple of the element size).

    Returns
    -------
    torch.Tensor

    Example
    -------
    >>> storage = torch.ones(6).untyped_storage()
    >>> tensor_on(storage, torch.zeros(2, 3))
    tensor([[1., 1., 1.],
            [1., 1., 1.]])
    """
    tensor = torch.empty(0, dtype=like.dtype, device=like.device)
    return tensor.set_(storage, offset // like.element_size(), like.shape)


def alias(tensor):
    """A new tensor over the same memory as the contiguous ``tensor``, with
    its shape (not a view; see ``tensor_on``).

    Arguments
    ---------
    tensor : torch.Tensor

    Returns
    -------
    torch.Tensor

    Example
    -------
    >>> x = torch.arange(6.0)[2:]
    >>> y = alias(x)
    >>> y.data_ptr() == x.data_ptr() and y._base is None
    True
    """
    offset = tensor.storage_offset() * tensor.element_size()
    return tensor_on(tensor.untyped_storage(), tensor, offset)
