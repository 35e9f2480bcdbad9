"""An inference folder from a compressed run, as SpeechBrain publishes them.

A finished SpeechBrain recipe ships a folder that ``EncoderASR`` (CTC) or
``EncoderDecoderASR`` (joint CTC/attention) loads with ``from_hparams``: an
inference ``hyperparams.yaml``, the weights it names and a model card. An SPG
run writes the same, around its compact export:

- ``compact.safetensors`` and ``spg_manifest.json`` (``export_compact``);
- ``head.ckpt``: the task head (the state dict of a ``ModuleList`` of the
  head modules, in order) and the tokenizer (``label_encoder.txt`` for
  characters, ``tokenizer.model`` for SentencePiece);
- ``hyperparams.yaml``: the compact encoder (``CompactWav2Vec2`` built from
  the model's configuration, written inline, so that the folder can be moved
  or uploaded to the HuggingFace hub as it is), the head modules copied from
  the training YAML with their values resolved, the decoder, the tokenizer
  and the ``Pretrainer`` that loads the files;
- ``README.md``: the model card (``model_card``), once the folder has been
  evaluated.

Authors
 * speechbrain-spg developers 2026
"""

import io
import os
import re
import tempfile

import ruamel.yaml
import torch
from hyperpyyaml import resolve_references
from speechbrain.dataio.encoder import CTCTextEncoder
from speechbrain.utils.fetching import FetchSource
from speechbrain.utils.parameter_transfer import Pretrainer
from transformers import AutoConfig

from speechbrain_spg.export import MANIFEST, export_compact, read_manifest

HPARAMS_FILE = "hyperparams.yaml"
HEAD_FILE = "head.ckpt"
CARD_FILE = "README.md"
#: Tokenizer file names, per unit type.
TOKENIZER_FILES = {"char": "label_encoder.txt", "bpe": "tokenizer.model"}
#: SpeechBrain inference class, per decoder.
INTERFACES = {"ctc": "EncoderASR", "ctc_attention": "EncoderDecoderASR"}
#: Configuration keys that say nothing about the architecture.
_CONFIG_NOISE = ("transformers_version", "architectures", "_name_or_path")


class CharTokenizer(CTCTextEncoder):
    """SpeechBrain's character encoder, with the ``decode_ids`` method that
    ``EncoderDecoderASR`` calls on its tokenizer.

    Arguments
    ---------
    expected_len : int, optional
        The number of labels (the head's output size), checked on loading
        (without it, SpeechBrain's warning that it was never set is off).

    Example
    -------
    >>> tokenizer = CharTokenizer()
    >>> tokenizer.update_from_iterable("AB ", sequence_input=False)
    >>> tokenizer.decode_ids([0, 2, 1])
    'A B'
    """

    def __init__(self, expected_len=None):
        super().__init__()
        if expected_len is None:  # the label file is checksummed, and the
            self.ignore_len()  # head's size checks it on loading
        else:
            self.expect_len(expected_len)

    def decode_ids(self, ids):
        """Token ids -> text.

        Arguments
        ---------
        ids : sequence of int
            Token ids.

        Returns
        -------
        str
        """
        return "".join(self.decode_ndim([int(i) for i in ids]))


class FolderPretrainer(Pretrainer):
    """SpeechBrain's ``Pretrainer``, reading bare file names in ``paths``
    from the folder ``from_hparams`` loads (a local folder or a hub id).

    SpeechBrain resolves a bare name against the working directory and looks
    for ``<loadable>.ckpt`` in the source otherwise; an inference folder keeps
    its own file names (``compact.safetensors``) and stays movable.

    Example
    -------
    >>> work = tempfile.mkdtemp()
    >>> torch.save(torch.nn.Linear(2, 2).state_dict(), os.path.join(work, "w.pt"))
    >>> lin = torch.nn.Linear(2, 2)
    >>> pretrainer = FolderPretrainer(loadables={"lin": lin}, paths={"lin": "w.pt"})
    >>> pretrainer.set_collect_in(tempfile.mkdtemp())
    >>> _ = pretrainer.collect_files(default_source=work)
    >>> pretrainer.load_collected()
    """

    def collect_files(self, default_source=None, **kwargs):
        """Fetches the files (see ``Pretrainer.collect_files``).

        Arguments
        ---------
        default_source : str or FetchSource, optional
            The folder or hub repository of bare file names.
        **kwargs
            As ``Pretrainer.collect_files``.

        Returns
        -------
        dict
            Loadable name -> local path.
        """
        if default_source is not None:
            for name, path in self.paths.items():
                if isinstance(path, str) and "/" not in path:
                    self.paths[name] = _join_source(default_source, path)
        return super().collect_files(default_source=default_source, **kwargs)


