"""A synthetic English speech corpus laid out exactly like LibriSpeech.

Real LibriSpeech cannot always be downloaded (air-gapped clusters, CI). This
module writes a small stand-in that the LibriSpeech data preparation reads
unchanged::

    <out>/LibriSpeech/<split>/<spk>/<chap>/<spk>-<chap>-<utt:04d>.flac
    <out>/LibriSpeech/<split>/<spk>/<chap>/<spk>-<chap>.trans.txt

with the splits ``train-clean-100``, ``dev-clean``, ``test-clean`` (speakers
seen in training, unseen sentences) and ``test-other`` (speakers never seen in
training), and ``<out>/LibriSpeech/SYNTHETIC.json`` recording the options.

The pieces:

* sentences come from a small grammar over word lists (``vocabulary``,
  ``generate_sentence``, ``generate_sentences``);
* speakers are eSpeak NG voice variant x rate x pitch combinations
  (``speaker_table``, ``split_speakers``);
* audio is synthesised by eSpeak NG from the ``espeakng-loader`` wheel,
  driven through ``ctypes`` (``ESpeakNG``, ``synthesize_text``), resampled
  from 22050 Hz to 16 kHz and written as 16-bit FLAC;
* ``plan_corpus`` decides every utterance (split, speaker, chapter, text)
  before any audio is made, so the output is byte-identical for the same
  options whatever the number of worker processes.

eSpeak NG keeps synthesis state in C globals (random generator, pitch
flutter phase, echo buffer), so the same text spoken twice in one loaded
library differs slightly. ``ESpeakNG`` therefore loads a private copy of the
library afresh for every utterance, which makes each synthesis a pure
function of its inputs.

Command line::

    python -m speechbrain_spg.data.synthetic --out DIR --hours H --seed S [--workers N]

Authors
 * speechbrain-spg developers 2026
"""

import _ctypes
import argparse
import ctypes
import dataclasses
import json
import math
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
import types
import weakref
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np
import soundfile
from scipy.signal import resample_poly
from tqdm import tqdm

#: Sample rate of the written audio, in Hz.
SAMPLE_RATE = 16000

#: Sample rate eSpeak NG synthesises at, in Hz.
ESPEAK_SAMPLE_RATE = 22050

#: Training split, then the evaluation splits, in the order they are planned.
TRAIN_SPLIT = "train-clean-100"
SEEN_SPEAKER_EVAL_SPLITS = ("dev-clean", "test-clean")
UNSEEN_SPEAKER_EVAL_SPLIT = "test-other"
SPLITS = (TRAIN_SPLIT, *SEEN_SPEAKER_EVAL_SPLITS, UNSEEN_SPEAKER_EVAL_SPLIT)

#: Each evaluation split gets this fraction of the training audio ...
EVAL_FRACTION = 0.05
#: ... and at least this many utterances.
MIN_EVAL_UTTERANCES = 5

#: A speaker's utterances of one split are grouped into chapters of at most
#: this many utterances.
MAX_UTTERANCES_PER_CHAPTER = 100

#: Speaker and chapter ids start here (LibriSpeech-like integers).
FIRST_SPEAKER_ID = 100
FIRST_CHAPTER_ID = 1000

#: Sentences have between these many words (inclusive).
MIN_WORDS = 4
MAX_WORDS = 16

#: Speaker table: eSpeak NG base voices x variants x rates (words per
#: minute) x pitches (0-100, eSpeak's default 50).
VOICES = ("en-us", "en")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4")
RATES = (150, 180)
PITCHES = (35, 65)

#: Variants never heard in training: all their speakers form test-other.
HELD_OUT_VARIANTS = ("m7", "f4")

#: Silence kept (or padded with zeros) before and after the speech, seconds.
SILENCE_MARGIN_SECONDS = 0.1
#: Samples with a magnitude above this (int16 scale) count as speech.
SILENCE_THRESHOLD = 64

#: Name of the file that records the options and summary of a corpus.
MANIFEST_NAME = "SYNTHETIC.json"
#: Bumped whenever the output for given options changes.
FORMAT_VERSION = 1

#: Utterances per task sent to a worker process.
_CHUNK_SIZE = 16

# Duration model of ``estimate_seconds``, fitted on eSpeak NG 1.52 output:
# seconds = intercept + per_letter * letters * 175 / rate
#           + per_word * words * 175 / rate.
_ESTIMATE_INTERCEPT = 0.28
_ESTIMATE_PER_LETTER = 0.05
_ESTIMATE_PER_WORD = 0.048

# eSpeak NG constants (speak_lib.h).
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_ESPEAK_CHARS_UTF8 = 1
_ESPEAK_RATE = 1
_ESPEAK_PITCH = 3
_EE_OK = 0

_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


def _words(text):
    """Splits a word-list literal into a tuple of words."""
    return tuple(text.split())


def _pairs(text):
    """Splits a ``base:past`` word-list literal into a tuple of pairs."""
    return tuple(tuple(item.split(":")) for item in text.split())


NOUNS = _words("""
    apple arm army baby bag ball band bank basket bath beach bean bear bed
    bee bell bench bicycle bird blanket boat bone book boot bottle box boy
    bread brick bridge brother brush bucket building bus butter button cake
    camera candle cap car card carpet cart castle cat chair cheese chicken
    child church circle city clock cloud coat coin computer cook corner
    cottage cousin cow cup curtain daughter desk dinner doctor dog doll
    donkey door dragon drawer dress drum duck eagle egg elephant engine farm
    farmer father feather fence field finger fire fish flag flower fork
    forest fox friend frog garden gate ghost gift girl glass glove goat
    grass guitar hammer hand hat hill horse hospital house island jacket
    jar kettle key king kitchen kite knife ladder lake lamp leaf lemon
    letter library lion lizard lock map market meadow milk mirror monkey
    moon mother mountain mouse nail needle nest newspaper nurse ocean
    office onion orange owl painter pan paper parcel park parrot pencil
    piano picture pig pillow pilot pipe plate pocket pond potato prince
    princess pumpkin queen rabbit radio river road rock roof room rope
    rose sailor salad sandwich school sea shadow sheep shelf shell ship
    shirt shoe shop singer sister snake soldier song soup spoon squirrel
    stable star station stick stone storm stove street student sugar
    suitcase sun table tail teacher tent thief ticket tiger tower town toy
    tractor train tree truck tunnel turtle uncle valley village violin
    wagon wall wallet watch water whale wheel window wing wizard wolf
    woman worm yard zebra man lady neighbor captain baker butcher driver
    guard hunter judge lawyer miller miner poet priest servant shepherd
    tailor waiter writer artist banker clerk dancer diver fisherman
    gardener giant knight merchant monk musician nephew niece officer
    pirate scientist stranger traveler widow grandmother grandfather
    husband wife son aunt puppy kitten pony camel deer goose hen lamb mule
    pigeon raven robin seal shark spider swan toad beetle butterfly ant
    apron barrel basin belt blade bowl bracelet broom cabinet canoe
    carriage chain chimney coffee collar compass cradle crown cushion
    diamond envelope fountain helmet jewel lantern locket medal necklace
    notebook oven paddle pearl pebble pen pillar pot puzzle ribbon ring
    saddle sail scarf sack shovel sled sword telescope thread tray trumpet
    trunk umbrella vase whistle armchair bakery barn cabin cave cellar
    chapel cliff desert harbor hut jungle lighthouse mill museum orchard
    palace path prison restaurant shore stream swamp temple theater zoo
""")

