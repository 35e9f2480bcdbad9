#!/usr/bin/env python3
"""One-pass SPG compression of an SSL model fine-tuned for ASR on LibriSpeech.

The SSL encoder (wav2vec2, HuBERT or WavLM) carries self-pinching gates; it is
fine-tuned with a CTC head (optionally joint CTC/attention) while a Lagrangian
regulariser drives its sparsity to the target. At the end the gates are
hard-pruned, the encoder is exported as a compact model, loaded back from
disk, and every test split is evaluated with it.

The same script runs the baselines (only the YAML differs):
- ``method: dense``: plain fine-tuning, no gates;
- ``method: ump``: uniform magnitude pruning of every gated matrix, fixed
  masks, then fine-tuning (the two-stage baseline);
- ``method: spg``: the one-pass method.

To run:
> python train.py hparams/wav2vec2_base_spg.yaml --data_folder=/data/LibriSpeech
> python train.py hparams/tiny_spg.yaml            # synthetic corpus, CPU
> torchrun --nproc_per_node=4 train.py hparams/hubert_large_spg.yaml ...

Authors
 * speechbrain-spg developers 2026
"""

import gc
import json
import os
import shutil
import sys

import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.tokenizers.SentencePiece import SentencePiece
from speechbrain.utils.distributed import if_main_process, run_on_main
from speechbrain.utils.logger import get_logger

from speechbrain_spg.baselines import uniform_magnitude_prune
from speechbrain_spg.checkpointing import (
    Counter,
    RandomState,
    Stopwatch,
    TrainingTrace,
)
from speechbrain_spg.export import CompactWav2Vec2, export_compact
from speechbrain_spg.lobes import SPGLobeMixin

HISTORY_FILE = "history.json"
logger = get_logger(__name__)

METHODS = ("spg", "ump", "dense")
DECODERS = ("ctc", "ctc_attention")
TOKEN_TYPES = ("char", "bpe")
#: Recoverable saved last into every checkpoint (see ``CheckpointComplete``).
COMPLETE_KEY = "complete"


@sb.utils.checkpoints.register_checkpoint_hooks
class CheckpointComplete:
    """Saved last into every checkpoint: its file proves the others whole.

    SpeechBrain writes ``CKPT.yaml`` first and the parameter files after it,
    so a run killed while saving leaves a folder that looks like a checkpoint
    but cannot be loaded. The recipe resumes only from checkpoints that
    hold this marker (see ``is_complete``).
    """

    @sb.utils.checkpoints.mark_as_saver
    def save(self, path):
        """Writes the marker file."""
        if if_main_process():
            with open(path, "w", encoding="utf-8") as f:
                f.write("complete\n")

    @sb.utils.checkpoints.mark_as_loader
    def load(self, path, end_of_epoch):
        """Nothing to restore."""


def is_complete(checkpoint):
    """Whether a checkpoint was saved to the end (``CheckpointComplete``)."""
    return COMPLETE_KEY in checkpoint.paramfiles


def unwrap(module):
    """Returns the module inside a DistributedDataParallel / DataParallel."""
    return getattr(module, "module", module)