def _join_source(source, filename):
    """``source/filename`` for a folder, a hub id or a ``FetchSource``."""
    if isinstance(source, FetchSource):
        fetch_from, where = source
        return FetchSource(fetch_from, f"{str(where).rstrip('/')}/{filename}")
    return f"{str(source).rstrip('/')}/{filename}"


def config_overrides(config):
    """The keys of a model configuration that differ from its type's defaults.

    Arguments
    ---------
    config : transformers.PretrainedConfig
        The model's configuration.

    Returns
    -------
    dict
        ``model_type`` first, then every non-default key.

    Example
    -------
    >>> config = AutoConfig.for_model("wav2vec2", num_hidden_layers=2)
    >>> config_overrides(config)
    {'model_type': 'wav2vec2', 'num_hidden_layers': 2}
    """
    default = AutoConfig.for_model(config.model_type).to_dict()
    values = config.to_dict()
    return {"model_type": config.model_type} | {
        key: value
        for key, value in values.items()
        if key not in _CONFIG_NOISE and default.get(key, not value) != value
    }


def copied_definitions(hparams_file, overrides, keys):
    """Top-level entries of a HyperPyYAML file, with their references resolved.

    References between the copied entries stay ``!ref <key>``; a reference to
    anything else is replaced by its value.

    Arguments
    ---------
    hparams_file : str or os.PathLike
        The training YAML.
    overrides : dict or str
        The overrides the run used (as ``load_hyperpyyaml`` takes them).
    keys : sequence of str
        The entries to copy, in order.

    Returns
    -------
    str
        YAML text.

    Example
    -------
    >>> f = os.path.join(tempfile.mkdtemp(), "train.yaml")
    >>> _ = open(f, "w").write(
    ...     "n: 3\\nlin: !new:torch.nn.Linear\\n    in_features: !ref <n>\\n"
    ...     "    out_features: 2\\nboth: !new:torch.nn.ModuleList [[!ref <lin>]]\\n"
    ... )
    >>> print(copied_definitions(f, {"n": 4}, ["lin", "both"]))
    lin: !new:torch.nn.Linear
      in_features: 4
      out_features: 2
    both: !new:torch.nn.ModuleList [[!ref <lin>]]
    <BLANKLINE>
    """
    with open(hparams_file, encoding="utf-8") as fin:
        resolved = resolve_references(fin, overrides).getvalue()
    yaml = ruamel.yaml.YAML()
    tree = yaml.load(resolved)
    missing = [key for key in keys if key not in tree]
    if missing:
        raise KeyError(
            f"{hparams_file}: no top-level entries {missing}; name the modules "
            "of the head as they are called in this file."
        )
    out = io.StringIO()
    yaml.dump({key: tree[key] for key in keys}, out)
    text = out.getvalue()
    anchors = dict(re.findall(r"^(\w+): &(\w+) ", text, re.M))
    for key, anchor in anchors.items():
        text = text.replace(f"{key}: &{anchor} ", f"{key}: ")
        text = re.sub(rf"\*{re.escape(anchor)}\b", f"!ref <{key}>", text)
    return text