ADJECTIVES = _words("""
    angry bad beautiful big bitter black blue bold brave bright broken
    brown busy calm careful cheap cheerful clean clever cold cool crooked
    cruel curious damp dark deep dirty dry dull dusty eager early easy
    elegant empty enormous faint fair famous fancy fast fat fierce fine
    flat foolish fresh friendly frozen full funny gentle glad golden good
    grand gray great green greedy handsome happy hard heavy helpful hidden
    high hollow hot huge humble hungry icy idle jolly kind large late lazy
    light little lively lonely long loud lovely lucky magic merry mighty
    modern muddy narrow nasty neat nervous new nice noisy odd old pale
    patient pink plain pleasant polite poor pretty proud purple quick
    quiet rare red rich ripe rough round royal rude rusty sad safe salty
    sharp shiny short shy silent silly silver simple sleepy slim slow small
    smart smooth soft sour square steep sticky strange strict strong
    sturdy sweet tall tame tender thick thin thirsty tidy tiny tired tough
    ugly warm weak wealthy wet white wicked wide wild wise wonderful wooden
    worried yellow young
""")

TRANSITIVE_VERBS = _pairs("""
    accept:accepted admire:admired answer:answered bake:baked
    borrow:borrowed bring:brought build:built buy:bought call:called
    carry:carried catch:caught chase:chased clean:cleaned climb:climbed
    close:closed collect:collected cook:cooked count:counted cover:covered
    cut:cut deliver:delivered draw:drew drop:dropped eat:ate fill:filled
    find:found fix:fixed fold:folded follow:followed forget:forgot
    grab:grabbed guard:guarded help:helped hide:hid hold:held hug:hugged
    keep:kept kick:kicked kiss:kissed lift:lifted like:liked love:loved
    lose:lost make:made mend:mended miss:missed move:moved need:needed
    open:opened order:ordered pack:packed paint:painted pass:passed
    pick:picked plant:planted pour:poured pull:pulled push:pushed
    raise:raised reach:reached read:read remember:remembered
    repair:repaired ride:rode sell:sold send:sent share:shared show:showed
    steal:stole stop:stopped take:took teach:taught throw:threw
    touch:touched visit:visited wash:washed watch:watched wear:wore win:won
    wrap:wrapped bury:buried boil:boiled chop:chopped drag:dragged feed:fed
    greet:greeted hear:heard hit:hit lend:lent measure:measured
    offer:offered place:placed polish:polished praise:praised
    protect:protected rescue:rescued scrub:scrubbed search:searched
    shake:shook sketch:sketched squeeze:squeezed stir:stirred
    study:studied sweep:swept tie:tied trust:trusted warn:warned
    weigh:weighed carve:carved chew:chewed choose:chose fetch:fetched
    hang:hung lead:led leave:left meet:met notice:noticed obey:obeyed
    observe:observed peel:peeled prefer:preferred prepare:prepared
    print:printed roll:rolled save:saved see:saw shut:shut spill:spilled
    spot:spotted tease:teased thank:thanked toss:tossed trade:traded
    unlock:unlocked wake:woke wipe:wiped write:wrote hire:hired
""")

INTRANSITIVE_VERBS = _pairs("""
    arrive:arrived bark:barked blink:blinked bow:bowed cough:coughed
    crawl:crawled cry:cried dance:danced dive:dived doze:dozed fall:fell
    float:floated fly:flew frown:frowned giggle:giggled grin:grinned
    grow:grew hop:hopped hurry:hurried jump:jumped kneel:knelt
    laugh:laughed listen:listened nod:nodded pause:paused play:played
    pray:prayed rest:rested return:returned run:ran rush:rushed
    shiver:shivered shout:shouted sing:sang sit:sat skip:skipped
    sleep:slept smile:smiled sneeze:sneezed speak:spoke stand:stood
    stay:stayed swim:swam travel:traveled tremble:trembled wait:waited
    walk:walked wander:wandered whisper:whispered work:worked yawn:yawned
    appear:appeared vanish:vanished disappear:disappeared escape:escaped
    sigh:sighed snore:snored struggle:struggled
""")

ADVERBS = _words("""
    quickly slowly quietly loudly carefully happily sadly gently suddenly
    softly bravely calmly eagerly easily gladly kindly lazily neatly
    nervously patiently politely proudly rudely safely secretly silently
    sleepily smoothly swiftly warmly wisely badly boldly briskly
    cheerfully clumsily foolishly gracefully hastily honestly angrily
    anxiously awkwardly carelessly closely
""")

#: Time expressions, each one or more words.
TIME_PHRASES = (
    "yesterday",
    "today",
    "tonight",
    "again",
    "once",
    "recently",
    "last night",
    "last week",
    "last year",
    "this morning",
    "this afternoon",
    "that evening",
    "at noon",
    "at midnight",
    "before dawn",
    "after lunch",
    "after school",
    "on monday",
    "on tuesday",
    "on wednesday",
    "on thursday",
    "on friday",
    "on saturday",
    "on sunday",
    "in the spring",
    "in the winter",
    "every summer",
    "every autumn",
)

NAMES = _words("""
    alice anna arthur benjamin charles charlotte daniel david edward
    eleanor emily emma frank george grace harry helen henry isabel jack
    james jane john julia kate laura lucy margaret martha mary michael
    oliver paul peter rachel robert samuel sarah susan thomas victor
    william
""")

PREPOSITIONS = _words("""
    in on under behind beside near inside outside above below across along
    around beyond past through toward into onto over by with without
    against from to
""")

DETERMINERS = _words("the this that my your his her our their every one")
MODALS = _words("""
    will would could should might must can cannot didn't won't wouldn't
    couldn't can't shouldn't
""")
REPORTING_VERBS = _words("""
    said thought knew hoped heard believed noticed dreamed remembered
    guessed
""")
CONJUNCTIONS = _words("""
    and but because while so although before after when until since or
""")
DEGREE_WORDS = _words("very quite rather too really extremely fairly")
QUESTION_WORDS = _words("where why when how")

#: Subject pronoun -> past form of "to be".
SUBJECT_PRONOUNS = types.MappingProxyType(
    {
        "i": "was",
        "you": "were",
        "he": "was",
        "she": "was",
        "it": "was",
        "we": "were",
        "they": "were",
    }
)
OBJECT_PRONOUNS = _words("me you him her it us them")

