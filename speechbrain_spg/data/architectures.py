"""Known SSL architectures, built from their configurations without download.

Model weights cannot always be downloaded (air-gapped clusters, CI). This
module keeps the configurations of the hub models the recipes use, so that a
full-size architecture can be built with random weights (to count parameters,
test structure and export), and builds tiny models of each family for tests.

Authors
 * speechbrain-spg developers 2026
"""

import os
import tempfile

import torch
from transformers import (
    HubertConfig,
    HubertModel,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Model,
    WavLMConfig,
    WavLMModel,
)

#: HF ``model_type`` -> (config class, model class).
FAMILIES = {
    "wav2vec2": (Wav2Vec2Config, Wav2Vec2Model),
    "hubert": (HubertConfig, HubertModel),
    "wavlm": (WavLMConfig, WavLMModel),
}

_LARGE = dict(
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    intermediate_size=4096,
    feat_extract_norm="layer",
    conv_bias=True,
    do_stable_layer_norm=True,
)

#: Hub id -> (model_type, config overrides on top of the family defaults).
HUB_CONFIGS = {
    "facebook/wav2vec2-base": ("wav2vec2", {}),
    "facebook/wav2vec2-large-lv60": ("wav2vec2", _LARGE),
    "facebook/hubert-base-ls960": ("hubert", {}),
    "facebook/hubert-large-ll60k": ("hubert", _LARGE),
    "microsoft/wavlm-base-plus": ("wavlm", {}),
    "microsoft/wavlm-large": ("wavlm", _LARGE),
}

#: A cheap configuration (about 0.1M parameters) for unit tests.
TINY_OVERRIDES = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    conv_dim=(16, 16),
    conv_kernel=(10, 8),
    conv_stride=(5, 4),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=2,
    feat_extract_norm="layer",
    num_buckets=8,
    max_bucket_distance=32,
)


def build_config(model_type, **overrides):
    """Builds a HuggingFace config of one SSL family.

    Arguments
    ---------
    model_type : str
        One of ``"wav2vec2"``, ``"hubert"``, ``"wavlm"``.
    **overrides
        Config fields to set.

    Returns
    -------
    transformers.PretrainedConfig
        The configuration.

    Example
    -------
    >>> build_config("hubert", hidden_size=64).hidden_size
    64
    """
    if model_type not in FAMILIES:
        raise ValueError(
            f"Unknown model_type {model_type!r}; expected one of "
            f"{sorted(FAMILIES)}."
        )
    config_class, _ = FAMILIES[model_type]
    return config_class(**overrides)


def hub_config(hub_id):
    """Returns the configuration of a known hub model without downloading.

    Arguments
    ---------
    hub_id : str
        A key of ``HUB_CONFIGS``, e.g. ``"facebook/wav2vec2-base"``.

    Returns
    -------
    transformers.PretrainedConfig
        The configuration of that architecture.

    Example
    -------
    >>> hub_config("facebook/hubert-large-ll60k").num_hidden_layers
    24
    """
    if hub_id not in HUB_CONFIGS:
        raise ValueError(
            f"No stored configuration for {hub_id!r}; known: "
            f"{sorted(HUB_CONFIGS)}."
        )
    model_type, overrides = HUB_CONFIGS[hub_id]
    return build_config(model_type, **overrides)


def build_model(config, seed=0):
    """Builds a randomly initialised SSL model from its configuration.

    Arguments
    ---------
    config : transformers.PretrainedConfig
        A wav2vec2, HuBERT or WavLM configuration.
    seed : int
        Seed of the random initialisation.

    Returns
    -------
    transformers.PreTrainedModel
        The model (``Wav2Vec2Model``, ``HubertModel`` or ``WavLMModel``).

    Example
    -------
    >>> model = build_model(build_config("wav2vec2", **TINY_OVERRIDES))
    >>> type(model).__name__
    'Wav2Vec2Model'
    """
    _, model_class = FAMILIES[config.model_type]
    torch.manual_seed(seed)
    return model_class(config)


def save_random_model(config, path, seed=0):
    """Writes a randomly initialised model as a local HuggingFace folder.

    The folder holds ``config.json``, ``model.safetensors`` and
    ``preprocessor_config.json``, so that it can stand in for a hub id as the
    ``source`` of a SpeechBrain lobe.

    Arguments
    ---------
    config : transformers.PretrainedConfig
        The architecture.
    path : str or os.PathLike
        Output folder (created).
    seed : int
        Seed of the random initialisation.

    Returns
    -------
    str
        The folder.

    Example
    -------
    >>> import tempfile
    >>> tiny = build_config("hubert", **TINY_OVERRIDES)
    >>> out = save_random_model(tiny, tempfile.mkdtemp())
    >>> sorted(os.listdir(out))
    ['config.json', 'model.safetensors', 'preprocessor_config.json']
    """
    os.makedirs(path, exist_ok=True)
    build_model(config, seed=seed).save_pretrained(path)
    default_feature_extractor().save_pretrained(path)
    return str(path)


