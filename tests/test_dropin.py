"""SPG inside another SpeechBrain recipe: a recipe shaped like SpeechBrain's
LibriSpeech CTC recipe (``train_hf_wav2vec.yaml``: the same entry names and
classes, a tiny model and a few random utterances).

- README "Deploy and reuse": its YAML entries, put in place of the recipe's
  ``wav2vec2`` and ``enc``, load an inference folder with the head sized from
  it, and fine-tuning keeps every pruned weight at zero.
- README "Reuse SPG in another recipe": the drop-in fragment trains inside
  the recipe's own Brain, and ``python -m speechbrain_spg.tools.finish``
  prunes, exports and evaluates its newest checkpoint.
"""

import csv
import re

import pytest
import soundfile
import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.dataio.dataio import read_audio
from speechbrain.dataio.dataset import DynamicItemDataset
from speechbrain.utils.metric_stats import ErrorRateStats

from conftest import REPO
from speechbrain_spg.export import CompactWav2Vec2, read_manifest
from speechbrain_spg.lobes import SPGWav2Vec2
from speechbrain_spg.tools import finish
from speechbrain_spg.tools.inference import load_asr

README = (REPO / "README.md").read_text(encoding="utf-8")
ALPHABET = "AB "

#: The recipe, with the entries the README's snippets replace marked.
RECIPE_YAML = """\
seed: 1986
__set_seed: !apply:speechbrain.utils.seed_everything [!ref <seed>]
output_folder: !PLACEHOLDER
save_folder: !ref <output_folder>/save
wav2vec2_hub: !PLACEHOLDER
wav2vec2_folder: !ref <save_folder>/wav2vec2_checkpoint
data_folder: !PLACEHOLDER
test_csv:
    - !ref <data_folder>/test-clean.csv
lr_wav2vec: 0.001
activation: !name:torch.nn.LeakyReLU
dnn_layers: 1
dnn_neurons: 16
freeze_wav2vec: False
output_neurons: 4
blank_index: 0
label_encoder: !new:speechbrain.dataio.encoder.CTCTextEncoder
epoch_counter: !new:speechbrain.utils.epoch_loop.EpochCounter
    limit: 1
enc: !new:speechbrain.lobes.models.VanillaNN.VanillaNN
    input_shape: [null, null, 1024]
    activation: !ref <activation>
    dnn_blocks: !ref <dnn_layers>
    dnn_neurons: !ref <dnn_neurons>
wav2vec2: !new:speechbrain.integrations.huggingface.wav2vec2.Wav2Vec2
    source: !ref <wav2vec2_hub>
    output_norm: True
    freeze: !ref <freeze_wav2vec>
    save_path: !ref <wav2vec2_folder>
ctc_lin: !new:speechbrain.nnet.linear.Linear
    input_size: !ref <dnn_neurons>
    n_neurons: !ref <output_neurons>
log_softmax: !new:speechbrain.nnet.activations.Softmax
    apply_log: True
modules:
    wav2vec2: !ref <wav2vec2>
    enc: !ref <enc>
    ctc_lin: !ref <ctc_lin>
model: !new:torch.nn.ModuleList
    - [!ref <enc>, !ref <ctc_lin>]
wav2vec_opt_class: !name:torch.optim.Adam
    lr: !ref <lr_wav2vec>
checkpointer: !new:speechbrain.utils.checkpoints.Checkpointer
    checkpoints_dir: !ref <save_folder>
    recoverables:
        wav2vec2: !ref <wav2vec2>
        model: !ref <model>
        counter: !ref <epoch_counter>
        tokenizer: !ref <label_encoder>
"""


def readme_block(heading, language, index=0):
    """The ``index``-th fenced ``language`` block after ``heading``."""
    section = README[README.index(heading) :]
    blocks = re.findall(rf"```{language}\n(.*?)```", section, re.DOTALL)
    return blocks[index]


def replace_entries(yaml_text, block):
    """``yaml_text`` with each top-level entry of ``block`` in place of the
    entry of the same name; a new entry goes just before the next replaced
    one (as a user pastes the block over the old entry)."""
    pending = ""
    for entry in filter(None, re.split(r"(?m)^(?=\S)", block)):
        key = entry.split(":", 1)[0]
        found = re.search(rf"(?ms)^{re.escape(key)}:.*?(?=^\S|\Z)", yaml_text)
        if found is None:
            pending += entry
            continue
        yaml_text = (
            yaml_text[: found.start()]
            + pending
            + entry
            + yaml_text[found.end() :]
        )
        pending = ""
    assert not pending, f"no entry of the recipe to replace by {pending!r}"
    return yaml_text