#: Words the templates themselves use.
TEMPLATE_WORDS = _words("""
    a an there was were that did who what please don't never let's
""")


def vocabulary():
    """Returns every word that ``generate_sentence`` can produce.

    Returns
    -------
    list of str
        The words, lower case, sorted, without repeats.

    Example
    -------
    >>> words = vocabulary()
    >>> len(words) >= 600
    True
    >>> "john's" in words and "elephant" in words
    True
    """
    words = set(NOUNS) | set(ADJECTIVES) | set(ADVERBS) | set(NAMES)
    words |= {f"{name}'s" for name in NAMES}
    for pairs in (TRANSITIVE_VERBS, INTRANSITIVE_VERBS):
        words |= {form for pair in pairs for form in pair}
    for phrase in TIME_PHRASES:
        words |= set(phrase.split())
    for group in (
        PREPOSITIONS,
        DETERMINERS,
        MODALS,
        REPORTING_VERBS,
        CONJUNCTIONS,
        DEGREE_WORDS,
        QUESTION_WORDS,
        OBJECT_PRONOUNS,
        TEMPLATE_WORDS,
    ):
        words |= set(group)
    words |= set(SUBJECT_PRONOUNS) | set(SUBJECT_PRONOUNS.values())
    return sorted(words)


def _article(next_word):
    """Returns ``"an"`` before a vowel letter, else ``"a"``."""
    return "an" if next_word[0] in "aeiou" else "a"


def _noun_phrase(rng):
    """A determiner (or article, or possessive name), optional adjective and
    a noun."""
    words = [rng.choice(NOUNS)]
    if rng.random() < 0.5:
        words.insert(0, rng.choice(ADJECTIVES))
    kind = rng.random()
    if kind < 0.35:
        words.insert(0, _article(words[0]))
    elif kind < 0.85:
        words.insert(0, rng.choice(DETERMINERS))
    else:
        words.insert(0, rng.choice(NAMES) + "'s")
    return words


def _subject(rng):
    """Returns ``(words, past form of "to be" that agrees with them)``."""
    kind = rng.random()
    if kind < 0.25:
        pronoun = rng.choice(sorted(SUBJECT_PRONOUNS))
        return [pronoun], SUBJECT_PRONOUNS[pronoun]
    if kind < 0.45:
        return [rng.choice(NAMES)], "was"
    return _noun_phrase(rng), "was"


def _object(rng):
    """An object: pronoun, name or noun phrase."""
    kind = rng.random()
    if kind < 0.2:
        return [rng.choice(OBJECT_PRONOUNS)]
    if kind < 0.35:
        return [rng.choice(NAMES)]
    return _noun_phrase(rng)


def _modifiers(rng):
    """Optional prepositional phrase and adverb or time phrase."""
    words = []
    if rng.random() < 0.45:
        words += [rng.choice(PREPOSITIONS), *_noun_phrase(rng)]
    kind = rng.random()
    if kind < 0.25:
        words.append(rng.choice(ADVERBS))
    elif kind < 0.4:
        words += rng.choice(TIME_PHRASES).split()
    return words


def _predicate(rng):
    """A verb phrase in the past tense or with a modal."""
    kind = rng.random()
    if kind < 0.45:
        return [rng.choice(TRANSITIVE_VERBS)[1], *_object(rng)]
    if kind < 0.7:
        return [rng.choice(INTRANSITIVE_VERBS)[1]]
    if kind < 0.88:
        base = rng.choice(TRANSITIVE_VERBS)[0]
        return [rng.choice(MODALS), base, *_object(rng)]
    return [rng.choice(MODALS), rng.choice(INTRANSITIVE_VERBS)[0]]


def _clause(rng):
    """A declarative clause."""
    kind = rng.random()
    if kind < 0.6:
        subject, _ = _subject(rng)
        return subject + _predicate(rng) + _modifiers(rng)
    if kind < 0.75:
        subject, be = _subject(rng)
        degree = [rng.choice(DEGREE_WORDS)] if rng.random() < 0.5 else []
        return subject + [be] + degree + [rng.choice(ADJECTIVES)]
    if kind < 0.85:
        time_phrase = rng.choice(TIME_PHRASES).split()
        subject, _ = _subject(rng)
        return time_phrase + subject + _predicate(rng)
    noun_phrase = [rng.choice(ADJECTIVES), rng.choice(NOUNS)]
    if rng.random() < 0.5:
        noun_phrase = noun_phrase[1:]
    return (
        ["there", "was", _article(noun_phrase[0]), *noun_phrase]
        + [rng.choice(PREPOSITIONS)]
        + _noun_phrase(rng)
    )


def _question(rng):
    """A yes/no or wh- question (without the question mark)."""
    kind = rng.random()
    subject, _ = _subject(rng)
    base = rng.choice(TRANSITIVE_VERBS)[0]
    if kind < 0.35:
        return ["did", *subject, base, *_object(rng), *_modifiers(rng)]
    if kind < 0.7:
        wh_word = rng.choice(QUESTION_WORDS)
        return [wh_word, "did", *subject, base, *_object(rng)]
    if kind < 0.85:
        return ["what", "did", *subject, base]
    return ["who", rng.choice(TRANSITIVE_VERBS)[1], *_object(rng)]


def _sentence_words(rng):
    """One sentence of any template, as a list of words."""
    kind = rng.random()
    if kind < 0.5:
        return _clause(rng)
    if kind < 0.7:
        return _clause(rng) + [rng.choice(CONJUNCTIONS)] + _clause(rng)
    if kind < 0.8:
        subject, _ = _subject(rng)
        return subject + [rng.choice(REPORTING_VERBS), "that", *_clause(rng)]
    if kind < 0.92:
        return _question(rng)
    opening = rng.choice((["please"], ["don't"], ["never"], ["let's"]))
    if opening == ["let's"]:
        return opening + [rng.choice(INTRANSITIVE_VERBS)[0]] + _modifiers(rng)
    base = rng.choice(TRANSITIVE_VERBS)[0]
    return opening + [base, *_object(rng), *_modifiers(rng)]


def generate_sentence(rng):
    """Generates one sentence from the grammar.

    Arguments
    ---------
    rng : random.Random
        The random generator; the sentence depends only on its state.

    Returns
    -------
    str
        Lower-case words (letters and apostrophes) separated by single
        spaces, between ``MIN_WORDS`` and ``MAX_WORDS`` words long.

    Example
    -------
    >>> import random
    >>> sentence = generate_sentence(random.Random(0))
    >>> sentence == generate_sentence(random.Random(0))
    True
    >>> MIN_WORDS <= len(sentence.split()) <= MAX_WORDS
    True
    """
    while True:
        words = _sentence_words(rng)
        if MIN_WORDS <= len(words) <= MAX_WORDS:
            return " ".join(words)