class ASR(sb.Brain):
    """SSL encoder + CTC (and optional attention) head, with SPG control."""

    @property
    def ssl(self):
        """The SSL lobe (unwrapped from DDP)."""
        return unwrap(self.modules.ssl)

    @property
    def is_gated(self):
        """Whether the SSL lobe carries self-pinching gates."""
        return isinstance(self.ssl, SPGLobeMixin)

    def compute_forward(self, batch, stage):
        """Waveforms -> CTC (and attention) log-probabilities."""
        batch = batch.to(self.device)
        wavs, wav_lens = batch.sig
        if stage == sb.Stage.TRAIN and hasattr(self.hparams, "wav_augment"):
            wavs, wav_lens = self.hparams.wav_augment(wavs, wav_lens)
        feats = self.modules.ssl(wavs, wav_lens)
        enc = self.modules.enc(feats)
        p_ctc = self.hparams.log_softmax(self.modules.ctc_lin(enc))
        p_seq = None
        if self.hparams.decoder == "ctc_attention":
            tokens_bos, _ = batch.tokens_bos
            emb = self.modules.emb(tokens_bos)
            dec, _ = self.modules.dec(emb, enc, wav_lens)
            p_seq = self.hparams.log_softmax(self.modules.seq_lin(dec))
        hyps = None
        if stage == sb.Stage.VALID:
            tokens = sb.decoders.ctc_greedy_decode(
                p_ctc, wav_lens, blank_id=self.hparams.blank_index
            )
            hyps = [self.tokens_to_words(seq) for seq in tokens]
        elif stage == sb.Stage.TEST:
            hyps = self.decode_test(p_ctc, enc, wav_lens)
        sparsity_loss = None
        if (
            stage == sb.Stage.TRAIN
            and self.is_gated
            and not self.ssl.is_pruned
            and not self.ssl.spg_options.inject_sparsity_loss
        ):
            sparsity_loss = self.ssl.sparsity_loss()
        return p_ctc, p_seq, wav_lens, hyps, sparsity_loss

    def decode_test(self, p_ctc, enc, wav_lens):
        """Test-time decoding: list of word lists."""
        if self.hparams.decoder == "ctc_attention":
            tokens, _, _, _ = self.hparams.test_searcher(enc, wav_lens)
            return [self.tokens_to_words(seq) for seq in tokens]
        if self.hparams.test_search == "greedy":
            tokens = sb.decoders.ctc_greedy_decode(
                p_ctc, wav_lens, blank_id=self.hparams.blank_index
            )
            return [self.tokens_to_words(seq) for seq in tokens]
        beams = self.ctc_beam_searcher(p_ctc, wav_lens)
        return [hyp[0].text.split() for hyp in beams]

    def tokens_to_words(self, seq):
        """Token ids -> list of words for either unit type."""
        seq = [int(t) for t in seq]
        if self.hparams.token_type == "bpe":
            return self.tokenizer.sp.decode_ids(seq).split()
        return "".join(self.tokenizer.decode_ndim(seq)).split()

    def compute_objectives(self, predictions, batch, stage):
        """CTC (+ attention NLL) + sparsity loss; updates metrics."""
        p_ctc, p_seq, wav_lens, hyps, sparsity_loss = predictions
        tokens, tokens_lens = batch.tokens
        if stage == sb.Stage.TRAIN and hasattr(self.hparams, "wav_augment"):
            tokens, tokens_lens = (
                self.hparams.wav_augment.replicate_labels(tokens),
                self.hparams.wav_augment.replicate_labels(tokens_lens),
            )
        loss_ctc = self.hparams.ctc_cost(p_ctc, tokens, wav_lens, tokens_lens)
        loss = loss_ctc
        if p_seq is not None:
            tokens_eos, tokens_eos_lens = batch.tokens_eos
            loss_seq = self.hparams.seq_cost(
                p_seq, tokens_eos, length=tokens_eos_lens
            )
            weight = self.hparams.ctc_weight
            loss = weight * loss_ctc + (1 - weight) * loss_seq
        self.last_task_loss = loss.detach()
        if sparsity_loss is not None:
            self.last_sparsity_loss = sparsity_loss.detach()
            loss = loss + sparsity_loss
        if stage != sb.Stage.TRAIN:
            targets = [words.split() for words in batch.wrd]
            self.wer_metric.append(batch.id, hyps, targets)
            self.cer_metric.append(batch.id, hyps, targets)
            if stage == sb.Stage.TEST:
                for uid, ref, hyp in zip(batch.id, batch.wrd, hyps):
                    self.hypotheses.append(
                        {"id": uid, "ref": ref, "hyp": " ".join(hyp)}
                    )
        return loss

    def fit_batch(self, batch):
        """One training step; a batch with a non-finite loss is skipped.

        Under DDP, every process skips it if the loss is non-finite on
        any of them (``nonfinite_on_any_rank``).
        """
        should_step = (self.step % self.grad_accumulation_factor) == 0
        with self.no_sync(not should_step):
            with self.training_ctx:
                outputs = self.compute_forward(batch, sb.Stage.TRAIN)
                loss = self.compute_objectives(outputs, batch, sb.Stage.TRAIN)
            if nonfinite_on_any_rank(loss):
                self.skipped_nonfinite.value += 1
                logger.warning(
                    f"Non-finite loss on batch {batch.id[:3]}... (on this "
                    "process or another one under DDP): skipped "
                    f"({self.skipped_nonfinite.value} so far); thresholds and "
                    "weights are left unchanged."
                )
                self.zero_grad(set_to_none=True)
                if self.is_gated:
                    # The schedule follows the steps that trained; the
                    # soft-zero counts of the dropped graph go with it.
                    self.ssl.gate.advance(-1)
                    self.ssl.gate.soft_zeros.clear()
                return torch.tensor(0.0)
            scaled = self.scaler.scale(loss / self.grad_accumulation_factor)
            scaled.backward()
        if should_step:
            self.optimizers_step()
        self.on_fit_batch_end(batch, outputs, loss, should_step)
        return loss.detach().cpu()

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        """Records a point of the training trace every ``log_interval``."""
        if self.is_gated and self.step % self.hparams.log_interval == 0:
            self.trace.append(self.trace_point())

    def trace_point(self):
        """Current step, losses and sparsities (for plots)."""
        point = {
            "step": int(self.optimizer_step),
            "task_loss": float(getattr(self, "last_task_loss", float("nan"))),
        }
        if self.is_gated:
            point["sparsity_loss"] = float(
                getattr(self, "last_sparsity_loss", 0.0)
            )
            point["hard_sparsity"] = self.ssl.hard_sparsity()
            with torch.no_grad():
                point["soft_sparsity"] = float(self.ssl.soft_sparsity())
            point["target"] = self.ssl.regularizer.target_at(
                self.ssl.gate.step_count
            )
        return point

    def on_stage_start(self, stage, epoch):
        """Resets metrics."""
        if stage != sb.Stage.TRAIN:
            self.wer_metric = self.hparams.error_rate_computer()
            self.cer_metric = self.hparams.cer_computer()
            self.hypotheses = []

    def on_stage_end(self, stage, stage_loss, epoch):
        """Logs, anneals learning rates, checkpoints, writes test results."""
        stats = {"loss": stage_loss}
        if stage == sb.Stage.TRAIN:
            self.train_stats = stats
            return
        stats["CER"] = self.cer_metric.summarize("error_rate")
        stats["WER"] = self.wer_metric.summarize("error_rate")
        if stage == sb.Stage.VALID:
            self.end_of_epoch(epoch, stats)
        else:
            self.test_stats = stats
            self.hparams.train_logger.log_stats(
                stats_meta={"split": self.test_split}, test_stats=stats
            )

    def end_of_epoch(self, epoch, stats):
        """Anneals, logs sparsity and checkpoints after validation."""
        old_lrs = {}
        for name, (scheduler, optimizer) in self.annealed().items():
            old, new = scheduler(stats["loss"])
            sb.nnet.schedulers.update_learning_rate(optimizer, new)
            old_lrs[f"lr_{name}"] = old
        meta = {"epoch": epoch, **old_lrs}
        if self.is_gated:
            report = self.ssl.sparsity_report()
            meta.update(
                hard_sparsity=round(report.hard, 5),
                soft_sparsity=round(report.soft, 5),
                target=round(
                    self.ssl.regularizer.target_at(self.ssl.gate.step_count), 5
                ),
            )
            if hasattr(self, "last_sparsity_loss"):
                meta["sparsity_loss"] = float(self.last_sparsity_loss)
            logger.info("Per-layer sparsity after epoch %d:\n%s", epoch, report)
        self.hparams.train_logger.log_stats(
            stats_meta=meta, train_stats=self.train_stats, valid_stats=stats
        )
        self.history.append(
            {
                **meta,
                "elapsed_s": round(self.stopwatch.elapsed(), 2),
                "train_loss": float(self.train_stats["loss"]),
                "dev_loss": float(stats["loss"]),
                "dev_WER": stats["WER"],
                "dev_CER": stats["CER"],
            }
        )
        load_history(self, self.hparams.save_folder)
        self.checkpointer.save_and_keep_only(
            meta={"WER": stats["WER"], "epoch": epoch}, num_to_keep=2
        )

    def annealed(self):
        """Learning-rate schedulers and the optimisers they drive."""
        pairs = {"head": (self.hparams.lr_annealing_head, self.head_optimizer)}
        if self.ssl_optimizer is not None:
            pairs["ssl"] = (self.hparams.lr_annealing_ssl, self.ssl_optimizer)
        return pairs

    def init_optimizers(self):
        """Three optimisers: head, SSL weights, and gates + multipliers."""
        gate_params = []
        if self.is_gated:
            gate_params = [
                p
                for p in (
                    self.ssl.gate.threshold_param,
                    self.ssl.regularizer.multiplier_param,
                )
                if p.requires_grad
            ]
        gate_ids = {id(p) for p in gate_params}
        ssl_params = [
            p
            for p in self.modules.ssl.parameters()
            if p.requires_grad and id(p) not in gate_ids
        ]
        self.head_optimizer = self.hparams.head_opt_class(
            self.hparams.head.parameters()
        )
        self.ssl_optimizer = (
            self.hparams.ssl_opt_class(ssl_params) if ssl_params else None
        )
        self.optimizers_dict = {"head": self.head_optimizer}
        if self.ssl_optimizer is not None:
            self.optimizers_dict["ssl"] = self.ssl_optimizer
        if gate_params:
            self.gate_optimizer = self.hparams.gate_opt_class(gate_params)
            self.optimizers_dict["gate"] = self.gate_optimizer
        # Run-level state kept in checkpoints, made here before the
        # checkpoint is recovered (run_recipe starts the clock earlier, so
        # that it counts UMP's pruning).
        if not hasattr(self, "stopwatch"):
            self.stopwatch = Stopwatch()
        if not hasattr(self, "skipped_nonfinite"):
            self.skipped_nonfinite = Counter()
        if self.checkpointer is not None:
            for name, opt in self.optimizers_dict.items():
                self.checkpointer.add_recoverable(f"{name}_opt", opt)
            # RNG state and trace: a restarted run draws the same dropout
            # masks and keeps the whole trace. Optional, so checkpoints
            # written before they were added still load.
            self.checkpointer.add_recoverable(
                "rng", RandomState(), optional_load=True
            )
            self.checkpointer.add_recoverable(
                "trace", self.trace, optional_load=True
            )
            self.checkpointer.add_recoverable(
                "skipped_nonfinite", self.skipped_nonfinite, optional_load=True
            )
            self.checkpointer.add_recoverable(
                "stopwatch", self.stopwatch, optional_load=True
            )
            self.checkpointer.add_recoverable(
                COMPLETE_KEY, CheckpointComplete()
            )

    def on_fit_start(self):
        """As SpeechBrain's, but resumes from complete checkpoints only."""
        self._compile()
        self._wrap_distributed()
        self.init_optimizers()
        if self.checkpointer is None:
            return
        for ckpt in self.checkpointer.list_checkpoints():
            if not is_complete(ckpt):
                logger.warning(
                    "Ignoring %s: the run was stopped while saving it.",
                    ckpt.path,
                )
        checkpoint = self.checkpointer.recover_if_possible(
            ckpt_predicate=is_complete
        )
        if checkpoint is not None and "stopwatch" not in checkpoint.paramfiles:
            # Written before the clock was checkpointed: go on from the
            # clock of the last epoch the history recorded.
            self.stopwatch.offset = history_clock(
                self.hparams.save_folder, checkpoint.meta.get("epoch")
            )

    def on_evaluate_start(self, max_key=None, min_key=None):
        """Evaluation uses the modules as they are (see ``run_recipe``)."""

    def evaluate_split(self, name, dataset, out_dir):
        """Evaluates one split; writes WER file and hypotheses.

        Returns
        -------
        dict
            WER and CER in percent.
        """
        self.test_split = name
        self.evaluate(
            dataset,
            test_loader_kwargs=self.hparams.test_dataloader_opts,
            progressbar=True,
        )
        if if_main_process():
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, f"wer_{name}.txt"), "w") as f:
                self.wer_metric.write_stats(f)
            with open(os.path.join(out_dir, f"hyps_{name}.jsonl"), "w") as f:
                for row in sorted(self.hypotheses, key=lambda r: r["id"]):
                    f.write(json.dumps(row) + "\n")
        return {"WER": self.test_stats["WER"], "CER": self.test_stats["CER"]}