def inference_hparams(
    lobe,
    head_definitions,
    head_keys,
    encoder_keys,
    decoder="ctc",
    token_type="char",
    decoding="greedy",
    blank_index=0,
    beam_search=None,
    searcher_key=None,
    labels=None,
):
    """The text of an inference ``hyperparams.yaml``.

    Arguments
    ---------
    lobe : speechbrain_spg.lobes.SPGLobeMixin or CompactWav2Vec2
        The compressed encoder (its configuration and ``output_norm``).
    head_definitions : str
        The head modules' YAML (``copied_definitions``).
    head_keys : sequence of str
        The modules saved in ``head.ckpt``, in order.
    encoder_keys : sequence of str
        The modules applied after the SSL model, in order (for CTC: up to the
        log-softmax; for CTC/attention: the encoder's own layers).
    decoder : str
        ``ctc`` (``EncoderASR``) or ``ctc_attention`` (``EncoderDecoderASR``).
    token_type : str
        ``char`` or ``bpe``.
    decoding : str
        CTC decoding: ``greedy`` or ``beam``.
    blank_index : int
        The CTC blank.
    beam_search : dict, optional
        Options of SpeechBrain's ``CTCBeamSearcher`` (``decoding: beam``).
    searcher_key : str, optional
        The copied entry that decodes (``ctc_attention``).
    labels : int, optional
        The number of output units, checked when a character tokenizer loads.

    Returns
    -------
    str

    Example
    -------
    >>> from speechbrain_spg.data.architectures import tiny_model_folder
    >>> from speechbrain_spg.lobes import SPGWav2Vec2
    >>> lobe = SPGWav2Vec2(tiny_model_folder(), save_path="")
    >>> head = "lin: !new:speechbrain.nnet.linear.Linear {input_size: 32, n_neurons: 5}\\n"
    >>> text = inference_hparams(lobe, head, ["lin"], ["lin"])
    >>> text.splitlines()[0], "asr_interface: EncoderASR" in text
    ('# ############################################################################', True)
    """
    if decoder not in INTERFACES:
        raise ValueError(f"decoder must be one of {sorted(INTERFACES)}.")
    config = config_overrides(lobe.model.config)
    lines = [
        "# " + "#" * 76,
        f"# Inference with an SPG-compressed {config['model_type']} "
        f"({INTERFACES[decoder]}), written by",
        "# speechbrain-spg. Load it with:",
        f"#   speechbrain.inference.ASR.{INTERFACES[decoder]}.from_hparams(",
        "#       source=<this folder>, savedir=<a folder>)",
        "# or transcribe files: python -m speechbrain_spg.transcribe <this folder> AUDIO...",
        "# " + "#" * 76,
        "",
        f"asr_interface: {INTERFACES[decoder]}",
        f"blank_index: {blank_index}",
        "",
        "# ---- Compact SSL encoder (weights: compact.safetensors) ----",
        "ssl: !new:speechbrain_spg.export.CompactWav2Vec2",
        "    output_norm: " + str(bool(lobe.output_norm)),
        "    freeze: True",
        "    normalize_wav: " + str(bool(getattr(lobe, "normalize_wav", True))),
        "    config:",
    ]
    for key, value in config.items():
        lines.append(f"        {key}: {_flow(value)}")
    lines += [
        "",
        "# ---- Head, copied from the training YAML (weights: head.ckpt) ----",
        head_definitions.rstrip(),
        "head: !new:torch.nn.ModuleList",
        "    - [" + ", ".join(f"!ref <{k}>" for k in head_keys) + "]",
        "encoder: !new:speechbrain.nnet.containers.LengthsCapableSequential",
        "    ssl: !ref <ssl>",
        *(f"    {key}: !ref <{key}>" for key in encoder_keys),
        "",
        "# ---- Tokenizer and decoding ----",
    ]
    if token_type == "bpe":
        lines.append("tokenizer: !new:sentencepiece.SentencePieceProcessor")
    else:
        lines.append(
            "tokenizer: !new:speechbrain_spg.tools.inference.CharTokenizer"
        )
        if labels is not None:
            lines.append(f"    expected_len: {labels}")
    modules = ["    encoder: !ref <encoder>"]
    if decoder == "ctc_attention":
        modules.append(f"    decoder: !ref <{searcher_key}>")
    elif decoding == "beam":
        lines.append(
            "decoding_function: !name:speechbrain.decoders.ctc.CTCBeamSearcher"
        )
        lines.append(f"test_beam_search: {_flow(dict(beam_search or {}))}")
    else:
        lines += [
            "decoding_function: !name:speechbrain.decoders.ctc_greedy_decode",
            "    blank_id: !ref <blank_index>",
        ]
    lines += [
        "",
        "# ---- What the inference class runs, and the files it loads ----",
        "modules:",
        *modules,
        "pretrainer: !new:speechbrain_spg.tools.inference.FolderPretrainer",
        "    loadables:",
        "        ssl: !ref <ssl>",
        "        head: !ref <head>",
        "        tokenizer: !ref <tokenizer>",
        "    paths:",
        "        ssl: compact.safetensors",
        f"        head: {HEAD_FILE}",
        f"        tokenizer: {TOKENIZER_FILES[token_type]}",
        "",
    ]
    return "\n".join(lines)