def generate_sentences(count, rng, exclude=()):
    """Generates distinct sentences.

    Arguments
    ---------
    count : int
        How many sentences.
    rng : random.Random
        The random generator.
    exclude : collection of str
        Sentences that must not be returned (e.g. those of other splits).

    Returns
    -------
    list of str
        ``count`` distinct sentences, none of them in ``exclude``.

    Example
    -------
    >>> import random
    >>> first = generate_sentences(3, random.Random(1))
    >>> len(set(first))
    3
    >>> more = generate_sentences(3, random.Random(1), exclude=first)
    >>> set(first) & set(more)
    set()
    """
    seen = set(exclude)
    sentences = []
    while len(sentences) < count:
        sentence = generate_sentence(rng)
        if sentence not in seen:
            seen.add(sentence)
            sentences.append(sentence)
    return sentences


def speakable_text(sentence):
    """Returns the text given to eSpeak NG for a generated sentence.

    The words are unchanged; a final ``?`` or ``.`` sets the intonation
    (punctuation is not spoken).

    Arguments
    ---------
    sentence : str
        A sentence from ``generate_sentence``.

    Returns
    -------
    str
        The sentence with its final punctuation.

    Example
    -------
    >>> speakable_text("did you see it")
    'did you see it?'
    >>> speakable_text("the cat slept")
    'the cat slept.'
    """
    first = sentence.split(" ", 1)[0]
    is_question = first in ("did", "what", "who", *QUESTION_WORDS)
    return sentence + ("?" if is_question else ".")


def transcript_text(sentence):
    """Returns the LibriSpeech-style transcript of a generated sentence.

    Arguments
    ---------
    sentence : str
        A sentence from ``generate_sentence``.

    Returns
    -------
    str
        The words in upper case, separated by single spaces.

    Example
    -------
    >>> transcript_text("i didn't see john's  dog")
    "I DIDN'T SEE JOHN'S DOG"
    """
    return " ".join(sentence.upper().split())


@dataclasses.dataclass(frozen=True)
class Speaker:
    """One synthetic speaker: an eSpeak NG voice with a rate and a pitch.

    Arguments
    ---------
    speaker_id : int
        The LibriSpeech-style speaker id.
    voice : str
        eSpeak NG base voice, e.g. ``"en-us"``.
    variant : str
        eSpeak NG voice variant, e.g. ``"m3"`` or ``"f2"``.
    rate : int
        Speaking rate in words per minute.
    pitch : int
        Base pitch, 0-100 (eSpeak NG's default is 50).

    Example
    -------
    >>> speaker = Speaker(100, "en-us", "f2", 150, 35)
    >>> speaker.voice_name, speaker.sex
    ('en-us+f2', 'F')
    """

    speaker_id: int
    voice: str
    variant: str
    rate: int
    pitch: int

    @property
    def voice_name(self):
        """The name given to ``espeak_SetVoiceByName``, ``voice+variant``.

        Example
        -------
        >>> Speaker(7, "en", "m1", 180, 65).voice_name
        'en+m1'
        """
        return f"{self.voice}+{self.variant}"

    @property
    def sex(self):
        """``"F"`` for the female variants ``f*``, else ``"M"``.

        Example
        -------
        >>> Speaker(7, "en", "m1", 180, 65).sex
        'M'
        """
        return "F" if self.variant.startswith("f") else "M"


def speaker_table():
    """Returns every synthetic speaker, with ids from ``FIRST_SPEAKER_ID``.

    Speakers are all combinations of ``VOICES``, ``VARIANTS``, ``RATES`` and
    ``PITCHES``, numbered in that nesting order.

    Returns
    -------
    tuple of Speaker
        The speakers, by increasing id.

    Example
    -------
    >>> speakers = speaker_table()
    >>> len(speakers)
    88
    >>> speakers[0]
    Speaker(speaker_id=100, voice='en-us', variant='m1', rate=150, pitch=35)
    """
    combinations = [
        (voice, variant, rate, pitch)
        for voice in VOICES
        for variant in VARIANTS
        for rate in RATES
        for pitch in PITCHES
    ]
    return tuple(
        Speaker(FIRST_SPEAKER_ID + index, *combination)
        for index, combination in enumerate(combinations)
    )


def split_speakers(speakers):
    """Separates training speakers from the held-out (test-other) ones.

    A speaker is held out when its variant is in ``HELD_OUT_VARIANTS``.

    Arguments
    ---------
    speakers : sequence of Speaker
        E.g. ``speaker_table()``.

    Returns
    -------
    seen : tuple of Speaker
        Speakers of train-clean-100, dev-clean and test-clean.
    unseen : tuple of Speaker
        Speakers of test-other only.

    Example
    -------
    >>> seen, unseen = split_speakers(speaker_table())
    >>> len(seen), len(unseen)
    (72, 16)
    """
    seen = tuple(s for s in speakers if s.variant not in HELD_OUT_VARIANTS)
    unseen = tuple(s for s in speakers if s.variant in HELD_OUT_VARIANTS)
    return seen, unseen


def estimate_seconds(sentence, speaker):
    """Estimates how long eSpeak NG takes to say a sentence.

    Used to plan how many utterances make the requested amount of audio; the
    actual durations are measured after synthesis.

    Arguments
    ---------
    sentence : str
        A generated sentence.
    speaker : Speaker
        Who says it (its rate matters).

    Returns
    -------
    float
        Estimated duration in seconds, silence margins included.

    Example
    -------
    >>> slow = Speaker(1, "en", "m1", 150, 50)
    >>> fast = Speaker(2, "en", "m1", 180, 50)
    >>> estimate_seconds("the cat slept", slow) > estimate_seconds(
    ...     "the cat slept", fast
    ... )
    True
    """
    words = sentence.split()
    letters = sum(len(word) for word in words)
    scale = 175.0 / speaker.rate
    return (
        _ESTIMATE_INTERCEPT
        + _ESTIMATE_PER_LETTER * letters * scale
        + _ESTIMATE_PER_WORD * len(words) * scale
    )


