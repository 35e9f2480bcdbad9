"""What a SpeechBrain recipe needs to train an SPG lobe safely.

The LibriSpeech recipe's ``train.py`` uses these; a recipe of another corpus
that fine-tunes an SPG lobe with its own ``Brain`` needs the same:

* ``gate_parameters``: thresholds and multipliers, for an optimiser of their
  own (they learn at another rate than the weights);
* ``train_loader_options``: a training loader whose shuffling does not draw
  from the global random generator, so that a restarted run draws the same
  dropout masks as an uninterrupted one;
* ``nonfinite_on_any_rank``: the decision to skip a batch, taken by every
  DDP process together;
* ``load_init`` and ``save_init_files``: compressing a dense fine-tuned
  model starts from the head (and tokenizer) of the run that trained it;
* ``refuse_data_parallel``, ``freeze_unused_parameters`` and
  ``disable_layerdrop_under_ddp``: what DataParallel and
  DistributedDataParallel cannot do with gated layers.

Authors
 * speechbrain-spg developers 2026
"""

import os
import shutil

import torch
from speechbrain.utils.distributed import if_main_process
from speechbrain.utils.logger import get_logger

from speechbrain_spg.lobes import SPGLobeMixin

logger = get_logger(__name__)

#: Files of a run's output folder that ``load_init`` reads back.
HEAD_FILE = "head.ckpt"
TOKENIZER_FILES = ("label_encoder.txt", "tokenizer.model")


def gate_parameters(lobe):
    """The trainable thresholds and Lagrange multipliers of an SPG lobe.

    Arguments
    ---------
    lobe : torch.nn.Module
        The SSL lobe (any lobe: a plain one has none).

    Returns
    -------
    list of torch.nn.Parameter
        The parameters of the gates and of the sparsity regulariser that
        still learn (none once the lobe is pruned and frozen).

    Example
    -------
    >>> from speechbrain_spg.data.architectures import tiny_model_folder
    >>> from speechbrain_spg.lobes import SPGWav2Vec2
    >>> lobe = SPGWav2Vec2(tiny_model_folder("wav2vec2"), save_path="")
    >>> thresholds, multipliers = gate_parameters(lobe)
    >>> thresholds is lobe.gate.threshold_param, thresholds.numel()
    (True, 12)
    >>> multipliers is lobe.regularizer.multiplier_param
    True
    >>> gate_parameters(torch.nn.Linear(2, 2))
    []
    """
    if not isinstance(lobe, SPGLobeMixin):
        return []
    candidates = (lobe.gate.threshold_param, lobe.regularizer.multiplier_param)
    return [p for p in candidates if p.requires_grad]


def train_loader_options(options, seed=0):
    """Training loader options with a random generator of their own.

    Each pass over a DataLoader draws one number from its ``generator`` (the
    base seed of its workers), or from the global torch generator without
    one. The global generator drives dropout and is restored from
    checkpoints (``speechbrain_spg.checkpointing.RandomState``); a run
    restarted in the middle of an epoch starts its pass after the restore,
    so with the global generator it would draw one number more than an
    uninterrupted run, and every later dropout mask would differ.

    Arguments
    ---------
    options : dict
        The recipe's training loader options (not modified).
    seed : int
        Seed of the loader's generator (when ``options`` has none).

    Returns
    -------
    dict
        A copy of ``options`` with a ``generator``.

    Example
    -------
    >>> options = train_loader_options({"batch_size": 8}, seed=3)
    >>> options["batch_size"], options["generator"].initial_seed()
    (8, 3)
    """
    options = dict(options)
    if options.get("generator") is None:
        options["generator"] = torch.Generator().manual_seed(seed)
    return options


