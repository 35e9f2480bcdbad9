"""Finishing a drop-in run: prune, export an inference folder, evaluate it.

A recipe that trained an SPG lobe through the drop-in fragments
(``hparams/spg_*.yaml``) tests its own best checkpoint, a soft-gated model.
This command takes that recipe's hparams file and the last checkpoint its
``checkpointer`` saved, hard-prunes the lobe, writes the inference folder
(what ``EncoderASR.from_hparams`` loads: compact weights, head, tokenizer,
``hyperparams.yaml``), evaluates the folder on the recipe's test CSV files
and writes the model card::

    python -m speechbrain_spg.tools.finish hparams/train_hf_wav2vec.yaml \\
        --data_folder=/data/LibriSpeech [the training run's other overrides]

The defaults follow SpeechBrain's LibriSpeech CTC recipe
(``train_hf_wav2vec.yaml``): the SSL lobe is the SPG lobe among ``modules``,
the head is ``enc`` then ``ctc_lin`` (``--head``), the output
``log_softmax`` (``--encoder``), the tokenizer ``label_encoder``
(``--tokenizer``), the test sets ``test_csv`` (``--test_csv``). Any other
``--key=value`` overrides the YAML, as in the recipe's own command line.

Authors
 * speechbrain-spg developers 2026
"""

import argparse
import os
import sys
import tempfile

import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.dataio.dataio import read_audio
from speechbrain.dataio.dataset import DynamicItemDataset
from speechbrain.utils.metric_stats import ErrorRateStats
from tqdm import tqdm

from speechbrain_spg.evaluation.summary import prune_and_export
from speechbrain_spg.lobes import SPGLobeMixin
from speechbrain_spg.tools.inference import (
    TOKENIZER_FILES,
    copied_definitions,
    inference_hparams,
    load_asr,
    publish,
    write_inference_folder,
)