class ESpeakNG:
    """Speech synthesis with the eSpeak NG library of ``espeakng-loader``.

    The C library keeps process-global state that changes the output of
    later calls, so every ``synthesize`` call loads a private copy of the
    library afresh, initialises it in synchronous mode, synthesises through
    a callback that collects the samples, and unloads it again. The private
    copy (made once, in a temporary folder) keeps this independent of any
    other user of the library in the process. Not thread-safe.

    Arguments
    ---------
    library_path : str, optional
        The shared library; default ``espeakng_loader.get_library_path()``.
    data_path : str, optional
        The ``espeak-ng-data`` folder; default
        ``espeakng_loader.get_data_path()``.

    Example
    -------
    >>> with ESpeakNG() as engine:
    ...     samples = engine.synthesize("hello world.", "en-us+m1")
    >>> samples.dtype.name, samples.size > ESPEAK_SAMPLE_RATE // 4
    ('int16', True)
    """

    def __init__(self, library_path=None, data_path=None):
        if library_path is None or data_path is None:
            import espeakng_loader

            library_path = library_path or espeakng_loader.get_library_path()
            data_path = data_path or espeakng_loader.get_data_path()
        if not os.path.isfile(library_path):
            raise FileNotFoundError(
                f"eSpeak NG library not found: {library_path}. Install it "
                "with `pip install espeakng-loader`."
            )
        if not os.path.isdir(data_path):
            raise FileNotFoundError(
                f"eSpeak NG data folder not found: {data_path}. Install it "
                "with `pip install espeakng-loader`."
            )
        self.data_path = os.fspath(data_path)
        self._folder = tempfile.mkdtemp(prefix="espeak-ng-")
        self._cleanup = weakref.finalize(
            self, shutil.rmtree, self._folder, ignore_errors=True
        )
        self._library = os.path.join(self._folder, "libespeak-ng-private.so")
        shutil.copyfile(library_path, self._library)
        self._chunks = []
        self._callback = _SYNTH_CALLBACK(self._collect)

    def _collect(self, samples, count, events):
        """Synth callback: keeps a copy of each block of samples."""
        if samples and count > 0:
            block = np.ctypeslib.as_array(samples, shape=(count,))
            self._chunks.append(block.copy())
        return 0

    def _load(self):
        """Loads and initialises a fresh instance of the library."""
        if self._folder is None:
            raise RuntimeError("This ESpeakNG engine is closed.")
        library = ctypes.CDLL(self._library, mode=os.RTLD_LOCAL)
        library.espeak_Initialize.argtypes = [
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_int,
        ]
        library.espeak_Initialize.restype = ctypes.c_int
        library.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
        library.espeak_SetSynthCallback.restype = None
        library.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        library.espeak_SetParameter.argtypes = [
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
        ]
        library.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        library.espeak_Synth.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        library.espeak_Info.argtypes = [ctypes.c_void_p]
        library.espeak_Info.restype = ctypes.c_char_p
        rate = library.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, self.data_path.encode(), 0
        )
        if rate != ESPEAK_SAMPLE_RATE:
            self._unload(library, initialised=rate > 0)
            raise RuntimeError(
                f"espeak_Initialize failed (returned {rate}) with the data "
                f"folder {self.data_path}: check the espeakng-loader install."
            )
        library.espeak_SetSynthCallback(self._callback)
        return library

    @staticmethod
    def _unload(library, initialised=True):
        """Terminates and unloads an instance of the library."""
        if initialised:
            library.espeak_Terminate()
        # Unloading resets every C global for the next load; the CDLL object
        # must not be used afterwards.
        _ctypes.dlclose(library._handle)

    def version(self):
        """Returns the eSpeak NG version string.

        Returns
        -------
        str
            E.g. ``"1.52.0"``.

        Example
        -------
        >>> with ESpeakNG() as engine:
        ...     engine.version()[:1].isdigit()
        True
        """
        library = self._load()
        try:
            return library.espeak_Info(None).decode()
        finally:
            self._unload(library)

    def synthesize(self, text, voice_name, rate=175, pitch=50, noise_seed=0):
        """Synthesises a text at ``ESPEAK_SAMPLE_RATE``.

        Arguments
        ---------
        text : str
            What to say (plain text; punctuation sets intonation).
        voice_name : str
            eSpeak NG voice, optionally with a variant, e.g. ``"en+f3"``.
        rate : int
            Speaking rate in words per minute (80-450).
        pitch : int
            Base pitch, 0-100.
        noise_seed : int
            Seed of eSpeak NG's noise generator.

        Returns
        -------
        numpy.ndarray
            The int16 samples (mono).

        Raises
        ------
        ValueError
            If eSpeak NG has no such voice, or synthesis fails.

        Example
        -------
        >>> with ESpeakNG() as engine:
        ...     first = engine.synthesize("good morning.", "en+f3", 180, 65)
        ...     _ = engine.synthesize("something else.", "en-us+m2")
        ...     again = engine.synthesize("good morning.", "en+f3", 180, 65)
        >>> bool((first == again).all())
        True
        """
        library = self._load()
        self._chunks = []
        try:
            status = library.espeak_SetVoiceByName(voice_name.encode())
            if status != _EE_OK:
                raise ValueError(
                    f"eSpeak NG has no voice '{voice_name}' (status "
                    f"{status}): use a voice such as 'en-us' or 'en', "
                    "optionally with a variant such as '+m3' or '+f2'."
                )
            library.espeak_SetParameter(_ESPEAK_RATE, int(rate), 0)
            library.espeak_SetParameter(_ESPEAK_PITCH, int(pitch), 0)
            library.espeak_ng_SetRandSeed(int(noise_seed))
            encoded = text.encode("utf-8")
            status = library.espeak_Synth(
                encoded,
                len(encoded) + 1,
                0,
                _POS_CHARACTER,
                0,
                _ESPEAK_CHARS_UTF8,
                None,
                None,
            )
            if status == _EE_OK:
                status = library.espeak_Synchronize()
            if status != _EE_OK:
                raise ValueError(
                    f"espeak_Synth failed (status {status}) for the text "
                    f"{text!r} with voice '{voice_name}'."
                )
        finally:
            self._unload(library)
        chunks, self._chunks = self._chunks, []
        if not chunks:
            return np.zeros(0, dtype=np.int16)
        return np.concatenate(chunks).astype(np.int16, copy=False)

    def close(self):
        """Deletes the private copy of the library.

        Example
        -------
        >>> engine = ESpeakNG()
        >>> engine.close()
        >>> engine.close()  # closing twice is fine
        """
        self._cleanup()
        self._folder = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def resample_to_16k(samples):
    """Resamples eSpeak NG output from 22050 Hz to 16 kHz.

    Arguments
    ---------
    samples : numpy.ndarray
        Samples at ``ESPEAK_SAMPLE_RATE`` (any numeric dtype, int16 scale).

    Returns
    -------
    numpy.ndarray
        float64 samples at ``SAMPLE_RATE`` (int16 scale).

    Example
    -------
    >>> resample_to_16k(np.zeros(22050, dtype=np.int16)).shape
    (16000,)
    """
    return resample_poly(np.asarray(samples, dtype=np.float64), 320, 441)