def check_hparams(hparams, path):
    """Validates the recipe-level keys (the lobe validates its own)."""
    choices = {
        "method": METHODS,
        "decoder": DECODERS,
        "token_type": TOKEN_TYPES,
        "test_search": ("greedy", "beam"),
        "sorting": ("ascending", "descending", "random"),
    }
    for key, allowed in choices.items():
        if hparams.get(key) not in allowed:
            raise ValueError(
                f"{path}: {key} must be one of {', '.join(allowed)}; got "
                f"{hparams.get(key)!r}."
            )
    interval = hparams.get("log_interval")
    if (
        isinstance(interval, bool)
        or not isinstance(interval, int)
        or interval < 1
    ):
        raise ValueError(
            f"{path}: log_interval must be a positive integer (training steps "
            f"between two points of the trace); got {interval!r}."
        )
    gated = isinstance(hparams["ssl"], SPGLobeMixin)
    if hparams["method"] in ("spg", "ump") and not gated:
        raise ValueError(
            f"{path}: method {hparams['method']!r} needs an SPG lobe as `ssl` "
            "(speechbrain_spg.lobes.SPGWav2Vec2 / SPGHuBERT / SPGWavLM)."
        )
    if hparams["method"] == "dense" and gated:
        raise ValueError(
            f"{path}: method 'dense' expects a plain SpeechBrain lobe as `ssl`."
        )


