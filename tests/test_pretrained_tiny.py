"""The shipped tiny model recognises the synthetic corpus (round trip).

A handful of utterances of NEW sentences (a seed the model was not trained
on) are synthesised with eSpeak NG, decoded by the shipped dense model with
greedy CTC, and compared with the transcripts the corpus wrote: this checks
both that transcripts match what was spoken and that the shipped model works.
"""

import os

import pytest
import soundfile as sf
import torch
from speechbrain.dataio.encoder import CTCTextEncoder
from speechbrain.decoders import ctc_greedy_decode
from speechbrain.integrations.huggingface.wav2vec2 import Wav2Vec2
from speechbrain.nnet.linear import Linear
from speechbrain.utils.metric_stats import ErrorRateStats

from speechbrain_spg.data.synthetic import generate_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAINED = os.path.join(
    ROOT, "recipes", "LibriSpeech", "spg", "pretrained", "tiny_w2v2"
)


def read_split(split_dir):
    """(utterance id, flac path, transcript) of every utterance of a split."""
    rows = []
    for root, _, files in os.walk(split_dir):
        for name in files:
            if name.endswith(".trans.txt"):
                with open(os.path.join(root, name)) as f:
                    for line in f:
                        uid, text = line.strip().split(" ", 1)
                        rows.append(
                            (uid, os.path.join(root, uid + ".flac"), text)
                        )
    return sorted(rows)


@pytest.fixture(scope="module")
def shipped_model(tmp_path_factory):
    """SpeechBrain lobe + head + label encoder of pretrained/tiny_w2v2."""
    lobe = Wav2Vec2(
        os.path.join(PRETRAINED, "hf"),
        save_path=str(tmp_path_factory.mktemp("ssl")),
        output_norm=True,
        freeze=True,
    )
    head = torch.nn.ModuleList(
        [
            Linear(input_size=192, n_neurons=192),
            Linear(input_size=192, n_neurons=31),
        ]
    )
    head.load_state_dict(torch.load(os.path.join(PRETRAINED, "head.ckpt")))
    encoder = CTCTextEncoder()
    encoder.load(os.path.join(PRETRAINED, "label_encoder.txt"))
    return lobe.eval(), head.eval(), encoder


def test_shipped_model_files_are_small():
    total = sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, files in os.walk(PRETRAINED)
        for name in files
    )
    assert total <= 10 * 1024 * 1024


def test_round_trip_cer_below_20_percent(shipped_model, tmp_path):
    lobe, head, encoder = shipped_model
    generate_corpus(tmp_path, hours=0.006, seed=777, progress=False)
    rows = read_split(tmp_path / "LibriSpeech" / "train-clean-100")[:6]
    assert len(rows) >= 5
    stats = ErrorRateStats(split_tokens=True)
    with torch.no_grad():
        for uid, path, text in rows:
            wav = torch.tensor(sf.read(path, dtype="float32")[0]).unsqueeze(0)
            logits = head[1](head[0](lobe(wav)))
            tokens = ctc_greedy_decode(
                logits.log_softmax(-1), torch.ones(1), blank_id=0
            )[0]
            hyp = "".join(encoder.decode_ndim(tokens)).split()
            stats.append([uid], [hyp], [text.split()])
    cer = stats.summarize("error_rate")
    assert cer < 20.0, f"round-trip CER {cer:.1f}% on {len(rows)} utterances"