def trim_silence(samples, sample_rate=SAMPLE_RATE):
    """Keeps exactly ``SILENCE_MARGIN_SECONDS`` around the speech.

    Speech runs from the first to the last sample whose magnitude exceeds
    ``SILENCE_THRESHOLD``. Original samples are kept on each side up to the
    margin; zeros fill the rest of the margin where the input is shorter.

    Arguments
    ---------
    samples : numpy.ndarray
        Mono samples (int16 scale).
    sample_rate : int
        Their sample rate.

    Returns
    -------
    numpy.ndarray
        The trimmed samples (same dtype); unchanged if nothing exceeds the
        threshold.

    Example
    -------
    >>> x = np.zeros(16000)
    >>> x[8000:8010] = 1000.0
    >>> trim_silence(x).size  # 10 loud samples + 2 x 0.1 s
    3210
    """
    loud = np.flatnonzero(np.abs(samples) > SILENCE_THRESHOLD)
    if loud.size == 0:
        return samples
    margin = int(round(SILENCE_MARGIN_SECONDS * sample_rate))
    padded = np.concatenate(
        [
            np.zeros(margin, samples.dtype),
            samples,
            np.zeros(margin, samples.dtype),
        ]
    )
    return padded[loud[0] : loud[-1] + 2 * margin + 1]


def to_int16(samples):
    """Rounds and clips int16-scale samples to int16.

    Arguments
    ---------
    samples : numpy.ndarray
        Float samples on the int16 scale.

    Returns
    -------
    numpy.ndarray
        int16 samples.

    Example
    -------
    >>> to_int16(np.array([1.6, -40000.0, 40000.0])).tolist()
    [2, -32768, 32767]
    """
    return np.clip(np.round(samples), -32768, 32767).astype(np.int16)


def synthesize_text(sentence, speaker, engine=None):
    """Says one sentence with one speaker, as 16 kHz int16 audio.

    Arguments
    ---------
    sentence : str
        A generated sentence (lower-case words).
    speaker : Speaker
        The voice, rate and pitch.
    engine : ESpeakNG, optional
        A synthesis engine to reuse; a temporary one is made if omitted.

    Returns
    -------
    numpy.ndarray
        int16 mono samples at ``SAMPLE_RATE``, with silence margins of
        ``SILENCE_MARGIN_SECONDS``; the same inputs always give the same
        samples.

    Example
    -------
    >>> speaker = speaker_table()[0]
    >>> audio = synthesize_text("the cat slept", speaker)
    >>> bool((audio == synthesize_text("the cat slept", speaker)).all())
    True
    >>> 0.5 < audio.size / SAMPLE_RATE < 3.0
    True
    """
    if engine is None:
        with ESpeakNG() as own_engine:
            return synthesize_text(sentence, speaker, own_engine)
    raw = engine.synthesize(
        speakable_text(sentence),
        speaker.voice_name,
        rate=speaker.rate,
        pitch=speaker.pitch,
    )
    return to_int16(trim_silence(resample_to_16k(raw)))


@dataclasses.dataclass(frozen=True)
class PlannedUtterance:
    """One utterance of the corpus, before synthesis.

    Arguments
    ---------
    split : str
        One of ``SPLITS``.
    speaker : Speaker
        Who says it.
    chapter_id : int
        Its chapter.
    index : int
        Its number within the chapter.
    sentence : str
        What is said (lower case).

    Example
    -------
    >>> utt = PlannedUtterance(
    ...     "dev-clean", speaker_table()[0], 1003, 7, "the cat slept"
    ... )
    >>> utt.utterance_id, utt.transcript
    ('100-1003-0007', 'THE CAT SLEPT')
    >>> utt.relative_path
    'dev-clean/100/1003/100-1003-0007.flac'
    """

    split: str
    speaker: Speaker
    chapter_id: int
    index: int
    sentence: str

    @property
    def utterance_id(self):
        """``<speaker>-<chapter>-<index:04d>``.

        Example
        -------
        >>> PlannedUtterance(
        ...     "test-clean", speaker_table()[1], 1000, 12, "hi there you"
        ... ).utterance_id
        '101-1000-0012'
        """
        return f"{self.speaker.speaker_id}-{self.chapter_id}-{self.index:04d}"

    @property
    def transcript(self):
        """The upper-case transcript.

        Example
        -------
        >>> PlannedUtterance(
        ...     "test-clean", speaker_table()[1], 1000, 12, "hi there you"
        ... ).transcript
        'HI THERE YOU'
        """
        return transcript_text(self.sentence)

    @property
    def chapter_folder(self):
        """``<split>/<speaker>/<chapter>`` (relative, ``/``-separated).

        Example
        -------
        >>> PlannedUtterance(
        ...     "test-clean", speaker_table()[1], 1000, 12, "hi there you"
        ... ).chapter_folder
        'test-clean/101/1000'
        """
        return f"{self.split}/{self.speaker.speaker_id}/{self.chapter_id}"

    @property
    def relative_path(self):
        """Path of the FLAC file relative to the ``LibriSpeech`` folder.

        Example
        -------
        >>> PlannedUtterance(
        ...     "test-clean", speaker_table()[1], 1000, 12, "hi there you"
        ... ).relative_path
        'test-clean/101/1000/101-1000-0012.flac'
        """
        return f"{self.chapter_folder}/{self.utterance_id}.flac"


def _plan_split(speakers, budget_seconds, min_utterances, rng, used):
    """Chooses ``(speaker, sentence)`` pairs for one split.

    Speakers take turns; sentences are added until the estimated duration
    reaches ``budget_seconds`` and there are at least ``min_utterances``.
    """
    pairs = []
    estimated = 0.0
    while estimated < budget_seconds or len(pairs) < min_utterances:
        speaker = speakers[len(pairs) % len(speakers)]
        sentence = generate_sentence(rng)
        if sentence in used:
            continue
        used.add(sentence)
        pairs.append((speaker, sentence))
        estimated += estimate_seconds(sentence, speaker)
    return pairs


def _assign_chapters(split_pairs):
    """Turns ``{split: [(speaker, sentence)]}`` into planned utterances.

    Each speaker's utterances of a split fill chapters of at most
    ``MAX_UTTERANCES_PER_CHAPTER``; chapter ids are unique in the corpus,
    numbered by split, speaker id and chapter order.
    """
    grouped = {}
    for split in SPLITS:
        for speaker, sentence in split_pairs[split]:
            grouped.setdefault((split, speaker.speaker_id), []).append(
                (speaker, sentence)
            )
    order = {split: rank for rank, split in enumerate(SPLITS)}
    utterances = []
    chapter_id = FIRST_CHAPTER_ID
    for key in sorted(grouped, key=lambda k: (order[k[0]], k[1])):
        items = grouped[key]
        for start in range(0, len(items), MAX_UTTERANCES_PER_CHAPTER):
            chunk = items[start : start + MAX_UTTERANCES_PER_CHAPTER]
            for index, (speaker, sentence) in enumerate(chunk):
                utterances.append(
                    PlannedUtterance(
                        key[0], speaker, chapter_id, index, sentence
                    )
                )
            chapter_id += 1
    return utterances