def _flow(value):
    """A value as one line of YAML (flow style)."""
    yaml = ruamel.yaml.YAML()
    yaml.default_flow_style = True
    yaml.width = 4096
    out = io.StringIO()
    yaml.dump(value, out)
    text = out.getvalue().strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def write_inference_folder(
    lobe,
    folder,
    head,
    tokenizer_file,
    hparams_text,
    dtype="float32",
    dense_hf=False,
):
    """Exports the pruned lobe with its head, tokenizer and inference YAML.

    The folder is written in one rename (``export_compact``): an interrupted
    run leaves the previous folder or none. The manifest holds the sha256 of
    every file.

    Arguments
    ---------
    lobe : speechbrain_spg.lobes.SPGLobeMixin
        The pruned lobe.
    folder : str or os.PathLike
        The inference folder (replaced if it exists).
    head : torch.nn.Module
        The head (a ``ModuleList`` of the modules ``head_keys`` names).
    tokenizer_file : str or os.PathLike
        ``label_encoder.txt`` or ``tokenizer.model``.
    hparams_text : str
        ``inference_hparams``'s text.
    dtype : str
        Storage type of the compact weights (``float32``, ``float16``).
    dense_hf : bool
        Also write the dense ``hf/`` folder.

    Returns
    -------
    dict
        The manifest.

    Example
    -------
    >>> from speechbrain_spg.data.architectures import tiny_model_folder
    >>> from speechbrain_spg.lobes import SPGWav2Vec2
    >>> lobe = SPGWav2Vec2(tiny_model_folder(), save_path="")
    >>> work = tempfile.mkdtemp()
    >>> labels = os.path.join(work, "label_encoder.txt")
    >>> CharTokenizer().save(labels)
    >>> _ = write_inference_folder(
    ...     lobe, os.path.join(work, "out"), torch.nn.Linear(2, 2), labels, "a: 1\\n"
    ... )
    >>> sorted(os.listdir(os.path.join(work, "out")))
    ['compact.safetensors', 'head.ckpt', 'hyperparams.yaml', 'label_encoder.txt', 'spg_manifest.json']
    """
    with tempfile.TemporaryDirectory() as work:
        head_path = os.path.join(work, HEAD_FILE)
        torch.save(head.state_dict(), head_path)
        yaml_path = os.path.join(work, HPARAMS_FILE)
        with open(yaml_path, "w", encoding="utf-8") as fout:
            fout.write(hparams_text)
        files = {
            HEAD_FILE: head_path,
            HPARAMS_FILE: yaml_path,
            os.path.basename(tokenizer_file): tokenizer_file,
        }
        return export_compact(
            lobe,
            folder,
            dtype=dtype,
            overwrite=True,
            dense_hf=dense_hf,
            extra_files=files,
        )