def nonfinite_on_any_rank(loss):
    """Whether the loss is non-finite on this process or on any other.

    Under DDP every process must take the same decision: a rank that skips
    its backward while the others run theirs would leave them waiting in
    the gradient all-reduce forever. Without DDP, just this loss.

    Arguments
    ---------
    loss : torch.Tensor
        This process's loss.

    Returns
    -------
    bool
        True if the batch must be skipped on every process.

    Example
    -------
    >>> nonfinite_on_any_rank(torch.tensor(float("nan")))
    True
    >>> nonfinite_on_any_rank(torch.tensor(1.5))
    False
    """
    bad = (~torch.isfinite(loss.detach())).any().to(torch.float32)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        bad = bad.to(loss.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bool(bad.item() > 0)


def refuse_data_parallel(hparams, run_opts, gpus, path):
    """Refuses DataParallel for SPG runs on several GPUs.

    DataParallel copies the model to every GPU in each forward pass, but the
    copies of the gated layers keep pointing at the one gate (thresholds,
    soft-zero counts) of the first GPU. With one GPU it does not copy
    anything, and UMP and dense runs do not train gates.

    Arguments
    ---------
    hparams : dict
        The loaded hyperparameters (``method``).
    run_opts : dict
        SpeechBrain's run options (``data_parallel_backend``).
    gpus : int
        Visible CUDA devices.
    path : str
        The hyperparameter file, for the message.

    Raises
    ------
    ValueError
        For an SPG run with ``--data_parallel_backend`` on several GPUs,
        with the torchrun command to use instead.

    Example
    -------
    >>> refuse_data_parallel({"method": "spg"}, {}, 4, "spg.yaml")
    >>> refuse_data_parallel(
    ...     {"method": "spg"}, {"data_parallel_backend": True}, 2, "spg.yaml"
    ... )  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    ValueError: spg.yaml: --data_parallel_backend on 2 GPUs cannot train ...
    """
    if (
        hparams.get("method") == "spg"
        and run_opts.get("data_parallel_backend")
        and gpus > 1
    ):
        raise ValueError(
            f"{path}: --data_parallel_backend on {gpus} GPUs cannot train "
            "self-pinching gates (DataParallel's copies of the gated layers "
            "would all read the thresholds of the first GPU). Use DDP "
            f"instead: torchrun --nproc_per_node={gpus} train.py {path}"
        )


def freeze_unused_parameters(lobe):
    """Freezes SSL parameters that would get no gradient (DDP needs this).

    ``masked_spec_embed`` is only used when the lobe applies SpecAugment, and
    the thresholds and multipliers of a pruned lobe (UMP) no longer take
    part; DistributedDataParallel would wait for their gradients and stop
    with "Expected to have finished reduction".

    Arguments
    ---------
    lobe : torch.nn.Module
        A SpeechBrain HuggingFace SSL lobe (``.model``), gated or not.

    Example
    -------
    >>> from speechbrain_spg.data.architectures import tiny_model_folder
    >>> from speechbrain_spg.lobes import SPGWav2Vec2
    >>> lobe = SPGWav2Vec2(tiny_model_folder("wav2vec2"), save_path="")
    >>> _ = lobe.hard_prune()
    >>> freeze_unused_parameters(lobe)
    >>> lobe.gate.threshold_param.requires_grad, gate_parameters(lobe)
    (False, [])
    """
    model = lobe.model
    embed = getattr(model, "masked_spec_embed", None)
    if embed is not None and not model.config.apply_spec_augment:
        embed.requires_grad_(False)
    if isinstance(lobe, SPGLobeMixin) and lobe.is_pruned:
        lobe.gate.threshold_param.requires_grad_(False)
        lobe.regularizer.multiplier_param.requires_grad_(False)


def disable_layerdrop_under_ddp(lobe):
    """Turns LayerDrop off when several processes train together.

    A layer skipped by LayerDrop leaves its parameters (and its thresholds)
    without gradients on one rank but not on the others, which
    DistributedDataParallel cannot reduce. Single-process runs keep it.

    Arguments
    ---------
    lobe : torch.nn.Module
        A SpeechBrain HuggingFace SSL lobe (``.model.config.layerdrop``).

    Returns
    -------
    bool
        Whether LayerDrop was turned off.

    Example
    -------
    >>> from speechbrain_spg.data.architectures import tiny_model_folder
    >>> from speechbrain_spg.lobes import SPGWav2Vec2
    >>> lobe = SPGWav2Vec2(tiny_model_folder("wav2vec2"), save_path="")
    >>> layerdrop = lobe.model.config.layerdrop
    >>> disable_layerdrop_under_ddp(lobe), lobe.model.config.layerdrop == layerdrop
    (False, True)
    """
    dist = torch.distributed
    distributed = dist.is_available() and dist.is_initialized()
    config = lobe.model.config
    if distributed and dist.get_world_size() > 1 and config.layerdrop > 0:
        logger.warning(
            "LayerDrop %.2f disabled: not supported with several processes.",
            config.layerdrop,
        )
        config.layerdrop = 0.0
        return True
    return False


def load_init(init_dir, head):
    """Starts from a dense fine-tuned run: loads its head into ``head``.

    Compressing a model that was fine-tuned first (``init_from``) keeps its
    head and its tokenizer; the SSL weights come from its ``hf/`` folder
    (the YAML's ``ssl_source``).

    Arguments
    ---------
    init_dir : str or None
        The output folder of a dense run (``head.ckpt``, ``hf/``, tokenizer
        file), or None to start from scratch.
    head : torch.nn.Module
        The head to load (the same architecture as the dense run's).

    Returns
    -------
    str or None
        ``init_dir`` (its tokenizer file is reused), None without one.

    Raises
    ------
    FileNotFoundError
        If ``init_dir`` has no ``head.ckpt``.
    ValueError
        If the saved head does not fit ``head``.

    Example
    -------
    >>> import tempfile
    >>> head = torch.nn.Linear(4, 3)
    >>> run = tempfile.mkdtemp()
    >>> save_init_files(head, tempfile.mkdtemp(), run)
    >>> fresh = torch.nn.Linear(4, 3)
    >>> load_init(run, fresh) == run, torch.equal(fresh.weight, head.weight)
    (True, True)
    >>> load_init(None, fresh) is None
    True
    >>> load_init(run, torch.nn.Linear(4, 5))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    ValueError: init_from: the head in ... does not fit this YAML's head ...
    """
    if not init_dir:
        return None
    head_file = os.path.join(init_dir, HEAD_FILE)
    if not os.path.isfile(head_file):
        raise FileNotFoundError(
            f"init_from: {head_file} not found; init_from must be the output "
            "folder of a dense run of this recipe (hf/, head.ckpt, tokenizer)."
        )
    state = torch.load(head_file, map_location="cpu")
    try:
        head.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"init_from: the head in {head_file} does not fit this YAML's head "
            f"(decoder, dnn_layers, dnn_neurons, output_neurons): {err}"
        ) from None
    return init_dir