def plan_corpus(hours, seed):
    """Decides every utterance of a corpus: split, speaker, chapter, text.

    The training split gets about ``hours`` of (estimated) audio, spread over
    the seen speakers in a seeded order; dev-clean and test-clean each get
    ``EVAL_FRACTION`` of that (at least ``MIN_EVAL_UTTERANCES`` utterances)
    from the speakers that occur in training; test-other gets as much from
    the held-out speakers. No sentence occurs twice in the corpus.

    Arguments
    ---------
    hours : float
        Training audio, in hours (positive).
    seed : int
        Seed of every random choice.

    Returns
    -------
    list of PlannedUtterance
        Sorted by split (in ``SPLITS`` order), speaker id, chapter, index.

    Raises
    ------
    ValueError
        If ``hours`` is not a positive finite number or ``seed`` is not an
        integer.

    Example
    -------
    >>> plan = plan_corpus(0.003, seed=1)
    >>> sorted({utt.split for utt in plan}) == sorted(SPLITS)
    True
    >>> plan == plan_corpus(0.003, seed=1)
    True
    """
    _check_options(hours, seed)
    rng = random.Random(seed)
    seen, unseen = split_speakers(speaker_table())
    train_order = list(seen)
    rng.shuffle(train_order)
    used = set()
    train_seconds = hours * 3600.0
    split_pairs = {
        TRAIN_SPLIT: _plan_split(train_order, train_seconds, 1, rng, used)
    }
    in_training = train_order[: len(split_pairs[TRAIN_SPLIT])]
    eval_seconds = EVAL_FRACTION * train_seconds
    for split in SEEN_SPEAKER_EVAL_SPLITS:
        split_pairs[split] = _plan_split(
            in_training, eval_seconds, MIN_EVAL_UTTERANCES, rng, used
        )
    unseen_order = list(unseen)
    rng.shuffle(unseen_order)
    split_pairs[UNSEEN_SPEAKER_EVAL_SPLIT] = _plan_split(
        unseen_order,
        eval_seconds,
        MIN_EVAL_UTTERANCES,
        rng,
        used,
    )
    return _assign_chapters(split_pairs)


def _check_options(hours, seed):
    """Raises ``ValueError`` for unusable generation options."""
    if isinstance(hours, bool) or not isinstance(hours, (int, float)):
        raise ValueError(f"hours must be a number, got {hours!r}.")
    if not math.isfinite(hours) or hours <= 0:
        raise ValueError(
            f"hours must be a positive number of hours of training audio, "
            f"got {hours!r} (e.g. 0.01 for a tiny corpus, 1.0 for an hour)."
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}.")


def _synthesize_jobs(jobs):
    """Synthesises and writes ``(path, sentence, speaker)`` jobs (run by a
    worker process, with its own engine).

    Returns
    -------
    list of int
        The number of samples written per job.
    """
    lengths = []
    with ESpeakNG() as engine:
        for path, sentence, speaker in jobs:
            lengths.append(_write_utterance(path, sentence, speaker, engine))
    return lengths


def _write_utterance(path, sentence, speaker, engine):
    """Synthesises one utterance and writes it as 16-bit FLAC."""
    audio = synthesize_text(sentence, speaker, engine)
    soundfile.write(path, audio, SAMPLE_RATE, subtype="PCM_16", format="FLAC")
    return int(audio.size)


def _run_jobs(jobs, num_workers, progress):
    """Runs all synthesis jobs; returns the sample counts in job order."""
    bar = tqdm(
        total=len(jobs), desc="Synthesising", unit="utt", disable=not progress
    )
    with bar:
        if num_workers == 1:
            with ESpeakNG() as engine:
                lengths = []
                for job in jobs:
                    lengths.append(_write_utterance(*job, engine))
                    bar.update(1)
            return lengths
        chunks = [
            jobs[start : start + _CHUNK_SIZE]
            for start in range(0, len(jobs), _CHUNK_SIZE)
        ]
        results = [None] * len(chunks)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(num_workers, mp_context=context) as pool:
            futures = {
                pool.submit(_synthesize_jobs, chunk): position
                for position, chunk in enumerate(chunks)
            }
            try:
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update(len(chunks[futures[future]]))
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    return [length for chunk in results for length in chunk]


def _write_transcripts(root, plan):
    """Writes one ``<spk>-<chap>.trans.txt`` per chapter folder."""
    chapters = {}
    for utt in plan:
        chapters.setdefault(utt.chapter_folder, []).append(utt)
    for folder, utterances in chapters.items():
        speaker, chapter = folder.split("/")[1:]
        path = os.path.join(root, *folder.split("/"))
        lines = [f"{u.utterance_id} {u.transcript}\n" for u in utterances]
        with open(
            os.path.join(path, f"{speaker}-{chapter}.trans.txt"),
            "w",
            encoding="utf-8",
            newline="",
        ) as handle:
            handle.writelines(lines)


def _summarise(plan, lengths, wall_seconds):
    """Builds the summary dict returned by ``generate_corpus``."""
    splits = {}
    for split in SPLITS:
        samples = [n for utt, n in zip(plan, lengths) if utt.split == split]
        speakers = {
            utt.speaker.speaker_id for utt in plan if utt.split == split
        }
        splits[split] = {
            "utterances": len(samples),
            "seconds": round(sum(samples) / SAMPLE_RATE, 3),
            "speakers": len(speakers),
        }
    total_seconds = round(sum(lengths) / SAMPLE_RATE, 3)
    return {
        "splits": splits,
        "utterances": len(lengths),
        "seconds": total_seconds,
        "wall_seconds": round(wall_seconds, 3),
        "audio_seconds_per_wall_second": round(
            total_seconds / max(wall_seconds, 1e-9), 1
        ),
    }