def model_card(manifest, results, interface="EncoderASR", license_id=None):
    """The text of an inference folder's ``README.md``.

    Arguments
    ---------
    manifest : dict
        The export's manifest (``read_manifest``).
    results : dict
        ``{"wer": {split: percent}, "cer": {split: percent}}`` of this
        folder's evaluation (as ``summary.evaluate_splits`` returns them).
    interface : str
        ``EncoderASR`` or ``EncoderDecoderASR``.
    license_id : str, optional
        The license of the source model (its model card says which applies to
        derived weights); ``unknown`` if not given.

    Returns
    -------
    str
        Markdown with a HuggingFace metadata header.

    Example
    -------
    >>> manifest = {
    ...     "source": "facebook/wav2vec2-base", "model_type": "wav2vec2",
    ...     "spg": {"target_sparsity": 0.65, "target_scope": "gated",
    ...             "gated_target": 0.65, "calibration_factor": None},
    ...     "params": {"total": 10, "gated": 8, "removed": 5, "nonzero": 5},
    ...     "sparsity": {"gated": 0.625, "model": 0.5, "compression_ratio": 2.0},
    ...     "layers": [{"name": "q", "numel": 8, "sparsity": 0.625,
    ...                 "threshold": 0.1}], "dtype": "float32"}
    >>> rates = {"wer": {"test-clean": 7.0}, "cer": {"test-clean": 2.0}}
    >>> card = model_card(manifest, rates)
    >>> "| test-clean | 7.00 | 2.00 |" in card, "license: unknown" in card
    (True, True)
    """
    structure = manifest.get("structure")
    spg, params, sparsity = (
        manifest["spg"],
        manifest["params"],
        manifest["sparsity"],
    )
    lines = [
        "---",
        f"license: {license_id or 'unknown'}",
        "library_name: speechbrain",
        f"base_model: {manifest['source']}",
        "pipeline_tag: automatic-speech-recognition",
        f"tags: [speechbrain-spg, pruning, {manifest['model_type']}, ctc]",
        "---",
        "",
        f"# {manifest['model_type']} compressed with self-pinching gates (SPG)",
        "",
        f"Source model: `{manifest['source']}` (its license field: "
        f"{license_id or 'unknown, check the source model card'}). "
        + _gate_sentence(structure),
        "",
        "| | value |",
        "|---|---:|",
        f"| target sparsity ({spg['target_scope']}) | "
        f"{spg['target_sparsity']:.4f} |",
        f"| reached sparsity, gated matrices | {sparsity['gated']:.4f} |",
        f"| reached sparsity, whole SSL model | {sparsity['model']:.4f} |",
        f"| parameters, total | {params['total']:,} |",
        f"| parameters, nonzero | {params['nonzero']:,} |",
        f"| compression ratio | {sparsity['compression_ratio']:.2f}x |",
        f"| stored as | {_storage(manifest['dtype'], structure)} |",
        "",
        "## Error rates of this folder",
        "",
        "| split | WER % | CER % |",
        "|---|---:|---:|",
        *(
            f"| {split} | {wer:.2f} | {results['cer'][split]:.2f} |"
            for split, wer in results["wer"].items()
        ),
        "",
        "## Use it",
        "",
        "```bash",
        "python -m speechbrain_spg.transcribe <this folder> audio.wav",
        "```",
        "",
        "```python",
        f"from speechbrain.inference.ASR import {interface}",
        "",
        f'asr = {interface}.from_hparams(source="<this folder>", '
        'savedir="pretrained_spg")',
        'print(asr.transcribe_file("audio.wav"))',
        "```",
        "",
        "Requires `pip install speechbrain-spg`. `spg_manifest.json` holds the "
        "configuration, the thresholds and the sha256 of every file.",
        "",
        "## Sparsity per matrix",
        "",
        "| matrix | weights | sparsity | threshold |",
        "|---|---:|---:|---:|",
        *(
            f"| {layer['name']} | {layer['numel']:,} | "
            f"{layer['sparsity']:.4f} | {layer['threshold']:.4g} |"
            for layer in manifest["layers"]
        ),
        "",
    ]
    return "\n".join(lines)


def _gate_sentence(structure):
    """How the model card's model was compressed (weights or units)."""
    if structure is None:
        return (
            "Every attention and feed-forward matrix of its transformer "
            "encoder was fine-tuned for ASR through the gate `W * "
            "sigmoid((W^2 - t^2) / (2 tau))` with one learned threshold `t` "
            "per group, then pruned to `|W| > t` (speechbrain-spg; the "
            "sparsity controller is that project's design, not the SPG "
            "paper's)."
        )
    return (
        "Every attention head and feed-forward unit of its transformer "
        "encoder was fine-tuned for ASR through the gate `sigmoid((s^2 - "
        "t^2) / (2 tau))` of the mean square `s^2` of its weights, with one "
        "learned threshold `t` per group, then removed where `s <= t`: the "
        "matrices are smaller (speechbrain-spg's structured gates, beyond "
        "the SPG paper's)."
    )


def _storage(dtype, structure):
    """The model card's 'stored as' cell."""
    if structure is None:
        return f"{dtype} values + 1 bit per gated weight"
    heads = [len(kept) for kept in structure["attention_heads"]]
    return (
        f"{dtype}, smaller matrices: heads per block {heads}, feed-forward "
        f"sizes {structure['intermediate_sizes']}"
    )


