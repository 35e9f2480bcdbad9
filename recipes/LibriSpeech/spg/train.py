#!/usr/bin/env python3
"""One-pass SPG compression of an SSL model fine-tuned for ASR on LibriSpeech.

The SSL encoder (wav2vec2, HuBERT or WavLM) carries self-pinching gates; it is
fine-tuned with a CTC head (optionally joint CTC/attention) while a Lagrangian
regulariser drives its sparsity to the target. At the end the gates are
hard-pruned, the encoder is exported as a compact model, loaded back from
disk, and every test split is evaluated with it. The same script runs the
baselines (``method: dense``: fine-tuning without gates; ``method: ump``:
uniform magnitude pruning, fixed masks, then fine-tuning).

To run (SpeechBrain's run options apply: --debug, --noprogressbar, ...):
> python train.py hparams/wav2vec2_base_spg.yaml --data_folder=/data/LibriSpeech
> python train.py hparams/tiny_spg.yaml            # synthetic corpus, CPU
> torchrun --nproc_per_node=4 train.py hparams/hubert_large_spg.yaml ...

Authors
 * speechbrain-spg developers 2026
"""

import gc
import os
import shutil
import sys

import speechbrain as sb
import torch
import transformers
from hyperpyyaml import load_hyperpyyaml
from speechbrain.tokenizers.SentencePiece import SentencePiece
from speechbrain.utils.distributed import if_main_process, run_on_main
from speechbrain.utils.logger import get_logger

from speechbrain_spg import checkpointing
from speechbrain_spg.baselines import uniform_magnitude_prune
from speechbrain_spg.evaluation import summary
from speechbrain_spg.lobes import SPGLobeMixin
from speechbrain_spg.tools import inference, recipe, trace

logger = get_logger(__name__)

METHODS = ("spg", "ump", "dense")
DECODERS = ("ctc", "ctc_attention")
TOKEN_TYPES = ("char", "bpe")