class CTCBrain(sb.Brain):
    """The recipe's Brain: SSL model, DNN, CTC; nothing about SPG."""

    def compute_forward(self, batch, stage):
        wavs, wav_lens = batch.sig
        feats = self.modules.wav2vec2(wavs, wav_lens)
        logits = self.modules.ctc_lin(self.modules.enc(feats))
        return self.hparams.log_softmax(logits), wav_lens

    def compute_objectives(self, predictions, batch, stage):
        log_probs, wav_lens = predictions
        tokens, token_lens = batch.tokens
        return sb.nnet.losses.ctc_loss(
            log_probs, tokens, wav_lens, token_lens, blank_index=0
        )

    def init_optimizers(self):
        params = list(self.modules.parameters())
        self.optimizer = self.hparams.wav2vec_opt_class(params)
        self.optimizers_dict = {"optimizer": self.optimizer}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Six random utterances and a test CSV, as LibriSpeech's preparation
    writes it (ID, duration, wav, spk_id, wrd)."""
    root = tmp_path_factory.mktemp("corpus")
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i, words in enumerate(["AB", "BA AB", "A", "B B", "AB A", "BAB"]):
        path = root / f"utt{i}.wav"
        samples = 4000 + 800 * i
        wav = 0.1 * torch.randn(samples, generator=generator)
        soundfile.write(path, wav.numpy(), 16000)
        rows.append([f"utt{i}", samples / 16000, str(path), "spk", words])
    with open(root / "test-clean.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ID", "duration", "wav", "spk_id", "wrd"])
        writer.writerows(rows)
    return root


def dataset(csv_file, encoder):
    """The recipe's pipelines: signal and CTC tokens."""
    data = DynamicItemDataset.from_csv(csv_file)
    data.add_dynamic_item(read_audio, takes="wav", provides="sig")
    data.add_dynamic_item(
        lambda words: torch.LongTensor(encoder.encode_sequence(list(words))),
        takes="wrd",
        provides="tokens",
    )
    data.set_output_keys(["id", "sig", "tokens"])
    return data


def fill_encoder(encoder):
    """Blank at 0, then the alphabet (what the recipe's preparation does)."""
    encoder.insert_blank(index=0)
    encoder.update_from_iterable(ALPHABET, sequence_input=False)
    encoder.expect_len(1 + len(ALPHABET))


def test_readme_yaml_reuses_an_inference_folder_and_keeps_its_zeros(
    inference_folder, corpus, tmp_path
):
    block = readme_block("## Deploy and reuse a compressed model", "yaml")
    assert "results/wav2vec2_base_spg/1986/compact" in block
    block = block.replace(
        "results/wav2vec2_base_spg/1986/compact", str(inference_folder)
    )
    hparams = load_hyperpyyaml(
        replace_entries(RECIPE_YAML, block),
        {
            "output_folder": str(tmp_path),
            "wav2vec2_hub": "unused",
            "data_folder": str(corpus),
        },
    )
    lobe = hparams["wav2vec2"]
    assert type(lobe) is CompactWav2Vec2 and lobe.keep_sparsity
    # The head takes the exported model's width (32 here), not 1024.
    assert hparams["enc"].linear.w.in_features == 32
    pruned = {
        name: param == 0
        for name, param in lobe.model.named_parameters()
        if param.dim() == 2 and "encoder.layers" in name
    }
    assert all(mask.any() for mask in pruned.values())
    fill_encoder(hparams["label_encoder"])
    brain = CTCBrain(
        modules=hparams["modules"],
        hparams=hparams,
        run_opts={"device": "cpu", "noprogressbar": True},
    )
    data = dataset(corpus / "test-clean.csv", hparams["label_encoder"])
    brain.fit(range(10), data, train_loader_kwargs={"batch_size": 3})
    for name, param in lobe.model.named_parameters():
        if name in pruned:
            assert torch.equal(param == 0, pruned[name]), name