def parse_arguments(argv):
    """The command's options, and the YAML overrides (``--key=value``).

    Arguments
    ---------
    argv : list of str
        Command-line arguments.

    Returns
    -------
    args : argparse.Namespace
    overrides : str
        YAML text, as ``load_hyperpyyaml`` takes it.

    Example
    -------
    >>> args, overrides = parse_arguments(["train.yaml", "--seed=3", "--head", "a,b"])
    >>> args.head, overrides
    (['a', 'b'], 'seed: 3')
    """
    parser = argparse.ArgumentParser(
        prog="python -m speechbrain_spg.tools.finish",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("hparams_file", help="the recipe's YAML")
    parser.add_argument(
        "--output", help="inference folder (default <output_folder>/compact)"
    )
    parser.add_argument("--lobe", help="the SPG lobe's key (default: found)")
    parser.add_argument(
        "--head",
        default="enc,ctc_lin",
        type=_keys,
        help="the YAML keys of the head's modules, in order (saved in head.ckpt)",
    )
    parser.add_argument(
        "--encoder",
        default="enc,ctc_lin,log_softmax",
        type=_keys,
        help="the modules applied after the SSL model, up to log-probabilities",
    )
    parser.add_argument(
        "--tokenizer",
        default="label_encoder",
        help="the YAML key of the character encoder or SentencePiece model",
    )
    parser.add_argument(
        "--test_csv", nargs="+", help="test CSV files (default: test_csv)"
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="scale all thresholds onto the target before pruning",
    )
    parser.add_argument(
        "--export_dtype",
        default="float32",
        choices=["float32", "float16", "int8"],
        help="storage of compact.safetensors: float32 (exact), float16, or "
        "int8 (the gated matrices' kept values, one float32 scale per "
        "output row; the rest float16)",
    )
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")
    parser.add_argument("--noprogressbar", action="store_true")
    args, rest = parser.parse_known_args(argv)
    lines = []
    for item in rest:
        key, sep, value = item[2:].partition("=")
        if not item.startswith("--") or not sep:
            parser.error(f"unrecognised argument {item!r} (use --key=value)")
        lines.append(f"{key}: {value}")
    return args, "\n".join(lines)


def _keys(text):
    """``"a,b"`` -> ``["a", "b"]``."""
    return [key for key in text.split(",") if key]


def find_lobe(hparams, key=None, where="the YAML"):
    """The SPG lobe of a loaded recipe YAML.

    Arguments
    ---------
    hparams : dict
        The loaded YAML.
    key : str, optional
        Its key (default: the one SPG lobe among ``modules``).
    where : str
        The file, for error messages.

    Returns
    -------
    speechbrain_spg.lobes.SPGLobeMixin

    Example
    -------
    >>> find_lobe({"modules": {"enc": torch.nn.Linear(2, 2)}})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    ValueError: the YAML: no SPG lobe among modules ...
    """
    if key is not None:
        lobe = hparams.get(key)
        if not isinstance(lobe, SPGLobeMixin):
            raise ValueError(f"{where}: {key!r} is not an SPG lobe.")
        return lobe
    lobes = [
        module
        for module in hparams.get("modules", {}).values()
        if isinstance(module, SPGLobeMixin)
    ]
    if len(lobes) != 1:
        raise ValueError(
            f"{where}: no SPG lobe among modules (or several); include a "
            "drop-in fragment (hparams/spg_*.yaml) or name it with --lobe."
        )
    return lobes[0]


def save_tokenizer(tokenizer, folder):
    """Writes a character encoder or a SentencePiece model into ``folder``.

    Arguments
    ---------
    tokenizer : CTCTextEncoder or SentencePiece wrapper or processor
        The recipe's tokenizer.
    folder : str
        Where to write.

    Returns
    -------
    path : str
    token_type : str
        ``char`` or ``bpe``.

    Example
    -------
    >>> from speechbrain.dataio.encoder import CTCTextEncoder
    >>> encoder = CTCTextEncoder()
    >>> encoder.update_from_iterable("AB", sequence_input=False)
    >>> path, kind = save_tokenizer(encoder, tempfile.mkdtemp())
    >>> os.path.basename(path), kind
    ('label_encoder.txt', 'char')
    """
    processor = getattr(tokenizer, "sp", tokenizer)
    if hasattr(processor, "serialized_model_proto"):
        path = os.path.join(folder, TOKENIZER_FILES["bpe"])
        with open(path, "wb") as fout:
            fout.write(processor.serialized_model_proto())
        return path, "bpe"
    path = os.path.join(folder, TOKENIZER_FILES["char"])
    tokenizer.save(path)
    return path, "char"


def evaluate_csv(asr, csv_file, data_folder, batch_size=8, progress=True):
    """WER and CER of an inference model on a SpeechBrain CSV file.

    Arguments
    ---------
    asr : speechbrain.inference.ASR.EncoderASR or EncoderDecoderASR
        The model.
    csv_file : str
        Columns ``ID``, ``duration``, ``wav`` (``$data_root`` is replaced by
        ``data_folder``) and ``wrd``.
    data_folder : str or None
        The corpus folder.
    batch_size : int
        Utterances per batch (sorted by duration).
    progress : bool
        Show a progress bar.

    Returns
    -------
    speechbrain.utils.metric_stats.ErrorRateStats, ErrorRateStats
        Word and character error statistics.
    """
    data = DynamicItemDataset.from_csv(
        csv_file, replacements={"data_root": data_folder or ""}
    ).filtered_sorted(sort_key="duration")
    data.add_dynamic_item(read_audio, takes="wav", provides="sig")
    data.set_output_keys(["id", "sig", "wrd"])
    wer, cer = ErrorRateStats(), ErrorRateStats(split_tokens=True)
    batches = [
        PaddedBatch([data[i] for i in range(s, min(s + batch_size, len(data)))])
        for s in range(0, len(data), batch_size)
    ]
    for batch in tqdm(batches, disable=not progress, desc=csv_file):
        words, _ = asr.transcribe_batch(*batch.sig)
        hyps = [str(text).split() for text in words]
        refs = [text.split() for text in batch.wrd]
        wer.append(batch.id, hyps, refs)
        cer.append(batch.id, hyps, refs)
    return wer, cer


def finish(args, overrides):
    """Prunes, exports and evaluates; returns the error rates.

    Arguments
    ---------
    args : argparse.Namespace
        From ``parse_arguments``.
    overrides : str
        YAML overrides.

    Returns
    -------
    dict
        ``{"wer": {split: percent}, "cer": {split: percent}}``.
    """
    with open(args.hparams_file, encoding="utf-8") as fin:
        hparams = load_hyperpyyaml(fin, overrides)
    checkpointer = hparams.get("checkpointer")
    if checkpointer is None or not checkpointer.find_checkpoints():
        raise FileNotFoundError(
            f"{args.hparams_file}: no checkpoint to finish (the checkpointer's "
            "folder is empty); pass the training run's overrides "
            "(--output_folder=...)."
        )
    checkpointer.recover_if_possible()  # the newest checkpoint
    lobe = find_lobe(hparams, args.lobe, args.hparams_file)
    output = args.output or os.path.join(hparams["output_folder"], "compact")
    with tempfile.TemporaryDirectory() as work:
        tokenizer_file, token_type = save_tokenizer(
            hparams[args.tokenizer], work
        )
        head = torch.nn.ModuleList([hparams[key] for key in args.head])
        copied = list(dict.fromkeys(args.head + args.encoder))
        definitions = copied_definitions(args.hparams_file, overrides, copied)

        def write(pruned, folder):
            text = inference_hparams(
                pruned,
                definitions,
                args.head,
                args.encoder,
                token_type=token_type,
                blank_index=hparams.get("blank_index", 0),
                labels=hparams.get("output_neurons"),
            )
            return write_inference_folder(
                pruned, folder, head, tokenizer_file, text, args.export_dtype
            )

        sparsity = prune_and_export(lobe, output, args.calibrate, write)
    print(f"hard sparsity of gated weights: {sparsity['hard_sparsity']:.4f}")
    asr = load_asr(output, device=args.device)
    rates = {"wer": {}, "cer": {}}
    for csv_file in args.test_csv or hparams.get("test_csv", []):
        split = os.path.splitext(os.path.basename(csv_file))[0]
        wer, cer = evaluate_csv(
            asr,
            csv_file,
            hparams.get("data_folder"),
            args.batch_size,
            not args.noprogressbar,
        )
        with open(os.path.join(output, f"wer_{split}.txt"), "w") as fout:
            wer.write_stats(fout)
        rates["wer"][split] = wer.summarize("error_rate")
        rates["cer"][split] = cer.summarize("error_rate")
        print(
            f"{split}: WER {rates['wer'][split]:.2f} CER {rates['cer'][split]:.2f}"
        )
    publish(output, rates)
    return rates


def main(argv=None):
    """Runs the command; returns its exit status.

    Arguments
    ---------
    argv : list of str, optional
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
    """
    args, overrides = parse_arguments(sys.argv[1:] if argv is None else argv)
    try:
        finish(args, overrides)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