def write_model_card(folder, results, license_id=None):
    """Writes ``README.md`` into an inference folder from its manifest.

    Arguments
    ---------
    folder : str or os.PathLike
        The inference folder.
    results : dict
        ``{"wer": {split: percent}, "cer": {split: percent}}``.
    license_id : str, optional
        The source model's license.

    Returns
    -------
    str
        The path written.

    Example
    -------
    >>> from speechbrain_spg.data.architectures import tiny_model_folder
    >>> from speechbrain_spg.lobes import SPGWav2Vec2
    >>> out = os.path.join(tempfile.mkdtemp(), "out")
    >>> _ = export_compact(SPGWav2Vec2(tiny_model_folder(), save_path=""), out)
    >>> path = write_model_card(out, {"wer": {"dev": 1.0}, "cer": {"dev": 0.5}})
    >>> open(path).read().count("| encoder.layers.")
    12
    """
    manifest = read_manifest(folder, verify=False)
    interface = asr_interface(folder)
    path = os.path.join(os.fspath(folder), CARD_FILE)
    with open(path, "w", encoding="utf-8") as fout:
        fout.write(model_card(manifest, results, interface, license_id))
    return path


def asr_interface(folder):
    """The SpeechBrain inference class name an inference folder declares.

    Arguments
    ---------
    folder : str or os.PathLike
        The folder.

    Returns
    -------
    str
        ``EncoderASR`` or ``EncoderDecoderASR`` (``EncoderASR`` if the folder
        has no ``hyperparams.yaml`` or does not say).

    Example
    -------
    >>> asr_interface(tempfile.mkdtemp())
    'EncoderASR'
    """
    path = os.path.join(os.fspath(folder), HPARAMS_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fin:
            found = re.search(r"^asr_interface:\s*(\w+)", fin.read(), re.M)
        if found and found.group(1) in INTERFACES.values():
            return found.group(1)
    return "EncoderASR"


def check_inference_folder(folder):
    """Refuses a folder that is not an inference folder, naming what is missing.

    Arguments
    ---------
    folder : str or os.PathLike
        The folder.

    Example
    -------
    >>> check_inference_folder(tempfile.mkdtemp())  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    FileNotFoundError: ... is not an SPG inference folder: missing hyperparams.yaml, spg_manifest.json, compact.safetensors, head.ckpt, ...
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder.")
    needed = [HPARAMS_FILE, MANIFEST, "compact.safetensors", HEAD_FILE]
    missing = [n for n in needed if not os.path.isfile(os.path.join(folder, n))]
    if not any(
        os.path.isfile(os.path.join(folder, name))
        for name in TOKENIZER_FILES.values()
    ):
        missing.append(" or ".join(TOKENIZER_FILES.values()))
    if missing:
        raise FileNotFoundError(
            f"{folder} is not an SPG inference folder: missing "
            f"{', '.join(missing)} (a compressed run of the recipe writes one "
            "in <output_folder>/compact; a drop-in run: python -m "
            "speechbrain_spg.tools.finish)."
        )


def load_asr(folder, savedir=None, device="cpu"):
    """Loads an inference folder with its SpeechBrain inference class.

    Arguments
    ---------
    folder : str or os.PathLike
        The inference folder (checked first, checksums verified).
    savedir : str or os.PathLike, optional
        Where SpeechBrain links the files (default: a temporary folder).
    device : str
        ``cpu``, ``cuda``, ``cuda:1``, ...

    Returns
    -------
    speechbrain.inference.ASR.EncoderASR or EncoderDecoderASR
    """
    from speechbrain.inference import ASR

    check_inference_folder(folder)
    read_manifest(folder)  # the checksums of every file
    if savedir is None:
        savedir = tempfile.mkdtemp(prefix="spg-inference-")
    cls = getattr(ASR, asr_interface(folder))
    return cls.from_hparams(
        source=os.path.abspath(os.fspath(folder)),
        savedir=os.fspath(savedir),
        run_opts={"device": device},
    )


def recipe_folder_writer(hparams, hparams_file, overrides):
    """How the LibriSpeech SPG recipe writes its inference folder.

    Its YAMLs name the head modules ``enc`` and ``ctc_lin`` (and ``emb``,
    ``dec``, ``seq_lin`` with ``decoder: ctc_attention``, decoded by
    ``test_searcher``); its tokenizer file is in ``save_folder``;
    ``export_dtype`` and ``export_dense_hf`` choose the storage.

    Arguments
    ---------
    hparams : dict
        The loaded recipe YAML.
    hparams_file : str
        Its path.
    overrides : str or dict
        The run's overrides.

    Returns
    -------
    callable
        ``write(lobe, folder)`` -> manifest, for
        ``summary.prune_and_export``.

    Example
    -------
    >>> hparams = {"decoder": "ctc", "token_type": "char", "save_folder": "x"}
    >>> callable(recipe_folder_writer(hparams, "train.yaml", {}))
    True
    """
    attention = hparams["decoder"] == "ctc_attention"
    tokenizer_file = os.path.join(
        hparams["save_folder"], TOKENIZER_FILES[hparams["token_type"]]
    )
    head_keys = ["enc", "ctc_lin"]
    if attention:
        head_keys += ["emb", "dec", "seq_lin"]
    copied = head_keys + (
        ["ctc_scorer", "scorer", "test_searcher"]
        if attention
        else ["log_softmax"]
    )

    def write(lobe, folder):
        text = inference_hparams(
            lobe,
            copied_definitions(hparams_file, overrides, copied),
            head_keys,
            ["enc"] if attention else ["enc", "ctc_lin", "log_softmax"],
            decoder=hparams["decoder"],
            token_type=hparams["token_type"],
            decoding=hparams.get("test_search", "greedy"),
            blank_index=hparams["blank_index"],
            beam_search=hparams.get("test_beam_search"),
            searcher_key="test_searcher",
            labels=hparams["output_neurons"],
        )
        return write_inference_folder(
            lobe,
            folder,
            hparams["head"],
            tokenizer_file,
            text,
            dtype=hparams.get("export_dtype", "float32"),
            dense_hf=hparams.get("export_dense_hf", False),
        )

    return write


def usage_lines(folder):
    """The two lines that transcribe with an inference folder.

    Arguments
    ---------
    folder : str or os.PathLike
        The inference folder.

    Returns
    -------
    list of str
        A shell command and a Python line.

    Example
    -------
    >>> usage_lines("out/compact")[0]
    'python -m speechbrain_spg.transcribe out/compact AUDIO.wav'
    """
    folder = os.fspath(folder)
    interface = asr_interface(folder)
    return [
        f"python -m speechbrain_spg.transcribe {folder} AUDIO.wav",
        f"from speechbrain.inference.ASR import {interface}; "
        f'print({interface}.from_hparams(source="{folder}", '
        'savedir="pretrained_spg").transcribe_file("AUDIO.wav"))',
    ]


def publish(folder, results, license_id=None):
    """Writes the model card of an evaluated inference folder and prints how
    to transcribe with it.

    Arguments
    ---------
    folder : str or os.PathLike
        The inference folder.
    results : dict
        ``{"wer": {split: percent}, "cer": {split: percent}}``.
    license_id : str, optional
        The source model's license.

    Example
    -------
    >>> from speechbrain_spg.data.architectures import tiny_model_folder
    >>> from speechbrain_spg.lobes import SPGWav2Vec2
    >>> out = os.path.join(tempfile.mkdtemp(), "out")
    >>> _ = export_compact(SPGWav2Vec2(tiny_model_folder(), save_path=""), out)
    >>> publish(out, {"wer": {}, "cer": {}})  # doctest: +ELLIPSIS
    Transcribe with the compressed model:
      python -m speechbrain_spg.transcribe .../out AUDIO.wav
      from speechbrain.inference.ASR import EncoderASR; print(...)
    """
    write_model_card(folder, results, license_id)
    print("Transcribe with the compressed model:")
    for line in usage_lines(folder):
        print(f"  {line}")


def hidden_size(folder):
    """The width of an exported model's output features (the input size of
    the head a recipe puts on it: 768 for base models, 1024 for large ones).

    Arguments
    ---------
    folder : str or os.PathLike
        An export or inference folder.

    Returns
    -------
    int

    Example
    -------
    >>> from speechbrain_spg.data.architectures import tiny_model_folder
    >>> from speechbrain_spg.lobes import SPGWav2Vec2
    >>> out = os.path.join(tempfile.mkdtemp(), "out")
    >>> _ = export_compact(SPGWav2Vec2(tiny_model_folder(), save_path=""), out)
    >>> hidden_size(out)
    32
    """
    return int(read_manifest(folder, verify=False)["config"]["hidden_size"])