def vocabulary(tokenizer):
    """The token strings, by id, for SpeechBrain's CTC beam searcher.

    Arguments
    ---------
    tokenizer : CTCTextEncoder or speechbrain.tokenizers.SentencePiece
        Character encoder or SentencePiece wrapper.

    Returns
    -------
    list of str

    Example
    -------
    >>> from speechbrain.dataio.encoder import CTCTextEncoder
    >>> encoder = CTCTextEncoder()
    >>> encoder.insert_blank(index=0)
    >>> encoder.update_from_iterable("AB", sequence_input=False)
    >>> vocabulary(encoder)
    ['<blank>', 'A', 'B']
    """
    if hasattr(tokenizer, "sp"):
        sp = tokenizer.sp
        return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    return [str(tokenizer.ind2lab[i]) for i in range(len(tokenizer))]


def save_init_files(head, save_folder, out_dir):
    """Writes what ``load_init`` reads: ``head.ckpt`` and the tokenizer file.

    Only the main process writes.

    Arguments
    ---------
    head : torch.nn.Module
        The trained head.
    save_folder : str or os.PathLike
        Where the run keeps its tokenizer file (``label_encoder.txt`` or
        ``tokenizer.model``), copied if present.
    out_dir : str or os.PathLike
        The run's output folder.

    Example
    -------
    >>> import tempfile
    >>> save, out = tempfile.mkdtemp(), tempfile.mkdtemp()
    >>> _ = open(os.path.join(save, "label_encoder.txt"), "w").write("'A' => 3")
    >>> save_init_files(torch.nn.Linear(2, 2), save, out)
    >>> sorted(os.listdir(out))
    ['head.ckpt', 'label_encoder.txt']
    """
    if not if_main_process():
        return
    torch.save(head.state_dict(), os.path.join(out_dir, HEAD_FILE))
    for name in TOKENIZER_FILES:
        src = os.path.join(save_folder, name)
        if os.path.isfile(src):
            shutil.copy(src, os.path.join(out_dir, name))