def refuse_data_parallel(hparams, run_opts, gpus, path):
    """Refuses SpeechBrain's DataParallel backend for SPG runs on several
    GPUs.

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


def dataio_prepare(hparams, tokenizer):
    """Datasets with audio and text pipelines.

    Returns
    -------
    train, valid : DynamicItemDataset
    tests : dict of name -> DynamicItemDataset
    """
    save = hparams["save_folder"]

    def load(csv, sort=True):
        data = sb.dataio.dataset.DynamicItemDataset.from_csv(csv_path=csv)
        return data.filtered_sorted(sort_key="duration") if sort else data

    train = load(os.path.join(save, "train.csv"), sort=False)
    if hparams["sorting"] == "ascending":
        train = train.filtered_sorted(sort_key="duration")
        hparams["train_dataloader_opts"]["shuffle"] = False
    elif hparams["sorting"] == "descending":
        train = train.filtered_sorted(sort_key="duration", reverse=True)
        hparams["train_dataloader_opts"]["shuffle"] = False
    valid = load(os.path.join(save, f"{hparams['dev_splits'][0]}.csv"))
    tests = {
        split: load(os.path.join(save, f"{split}.csv"))
        for split in hparams["test_splits"]
    }
    datasets = [train, valid, *tests.values()]

    @sb.utils.data_pipeline.takes("wav")
    @sb.utils.data_pipeline.provides("sig")
    def audio_pipeline(wav):
        return sb.dataio.dataio.read_audio(wav)

    bos, eos = hparams["bos_index"], hparams["eos_index"]

    @sb.utils.data_pipeline.takes("wrd")
    @sb.utils.data_pipeline.provides("tokens", "tokens_bos", "tokens_eos")
    def text_pipeline(wrd):
        ids = encode_text(tokenizer, hparams["token_type"], wrd)
        yield torch.LongTensor(ids)
        yield torch.LongTensor([bos] + ids)
        yield torch.LongTensor(ids + [eos])

    sb.dataio.dataset.add_dynamic_item(datasets, audio_pipeline)
    sb.dataio.dataset.add_dynamic_item(datasets, text_pipeline)
    sb.dataio.dataset.set_output_keys(
        datasets, ["id", "sig", "wrd", "tokens", "tokens_bos", "tokens_eos"]
    )
    return train, valid, tests


def encode_text(tokenizer, token_type, words):
    """Transcript -> token ids."""
    if token_type == "bpe":
        return tokenizer.sp.encode_as_ids(words)
    return tokenizer.encode_sequence(list(words))


def build_tokenizer(hparams, init_dir):
    """Character encoder or SentencePiece model, reused from ``init_from``.

    Character units use the fixed LibriSpeech alphabet (``alphabet``) after
    blank / bos / eos, so the head size never depends on the data.
    """
    save = hparams["save_folder"]
    if hparams["token_type"] == "bpe":
        model_file = os.path.join(save, "tokenizer.model")
        if init_dir and os.path.isfile(
            os.path.join(init_dir, "tokenizer.model")
        ):
            run_on_main(
                shutil.copy,
                args=[os.path.join(init_dir, "tokenizer.model"), model_file],
            )
        tokenizer = SentencePiece(
            model_dir=save,
            vocab_size=hparams["output_neurons"],
            annotation_train=os.path.join(save, "train.csv"),
            annotation_read="wrd",
            model_type="unigram",
            bos_id=hparams["bos_index"],
            eos_id=hparams["eos_index"],
            unk_id=hparams["blank_index"],
            character_coverage=1.0,
        )
        produced = os.path.join(
            save, f"{hparams['output_neurons']}_unigram.model"
        )
        if if_main_process() and not os.path.exists(model_file):
            shutil.copy(produced, model_file)
        return tokenizer
    encoder = sb.dataio.encoder.CTCTextEncoder()
    label_file = os.path.join(save, "label_encoder.txt")
    source = os.path.join(init_dir or "", "label_encoder.txt")
    if init_dir and os.path.isfile(source):
        encoder.load(source)
    else:
        encoder.insert_blank(index=hparams["blank_index"])
        encoder.insert_bos_eos(
            bos_label="<bos>",
            eos_label="<eos>",
            bos_index=hparams["bos_index"],
            eos_index=hparams["eos_index"],
        )
        encoder.update_from_iterable(hparams["alphabet"], sequence_input=False)
    if len(encoder) != hparams["output_neurons"]:
        raise ValueError(
            f"output_neurons is {hparams['output_neurons']} but the character "
            f"set has {len(encoder)} labels (blank, bos, eos + alphabet); set "
            f"output_neurons: {len(encoder)}."
        )
    encoder.expect_len(hparams["output_neurons"])
    if if_main_process():
        encoder.save(label_file)
    return encoder


def load_init(hparams):
    """Loads the head of a dense fine-tuned model given by ``init_from``."""
    init_dir = hparams.get("init_from")
    if not init_dir:
        return None
    head_file = os.path.join(init_dir, "head.ckpt")
    if not os.path.isfile(head_file):
        raise FileNotFoundError(
            f"init_from: {head_file} not found; init_from must be the output "
            "folder of a dense run of this recipe (hf/, head.ckpt, tokenizer)."
        )
    state = torch.load(head_file, map_location="cpu")
    try:
        hparams["head"].load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"init_from: the head in {head_file} does not fit this YAML's head "
            f"(decoder, dnn_layers, dnn_neurons, output_neurons): {err}"
        ) from None
    return init_dir


def save_model_files(brain, hparams, out_dir):
    """Writes what ``init_from`` reads: head.ckpt and the tokenizer file."""
    if not if_main_process():
        return
    torch.save(hparams["head"].state_dict(), os.path.join(out_dir, "head.ckpt"))
    for name in ("label_encoder.txt", "tokenizer.model"):
        src = os.path.join(hparams["save_folder"], name)
        if os.path.isfile(src):
            shutil.copy(src, os.path.join(out_dir, name))


def params_summary(module):
    """Total and nonzero parameter counts of an SSL model."""
    params = list(module.parameters())
    return {
        "total": sum(p.numel() for p in params),
        "nonzero": int(sum(int((p != 0).sum()) for p in params)),
    }


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
    """
    bad = (~torch.isfinite(loss.detach())).any().to(torch.float32)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        bad = bad.to(loss.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bool(bad.item() > 0)


def gather_from_ranks(value):
    """``value`` from every process, in rank order ([value] without DDP).

    The recipe records the hard sparsity of every rank: they must agree,
    since DDP keeps weights and thresholds identical.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    if len(set(values)) > 1:
        logger.warning("The processes disagree on a value: %s", values)
    return values


def write_summary(path, summary):
    """Writes ``summary.json`` on the main process."""
    if if_main_process():
        with open(path, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)


def print_table(summary):
    """Prints dense vs compressed as a readable table."""
    rows = [("system", "params", "nonzero", "ratio", *summary["wer"].keys())]
    dense = summary.get("dense_reference")
    if dense:
        rows.append(
            (
                "dense (start)",
                str(dense["params"]["total"]),
                str(dense["params"]["nonzero"]),
                "1.00",
                *(
                    f"{dense['wer'][s]:.2f}/{dense['cer'][s]:.2f}"
                    for s in summary["wer"]
                ),
            )
        )
    rows.append(
        (
            summary["method"],
            str(summary["params"]["total"]),
            str(summary["params"]["nonzero"]),
            f"{summary['compression_ratio']:.2f}",
            *(
                f"{summary['wer'][s]:.2f}/{summary['cer'][s]:.2f}"
                for s in summary["wer"]
            ),
        )
    )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    text = "\n".join(lines)
    text += "\n(test columns: WER/CER in %)"
    if "hard_sparsity" in summary.get("sparsity", {}):
        text += (
            f"\nhard sparsity of gated weights: "
            f"{summary['sparsity']['hard_sparsity']:.4f} (target "
            f"{summary['sparsity']['gated_target']:.4f})"
        )
    text += f"\ncompression wall time: {summary['wall_time_s']:.1f} s"
    print(text)
    return text


def flush_subnormals():
    """Makes this process's CPU arithmetic treat subnormal floats as zero.

    Where the gates have pinched almost a whole matrix (attention
    projections of a block at 99% sparsity), the gradients that flow back
    through it are so small that matrix products return subnormal numbers,
    which x86 CPUs compute through a slow microcode path: a 952 x 192 by
    192 x 192 product took about 130 ms instead of 0.6 ms (``benchmarks/
    RESULTS.md``). Values below 1.2e-38 become 0; nothing else changes.

    ``torch.set_flush_denormal`` sets the calling thread; the threads that
    PyTorch starts for parallel CPU work copy its setting when they start,
    so this runs before any other computation. GPU kernels are not
    affected (they do not slow down on subnormal numbers).

    Returns
    -------
    bool
        Whether the CPU supports it (``torch.set_flush_denormal``).
    """
    return torch.set_flush_denormal(True)


def run_recipe(hparams_file, run_opts, overrides):
    """The whole recipe; returns the summary dict."""
    with open(hparams_file, encoding="utf-8") as fin:
        hparams = load_hyperpyyaml(fin, overrides)
    check_hparams(hparams, hparams_file)
    refuse_data_parallel(
        hparams, run_opts or {}, torch.cuda.device_count(), hparams_file
    )
    sb.create_experiment_directory(
        experiment_directory=hparams["output_folder"],
        hyperparams_to_save=hparams_file,
        overrides=overrides,
    )
    if hparams.get("synthetic_corpus"):
        from speechbrain_spg.data.synthetic import generate_corpus

        run_on_main(generate_corpus, kwargs=hparams["synthetic_corpus"])

    from librispeech_prepare import prepare_librispeech

    prepared = run_on_main(
        prepare_librispeech,
        kwargs={
            "data_folder": hparams["data_folder"],
            "save_folder": hparams["save_folder"],
            "tr_splits": hparams["train_splits"],
            "dev_splits": hparams["dev_splits"],
            "te_splits": hparams["test_splits"],
            "merge_lst": hparams["train_splits"],
            "merge_name": "train.csv",
            "skip_prep": hparams["skip_prep"],
            "min_duration": hparams["min_duration"],
            "max_duration": hparams["max_duration"],
            "allowed_chars": hparams["alphabet"],
        },
    )
    init_dir = load_init(hparams)
    tokenizer = build_tokenizer(hparams, init_dir)
    train, valid, tests = dataio_prepare(hparams, tokenizer)

    brain = ASR(
        modules=hparams["modules"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
    )
    brain.tokenizer = tokenizer
    brain.history, brain.trace = [], TrainingTrace()
    if hparams["decoder"] == "ctc" and hparams["test_search"] == "beam":
        vocab = token_strings(tokenizer, hparams)
        brain.ctc_beam_searcher = sb.decoders.ctc.CTCBeamSearcher(
            **hparams["test_beam_search"], vocab_list=vocab
        )
    out = hparams["output_folder"]

    dense_reference = None
    if (
        hparams.get("evaluate_initial_model")
        and not brain.checkpointer.find_checkpoints()
    ):
        dense_reference = evaluate_initial(brain, hparams, tests)

    # The compression clock (checkpointed): UMP's pruning counts, as does
    # the time before a restart, up to the checkpoint it resumes from.
    brain.stopwatch = Stopwatch()
    if hparams["method"] == "ump" and not brain.ssl.is_pruned:
        report = uniform_magnitude_prune(brain.ssl)
        logger.info("UMP: pruned %.4f of the gated weights", report.hard)
    freeze_unused_parameters(brain.ssl)
    disable_layerdrop_under_ddp(brain.ssl)

    brain.fit(
        hparams["epoch_counter"],
        train,
        valid,
        train_loader_kwargs=train_loader_options(hparams),
        valid_loader_kwargs=hparams["valid_dataloader_opts"],
    )
    brain.checkpointer.recover_if_possible(ckpt_predicate=is_complete)
    summary = {
        "method": hparams["method"],
        "system": hparams.get("system_name", hparams["method"]),
        "source": str(hparams["ssl_source"]),
        "decoder": hparams["decoder"],
        "token_type": hparams["token_type"],
        "epochs": hparams["number_of_epochs"],
        "history": load_history(brain, hparams["save_folder"]),
        "trace": brain.trace.records,
        "skipped_nonfinite_batches": brain.skipped_nonfinite.value,
        # Utterances kept and skipped (with the reasons) per split.
        "data_preparation": (prepared or {}).get("report", {}),
    }
    if brain.is_gated:
        trained = brain.ssl.hard_sparsity()
        report = brain.ssl.hard_prune(calibrate=hparams.get("calibrate", False))
        run_on_main(
            export_compact,
            args=[brain.ssl, os.path.join(out, "compact")],
            kwargs={"overwrite": True},
        )
        summary["sparsity"] = {
            "target_sparsity": brain.ssl.spg_options.target_sparsity,
            "target_scope": brain.ssl.spg_options.target_scope,
            "gated_target": brain.ssl.gated_target,
            "hard_sparsity": report.hard,
            # Where training left it, before any calibration.
            "hard_sparsity_trained": trained,
            "hard_sparsity_per_rank": gather_from_ranks(report.hard),
            "model_sparsity": report.model_sparsity,
            "calibration_factor": getattr(
                brain.ssl, "calibration_factor", None
            ),
            "layers": [
                {
                    "name": layer.name,
                    "sparsity": layer.hard,
                    "threshold": layer.threshold,
                }
                for layer in report.layers
            ],
        }
        exported = CompactWav2Vec2(
            os.path.join(out, "compact"),
            output_norm=brain.ssl.output_norm,
            freeze=True,
        ).to(brain.device)
        brain.modules.ssl = exported
        logger.info("Evaluating the compact model loaded from %s", out)
    else:
        if if_main_process():
            brain.ssl.model.save_pretrained(os.path.join(out, "hf"))
            brain.ssl.feature_extractor.save_pretrained(os.path.join(out, "hf"))
    summary["wall_time_s"] = brain.stopwatch.elapsed()
    save_model_files(brain, hparams, out)

    ssl_model = unwrap(brain.modules.ssl).model
    summary["params"] = params_summary(ssl_model)
    summary["compression_ratio"] = (
        summary["params"]["total"] / summary["params"]["nonzero"]
    )
    summary["wer"], summary["cer"] = {}, {}
    for name, dataset in tests.items():
        result = brain.evaluate_split(name, dataset, out)
        summary["wer"][name] = result["WER"]
        summary["cer"][name] = result["CER"]
    if dense_reference:
        summary["dense_reference"] = dense_reference
    write_summary(os.path.join(out, "summary.json"), summary)
    if if_main_process():
        table = print_table(summary)
        with open(os.path.join(out, "summary.txt"), "w") as f:
            f.write(table + "\n")
    return summary


def train_loader_options(hparams):
    """The training loader's options, with a random generator of its own.

    Each pass over a DataLoader draws one number from its ``generator`` (the
    base seed of its workers), or from the global torch RNG without one.
    The global RNG drives dropout and is restored from checkpoints
    (``RandomState``); a run restarted in the middle of an epoch starts its
    pass after the restore, so with the global RNG it would draw one number
    more than an uninterrupted run and every later dropout mask would
    differ.
    """
    options = dict(hparams["train_dataloader_opts"])
    if options.get("generator") is None:
        seed = hparams.get("seed", 0)
        options["generator"] = torch.Generator().manual_seed(seed)
    return options


def read_saved_history(save_folder):
    """Rows of ``history.json`` in the save folder ([] before any epoch)."""
    path = os.path.join(save_folder, HISTORY_FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return json.load(f)


def history_clock(save_folder, up_to_epoch=None):
    """The compression clock of the last epoch in ``history.json``.

    Arguments
    ---------
    save_folder : str
        The run's save folder.
    up_to_epoch : int, optional
        Only epochs up to this one count (the checkpoint's epoch).

    Returns
    -------
    float
        ``elapsed_s`` of that epoch; 0 without a history or a clock.
    """
    rows = read_saved_history(save_folder)
    last = up_to_epoch if up_to_epoch is not None else float("inf")
    clocks = [r.get("elapsed_s", 0.0) for r in rows if r["epoch"] <= last]
    return max(clocks, default=0.0)


def load_history(brain, save_folder):
    """Per-epoch history, kept across restarts in the save folder.

    Called after every epoch, so that a killed run keeps the rows of the
    epochs it finished. Only the main process reads and writes the file
    (the others return their own rows).
    """
    if not if_main_process():
        return brain.history
    previous = read_saved_history(save_folder)
    seen = {row["epoch"] for row in brain.history}
    merged = [r for r in previous if r["epoch"] not in seen] + brain.history
    with open(os.path.join(save_folder, HISTORY_FILE), "w") as f:
        json.dump(merged, f, indent=2)
    return merged


def evaluate_initial(brain, hparams, tests):
    """WER/CER of the starting (dense) model on every test split."""
    ref = {"params": params_summary(brain.ssl.model), "wer": {}, "cer": {}}
    ref_dir = os.path.join(hparams["output_folder"], "initial_model")
    for name, dataset in tests.items():
        result = brain.evaluate_split(name, dataset, ref_dir)
        ref["wer"][name] = result["WER"]
        ref["cer"][name] = result["CER"]
    return ref


def token_strings(tokenizer, hparams):
    """Vocabulary list for the CTC beam searcher."""
    if hparams["token_type"] == "bpe":
        sp = tokenizer.sp
        return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    ind2lab = tokenizer.ind2lab
    return [str(ind2lab[i]) for i in range(len(ind2lab))]


if __name__ == "__main__":
    flush_subnormals()
    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:])
    sb.utils.distributed.ddp_init_group(run_opts)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    run_recipe(hparams_file, run_opts, overrides)
    if torch.distributed.is_initialized():
        # The DDP-wrapped modules (their reducers use the process group) go
        # first, every rank waits for the main one's files, then the group
        # is shut down (otherwise gloo may abort a rank at exit).
        gc.collect()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