def _read_manifest(path):
    """Returns the parsed manifest, or ``None`` if it is absent."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError) as error:
        raise FileExistsError(
            f"{path} cannot be read ({error}): the folder "
            f"{os.path.dirname(path)} was not written by a finished run of "
            "this generator. Choose another output folder or delete it."
        ) from error
    if not isinstance(manifest, dict) or "options" not in manifest:
        raise FileExistsError(
            f"{path} is not a synthetic corpus manifest (no 'options' key). "
            f"Choose another output folder or delete {os.path.dirname(path)}."
        )
    return manifest


def _write_json(path, content):
    """Writes a JSON file atomically."""
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(content, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(temporary, path)


def _speaker_records(plan):
    """Describes every speaker used in the corpus, for the manifest."""
    records = {}
    for utt in plan:
        speaker = utt.speaker
        record = records.setdefault(
            str(speaker.speaker_id),
            {
                "voice": speaker.voice_name,
                "rate": speaker.rate,
                "pitch": speaker.pitch,
                "sex": speaker.sex,
                "splits": [],
            },
        )
        if utt.split not in record["splits"]:
            record["splits"].append(utt.split)
    return dict(sorted(records.items(), key=lambda item: int(item[0])))


def generate_corpus(
    out_dir, hours=1.0, seed=1234, num_workers=1, progress=True
):
    """Writes a synthetic corpus in the LibriSpeech layout.

    Files go to ``<out_dir>/LibriSpeech/<split>/...`` (see the module
    docstring) and ``<out_dir>/LibriSpeech/SYNTHETIC.json`` records the
    options (``hours``, ``seed``, format version), the speakers and the
    summary. Output files are byte-identical for the same options, whatever
    ``num_workers``. Calling this again with the same options on a complete
    corpus does nothing and returns the stored summary; an interrupted run
    is redone from the start.

    Arguments
    ---------
    out_dir : str or os.PathLike
        Output folder (created if needed).
    hours : float
        Training audio in hours; each evaluation split gets
        ``EVAL_FRACTION`` of it, at least ``MIN_EVAL_UTTERANCES``
        utterances.
    seed : int
        Seed of sentences and speaker assignment.
    num_workers : int
        Synthesis processes (1: synthesise in this process).
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    dict
        ``"splits"``: ``{split: {"utterances", "seconds", "speakers"}}``,
        plus totals ``"utterances"``, ``"seconds"``, the generation time
        ``"wall_seconds"`` and ``"audio_seconds_per_wall_second"``.

    Raises
    ------
    FileExistsError
        If ``<out_dir>/LibriSpeech`` holds a corpus generated with other
        options, or files that this generator did not write.
    ValueError
        For bad ``hours``, ``seed`` or ``num_workers``.

    Example
    -------
    >>> import tempfile
    >>> out = tempfile.mkdtemp()
    >>> summary = generate_corpus(out, hours=0.001, seed=3, progress=False)
    >>> summary["splits"]["test-other"]["utterances"]
    5
    >>> generate_corpus(out, hours=0.001, seed=3, progress=False) == summary
    True
    >>> shutil.rmtree(out)
    """
    _check_options(hours, seed)
    if (
        isinstance(num_workers, bool)
        or not isinstance(num_workers, int)
        or num_workers < 1
    ):
        raise ValueError(
            f"num_workers must be a positive integer, got {num_workers!r}."
        )
    root = os.path.join(os.fspath(out_dir), "LibriSpeech")
    manifest_path = os.path.join(root, MANIFEST_NAME)
    options = {
        "hours": float(hours),
        "seed": int(seed),
        "format_version": FORMAT_VERSION,
    }
    manifest = _read_manifest(manifest_path)
    if manifest is None and os.path.isdir(root) and os.listdir(root):
        raise FileExistsError(
            f"{root} already exists and holds files that this generator did "
            f"not write (no {MANIFEST_NAME}). Choose another output folder "
            "or delete it."
        )
    if manifest is not None and manifest["options"] != options:
        raise FileExistsError(
            f"{root} already holds a synthetic corpus generated with the "
            f"options {manifest['options']}, not {options}. Choose another "
            f"output folder or delete {root}."
        )
    if manifest is not None and manifest.get("complete"):
        return manifest["summary"]

    start = time.perf_counter()
    plan = plan_corpus(hours, seed)
    with ESpeakNG() as engine:
        espeak_version = engine.version()
    os.makedirs(root, exist_ok=True)
    manifest = {
        "generator": "speechbrain_spg.data.synthetic",
        "options": options,
        "complete": False,
        "espeak_ng_version": espeak_version,
        "sample_rate": SAMPLE_RATE,
    }
    _write_json(manifest_path, manifest)
    for folder in sorted({utt.chapter_folder for utt in plan}):
        os.makedirs(os.path.join(root, *folder.split("/")), exist_ok=True)
    jobs = [
        (
            os.path.join(root, *utt.relative_path.split("/")),
            utt.sentence,
            utt.speaker,
        )
        for utt in plan
    ]
    lengths = _run_jobs(jobs, num_workers, progress)
    _write_transcripts(root, plan)
    summary = _summarise(plan, lengths, time.perf_counter() - start)
    manifest.update(
        complete=True,
        num_workers=num_workers,
        speakers=_speaker_records(plan),
        summary=summary,
    )
    _write_json(manifest_path, manifest)
    return summary


def format_summary(summary):
    """Formats a ``generate_corpus`` summary as a small table.

    Arguments
    ---------
    summary : dict
        As returned by ``generate_corpus``.

    Returns
    -------
    str
        One line per split, then the totals and the generation speed.

    Example
    -------
    >>> split = {"utterances": 2, "seconds": 7.2, "speakers": 2}
    >>> print(format_summary({
    ...     "splits": {"dev-clean": split},
    ...     "utterances": 2,
    ...     "seconds": 7.2,
    ...     "wall_seconds": 0.5,
    ...     "audio_seconds_per_wall_second": 14.4,
    ... }))
    split            utterances    hours  speakers
    dev-clean                 2   0.0020         2
    total                     2   0.0020
    7.2 s of audio in 0.5 s (14.4 s of audio per second)
    """
    lines = [f"{'split':<16} {'utterances':>10} {'hours':>8} {'speakers':>9}"]
    for split, info in summary["splits"].items():
        lines.append(
            f"{split:<16} {info['utterances']:>10} "
            f"{info['seconds'] / 3600:>8.4f} {info['speakers']:>9}"
        )
    lines.append(
        f"{'total':<16} {summary['utterances']:>10} "
        f"{summary['seconds'] / 3600:>8.4f}"
    )
    lines.append(
        f"{summary['seconds']} s of audio in {summary['wall_seconds']} s "
        f"({summary['audio_seconds_per_wall_second']} s of audio per second)"
    )
    return "\n".join(lines)


def main(argv=None):
    """Command line: generates a corpus and prints its summary.

    Arguments
    ---------
    argv : list of str, optional
        Arguments (default ``sys.argv[1:]``): ``--out DIR --hours H
        --seed S [--workers N] [--quiet]``.

    Returns
    -------
    int
        The exit status (0).

    Example
    -------
    >>> import contextlib, io, tempfile
    >>> out = tempfile.mkdtemp()
    >>> with contextlib.redirect_stdout(io.StringIO()) as printed:
    ...     status = main(["--out", out, "--hours", "0.001", "--quiet"])
    >>> status
    0
    >>> printed.getvalue().splitlines()[0]
    'split            utterances    hours  speakers'
    >>> shutil.rmtree(out)
    """
    parser = argparse.ArgumentParser(
        prog="python -m speechbrain_spg.data.synthetic",
        description="Generate a synthetic English speech corpus (eSpeak NG) "
        "in the LibriSpeech layout, under OUT/LibriSpeech.",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--hours",
        type=float,
        default=1.0,
        help="hours of training audio (default: 1.0); each evaluation "
        f"split gets {EVAL_FRACTION:.0%} of it",
    )
    parser.add_argument(
        "--seed", type=int, default=1234, help="random seed (default: 1234)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="synthesis processes (default: 1); the output is identical",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        summary = generate_corpus(
            args.out,
            hours=args.hours,
            seed=args.seed,
            num_workers=args.workers,
            progress=not args.quiet,
        )
    except (FileExistsError, ValueError) as error:
        parser.error(str(error))
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