class ASR(sb.Brain):
    """SSL encoder + CTC (and optional attention) head, with SPG control."""

    @property
    def ssl(self):
        """The SSL lobe (unwrapped from DDP)."""
        return getattr(self.modules.ssl, "module", self.modules.ssl)

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
            if recipe.nonfinite_on_any_rank(loss):
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
            point = trace.trace_point(
                self.ssl,
                self.optimizer_step,
                getattr(self, "last_task_loss", float("nan")),
                getattr(self, "last_sparsity_loss", 0.0),
            )
            self.trace.append(point)
            trace.log_trace_point(self.hparams.train_logger, point)

    def on_stage_start(self, stage, epoch):
        """Resets metrics."""
        if stage != sb.Stage.TRAIN:
            self.wer_metric = self.hparams.error_rate_computer()
            self.cer_metric = self.hparams.cer_computer()
            self.hypotheses = []

    def on_stage_end(self, stage, stage_loss, epoch):
        """Logs, anneals learning rates, checkpoints, keeps test results."""
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
            trace.log_test_stats(
                self.hparams.train_logger, self.test_split, stats
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
            sparsity, report = trace.epoch_sparsity(self.ssl)
            meta.update(sparsity)
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
        # Kept with the checkpoints (a temporary folder under --debug).
        trace.save_history(self.checkpointer.checkpoints_dir, self.history)
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
        gate_params = recipe.gate_parameters(self.ssl)
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
        # Run state, made before the checkpoint is recovered (the recipe
        # starts the clock earlier, so that it counts UMP's pruning).
        if not hasattr(self, "stopwatch"):
            self.stopwatch = checkpointing.Stopwatch()
        if not hasattr(self, "skipped_nonfinite"):
            self.skipped_nonfinite = checkpointing.Counter()
        if self.checkpointer is None:
            return
        for name, opt in self.optimizers_dict.items():
            self.checkpointer.add_recoverable(f"{name}_opt", opt)
        # RNG state and trace: a restarted run draws the same dropout masks
        # and keeps the whole trace. Optional, so checkpoints written before
        # they were added still load.
        run_state = {
            "rng": checkpointing.RandomState(),
            "trace": self.trace,
            "skipped_nonfinite": self.skipped_nonfinite,
            "stopwatch": self.stopwatch,
        }
        for name, obj in run_state.items():
            self.checkpointer.add_recoverable(name, obj, optional_load=True)
        self.checkpointer.add_recoverable(
            checkpointing.COMPLETE_KEY, checkpointing.CheckpointComplete()
        )

    def on_fit_start(self):
        """As SpeechBrain's, but resumes from complete checkpoints only."""
        self._compile()
        self._wrap_distributed()
        self.init_optimizers()
        if self.checkpointer is None:
            return
        for ckpt in self.checkpointer.list_checkpoints():
            if not checkpointing.is_complete(ckpt):
                logger.warning(
                    "Ignoring %s: the run was stopped while saving it.",
                    ckpt.path,
                )
        checkpoint = self.checkpointer.recover_if_possible(
            ckpt_predicate=checkpointing.is_complete
        )
        if checkpoint is not None and "stopwatch" not in checkpoint.paramfiles:
            # Written before the clock was checkpointed: go on from the
            # clock of the last epoch the history recorded.
            self.stopwatch.offset = trace.history_clock(
                self.checkpointer.checkpoints_dir, checkpoint.meta.get("epoch")
            )

    def on_evaluate_start(self, max_key=None, min_key=None):
        """Evaluation uses the modules as they are (pruned, or exported)."""

    def evaluate_split(self, name, dataset, out_dir):
        """Evaluates one split, writes its results; returns WER and CER."""
        self.test_split = name
        self.evaluate(
            dataset, test_loader_kwargs=self.hparams.test_dataloader_opts
        )
        summary.write_split_results(
            out_dir, name, self.wer_metric, self.hypotheses
        )
        return {"WER": self.test_stats["WER"], "CER": self.test_stats["CER"]}


def dataio_prepare(hparams, tokenizer):
    """Train and valid datasets, and {split: dataset} of the test splits."""
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
        saved = os.path.join(init_dir or "", "tokenizer.model")
        if init_dir and os.path.isfile(saved):
            run_on_main(shutil.copy, args=[saved, model_file])
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
        produced = f"{hparams['output_neurons']}_unigram.model"
        if if_main_process() and not os.path.exists(model_file):
            shutil.copy(os.path.join(save, produced), model_file)
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
    if type(interval) is not int or interval < 1:  # bool is not a count
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


def flush_subnormals():
    """Makes CPU arithmetic treat subnormal floats (< 1.2e-38) as zero.

    Through matrices the gates have almost wholly pinched, gradients become
    subnormal, which x86 CPUs compute through a slow microcode path. The
    setting is per thread, and PyTorch's worker threads copy it when they
    start: call this before any other torch work. Returns whether the CPU
    supports it.
    """
    return torch.set_flush_denormal(True)


if __name__ == "__main__":
    flush_subnormals()  # first, so that every CPU thread inherits it
    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:])
    if run_opts["noprogressbar"]:  # the bars of the model loading as well
        transformers.utils.logging.disable_progress_bar()
    sb.utils.distributed.ddp_init_group(run_opts)
    with open(hparams_file, encoding="utf-8") as fin:
        hparams = load_hyperpyyaml(fin, overrides)
    check_hparams(hparams, hparams_file)
    gpus = torch.cuda.device_count()
    recipe.refuse_data_parallel(hparams, run_opts, gpus, hparams_file)
    sb.create_experiment_directory(
        experiment_directory=hparams["output_folder"],
        hyperparams_to_save=hparams_file,
        overrides=overrides,
    )
    progressbar = not (
        run_opts["noprogressbar"] or hparams.get("noprogressbar")
    )
    out = hparams["output_folder"]

    # 1. Data: synthetic corpus (tiny YAMLs), CSV files, tokenizer, pipelines
    if hparams.get("synthetic_corpus"):
        from speechbrain_spg.data.synthetic import generate_corpus

        corpus = {**hparams["synthetic_corpus"], "progress": progressbar}
        run_on_main(generate_corpus, kwargs=corpus)
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
            "progressbar": progressbar,
        },
    )
    init_dir = recipe.load_init(hparams.get("init_from"), hparams["head"])
    tokenizer = build_tokenizer(hparams, init_dir)
    train_data, valid_data, test_datasets = dataio_prepare(hparams, tokenizer)

    # 2. The Brain, with the run's trace and history (checkpointed)
    asr_brain = ASR(
        modules=hparams["modules"],
        hparams=hparams,
        run_opts=run_opts,
        checkpointer=hparams["checkpointer"],
    )
    asr_brain.tokenizer = tokenizer
    asr_brain.history, asr_brain.trace = [], checkpointing.TrainingTrace()
    if hparams["decoder"] == "ctc" and hparams["test_search"] == "beam":
        asr_brain.ctc_beam_searcher = sb.decoders.ctc.CTCBeamSearcher(
            **hparams["test_beam_search"],
            vocab_list=recipe.vocabulary(tokenizer),
        )

    # 3. The starting model's error rates (a new run only)
    dense_reference = None
    if (
        hparams.get("evaluate_initial_model")
        and not asr_brain.checkpointer.find_checkpoints()
    ):
        initial_dir = os.path.join(out, "initial_model")
        dense_reference = {
            "params": summary.params_summary(asr_brain.ssl.model),
            **summary.evaluate_splits(
                asr_brain.evaluate_split, test_datasets, initial_dir
            ),
        }

    # 4. Training on the compression clock (checkpointed: a restart goes on
    # from its checkpoint's time). UMP prunes first, and that counts.
    asr_brain.stopwatch = checkpointing.Stopwatch()
    if hparams["method"] == "ump" and not asr_brain.ssl.is_pruned:
        report = uniform_magnitude_prune(asr_brain.ssl)
        logger.info("UMP: pruned %.4f of the gated weights", report.hard)
    recipe.freeze_unused_parameters(asr_brain.ssl)
    recipe.disable_layerdrop_under_ddp(asr_brain.ssl)
    asr_brain.fit(
        hparams["epoch_counter"],
        train_data,
        valid_data,
        train_loader_kwargs=recipe.train_loader_options(
            hparams["train_dataloader_opts"], hparams.get("seed", 0)
        ),
        valid_loader_kwargs=hparams["valid_dataloader_opts"],
    )

    # 5. From the last checkpoint: hard-prune and export (SPG, UMP), then
    # evaluate the export loaded back from disk; a dense model is saved.
    asr_brain.checkpointer.recover_if_possible(
        ckpt_predicate=checkpointing.is_complete
    )
    results = {
        "method": hparams["method"],
        "system": hparams.get("system_name", hparams["method"]),
        "source": str(hparams["ssl_source"]),
        "decoder": hparams["decoder"],
        "token_type": hparams["token_type"],
        "epochs": hparams["number_of_epochs"],
        "history": trace.save_history(
            asr_brain.checkpointer.checkpoints_dir, asr_brain.history
        ),
        "trace": asr_brain.trace.records,
        "skipped_nonfinite_batches": asr_brain.skipped_nonfinite.value,
        # Utterances kept and skipped (with the reasons) per split.
        "data_preparation": (prepared or {}).get("report", {}),
    }
    if asr_brain.debug:
        results["debug"] = True  # a few batches only: not a result
    compact = os.path.join(out, "compact")  # the inference folder
    if asr_brain.is_gated:
        results["sparsity"] = summary.prune_and_export(
            asr_brain.ssl,
            compact,
            calibrate=hparams.get("calibrate", False),
            write=inference.recipe_folder_writer(
                hparams, hparams_file, overrides
            ),
        )
        asr_brain.modules.ssl = summary.load_export(
            compact, asr_brain.ssl, asr_brain.device
        )
        logger.info("Evaluating the compact model loaded from %s", out)
    elif if_main_process():
        asr_brain.ssl.model.save_pretrained(os.path.join(out, "hf"))
        asr_brain.ssl.feature_extractor.save_pretrained(os.path.join(out, "hf"))
    results["wall_time_s"] = asr_brain.stopwatch.elapsed()
    recipe.save_init_files(hparams["head"], hparams["save_folder"], out)

    # 6. Every test split, with the model as exported; then the summary
    results["params"] = summary.params_summary(asr_brain.ssl.model)
    results["compression_ratio"] = (
        results["params"]["total"] / results["params"]["nonzero"]
    )
    results.update(
        summary.evaluate_splits(asr_brain.evaluate_split, test_datasets, out)
    )
    if dense_reference:
        results["dense_reference"] = dense_reference
    summary.write_summary(out, results)
    if "sparsity" in results and if_main_process():  # model card, usage
        inference.publish(compact, results, hparams.get("model_license"))

    if torch.distributed.is_initialized():
        # The DDP-wrapped modules (their reducers use the process group) go
        # first, every rank waits for the main one's files, then the group
        # is shut down (otherwise gloo may abort a rank at exit).
        del asr_brain, hparams
        gc.collect()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