def test_finish_command_prunes_exports_and_evaluates_a_drop_in_run(
    wav2vec2_source, corpus, tmp_path, capsys
):
    block = readme_block("## Reuse SPG in another recipe (drop-in)", "yaml")
    block = block.replace(
        "/path/to/speechbrain-spg/hparams/", f"{REPO}/hparams/"
    )
    # The test's own knobs of the fragment: a short ramp, the eager kernels.
    block = block.replace(
        "save_path: !ref <wav2vec2_folder>",
        "save_path: !ref <wav2vec2_folder>\n    ramp_steps: 4\n"
        "    warmup_steps: 0\n    target_scope: gated\n    gate_impl: fused",
    )
    # The README: enc takes the model's width (the tiny model's: 32).
    text = replace_entries(RECIPE_YAML, block)
    yaml_file = tmp_path / "train_hf_wav2vec.yaml"
    yaml_file.write_text(text.replace("[null, null, 1024]", "[null, null, 32]"))
    run = [
        f"--output_folder={tmp_path / 'run'}",
        f"--wav2vec2_hub={wav2vec2_source}",
        f"--data_folder={corpus}",
    ]

    def load():
        overrides = "\n".join(arg[2:].replace("=", ": ", 1) for arg in run)
        with open(yaml_file) as fin:
            hparams = load_hyperpyyaml(fin, overrides)
        fill_encoder(hparams["label_encoder"])
        return hparams

    hparams = load()
    assert isinstance(hparams["wav2vec2"], SPGWav2Vec2)
    brain = CTCBrain(
        modules=hparams["modules"],
        hparams=hparams,
        run_opts={"device": "cpu", "noprogressbar": True},
        checkpointer=hparams["checkpointer"],
    )
    data = dataset(corpus / "test-clean.csv", hparams["label_encoder"])
    brain.fit(range(8), data, train_loader_kwargs={"batch_size": 3})
    brain.checkpointer.save_checkpoint()
    # What the command should find: the checkpoint, pruned, transcribing.
    expected = load()
    expected["checkpointer"].recover_if_possible()
    lobe = expected["wav2vec2"].eval()
    hard = lobe.hard_prune().hard
    hyps, refs = [], []
    for row in csv.DictReader(open(corpus / "test-clean.csv")):
        with torch.no_grad():
            feats = lobe(read_audio(row["wav"]).unsqueeze(0))
            logits = expected["ctc_lin"](expected["enc"].eval()(feats))
        tokens = sb.decoders.ctc_greedy_decode(logits, torch.ones(1))[0]
        hyps.append("".join(expected["label_encoder"].decode_ndim(tokens)))
        refs.append(row["wrd"])
    stats = ErrorRateStats()
    stats.append(
        list(range(len(refs))),
        [h.split() for h in hyps],
        [r.split() for r in refs],
    )

    command = readme_block(
        "## Reuse SPG in another recipe (drop-in)", "bash"
    ).split()
    assert command[:4] == [
        "python",
        "-m",
        "speechbrain_spg.tools.finish",
        "hparams/train_hf_wav2vec.yaml",
    ]
    status = finish.main(
        [str(yaml_file), *run, "--batch_size=1", "--noprogressbar"]
    )
    assert status == 0
    printed = capsys.readouterr().out
    folder = tmp_path / "run" / "compact"
    manifest = read_manifest(folder)
    assert manifest["sparsity"]["gated"] == pytest.approx(hard, abs=1e-9)
    assert f"hard sparsity of gated weights: {hard:.4f}" in printed
    # The folder transcribes each file as the pruned model does.
    asr = load_asr(folder, savedir=tmp_path / "savedir")
    assert type(asr).__name__ == "EncoderASR"
    wer = re.search(r"test-clean: WER (\S+) CER (\S+)", printed)
    assert float(wer.group(1)) == pytest.approx(
        stats.summarize("error_rate"), abs=0.005
    )
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert (
        f"| test-clean | {float(wer.group(1)):.2f} | {float(wer.group(2)):.2f} |"
        in card
    )
    assert (folder / "wer_test-clean.txt").is_file()
    # A recipe folder without checkpoints: one clear error.
    status = finish.main(
        [str(yaml_file), f"--output_folder={tmp_path / 'empty'}", *run[1:]]
    )
    assert status == 2
    assert "no checkpoint to finish" in capsys.readouterr().err