def tiny_model_folder(model_type="wav2vec2", seed=0):
    """A tiny random model of one family, saved in a new temporary folder.

    For examples and quick trials: ``TINY_OVERRIDES``' sizes (about 0.1M
    parameters), no download; pass the folder as a lobe's ``source``.

    Arguments
    ---------
    model_type : str
        ``"wav2vec2"``, ``"hubert"`` or ``"wavlm"``.
    seed : int
        Seed of the random initialisation.

    Returns
    -------
    str
        The folder (made with ``tempfile.mkdtemp``; the caller removes it).

    Example
    -------
    >>> folder = tiny_model_folder("wavlm")
    >>> sorted(os.listdir(folder))
    ['config.json', 'model.safetensors', 'preprocessor_config.json']
    """
    return save_random_model(
        build_config(model_type, **TINY_OVERRIDES),
        tempfile.mkdtemp(prefix=f"tiny_{model_type}_"),
        seed,
    )


#: The CTC head of ``tiny_inference_folder`` (a recipe's YAML entries).
TINY_HEAD_YAML = """\
ssl_dim: 32
dnn_neurons: 16
output_neurons: {labels}
enc: !new:speechbrain.nnet.linear.Linear
    input_size: !ref <ssl_dim>
    n_neurons: !ref <dnn_neurons>
ctc_lin: !new:speechbrain.nnet.linear.Linear
    input_size: !ref <dnn_neurons>
    n_neurons: !ref <output_neurons>
log_softmax: !new:speechbrain.nnet.activations.Softmax
    apply_log: True
"""


def tiny_inference_folder(work, source=None, lobe=None):
    """A tiny CTC inference folder in ``work/compact``, for examples and
    tests of what reads one (transcription, ONNX): the SPG lobe of a tiny
    wav2vec2 pruned to 65% (random weights), a random head and a character
    tokenizer (blank + LibriSpeech's alphabet).

    Arguments
    ---------
    work : str or os.PathLike
        An existing folder; ``compact/``, ``label_encoder.txt`` and
        ``train.yaml`` are written in it.
    source : str, optional
        The tiny model (default: a new ``tiny_model_folder()``).
    lobe : SPGLobeMixin, optional
        A pruned tiny lobe to export instead (e.g. a structured one).

    Returns
    -------
    pathlib.Path
        The inference folder.

    Example
    -------
    >>> folder = tiny_inference_folder(tempfile.mkdtemp())
    >>> "hyperparams.yaml" in os.listdir(folder)
    True
    """
    import pathlib

    from speechbrain.nnet.linear import Linear

    from speechbrain_spg.lobes import SPGWav2Vec2
    from speechbrain_spg.tools.inference import (
        CharTokenizer,
        copied_definitions,
        inference_hparams,
        write_inference_folder,
    )

    work = pathlib.Path(work)
    torch.manual_seed(0)
    if lobe is None:
        source = tiny_model_folder() if source is None else source
        lobe = SPGWav2Vec2(str(source), save_path="", target_sparsity=0.65)
        lobe.hard_prune()
    tokenizer = CharTokenizer()
    tokenizer.insert_blank(index=0)
    tokenizer.update_from_iterable(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZ' ", sequence_input=False
    )
    labels = str(work / "label_encoder.txt")
    tokenizer.save(labels)
    train_yaml = work / "train.yaml"
    train_yaml.write_text(TINY_HEAD_YAML.format(labels=len(tokenizer)))
    head = torch.nn.ModuleList(
        [
            Linear(input_size=32, n_neurons=16),
            Linear(input_size=16, n_neurons=len(tokenizer)),
        ]
    )
    keys = ["enc", "ctc_lin", "log_softmax"]
    text = inference_hparams(
        lobe,
        copied_definitions(train_yaml, {}, keys),
        ["enc", "ctc_lin"],
        keys,
        labels=len(tokenizer),
    )
    out = work / "compact"
    write_inference_folder(lobe, out, head, labels, text)
    return out


def default_feature_extractor():
    """Returns the wav2vec2-style preprocessor that all three families use.

    Returns
    -------
    transformers.Wav2Vec2FeatureExtractor
        16 kHz, normalised waveform, with attention mask.

    Example
    -------
    >>> default_feature_extractor().sampling_rate
    16000
    """
    return Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=16000,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=True,
    )


def ensure_random_model(model_type, path, seed=0, **overrides):
    """Writes a randomly initialised model folder unless it already exists.

    Used by recipes that train an SSL model from scratch (the tiny models):
    called from YAML with ``!apply:`` before the lobe that loads ``path``.

    Arguments
    ---------
    model_type : str
        ``"wav2vec2"``, ``"hubert"`` or ``"wavlm"``.
    path : str or os.PathLike
        Output folder; left untouched if it already holds a model.
    seed : int
        Seed of the random initialisation.
    **overrides
        Configuration fields (lists are turned into tuples).

    Returns
    -------
    str
        The folder.

    Example
    -------
    >>> import tempfile
    >>> out = os.path.join(tempfile.mkdtemp(), "init")
    >>> _ = ensure_random_model("wav2vec2", out, **TINY_OVERRIDES)
    >>> before = os.path.getmtime(os.path.join(out, "model.safetensors"))
    >>> _ = ensure_random_model("wav2vec2", out, **TINY_OVERRIDES)
    >>> os.path.getmtime(os.path.join(out, "model.safetensors")) == before
    True
    """
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return str(path)
    fields = {
        key: tuple(value) if isinstance(value, list) else value
        for key, value in overrides.items()
    }
    return save_random_model(build_config(model_type, **fields), path, seed)
