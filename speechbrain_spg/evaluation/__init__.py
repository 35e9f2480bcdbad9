"""Evaluation tools and the reusable pieces of the recipe.

``compare`` tabulates and plots runs of the recipe; ``significance`` holds
the matched-pair (MAPSSWE) and bootstrap tests it uses. ``trace``,
``summary`` and ``recipe`` are the parts of the LibriSpeech recipe that any
recipe training an SPG lobe with SpeechBrain can use: the training trace and
history, the end of a run (prune, export, evaluate the export, summarise),
and training safely (optimiser groups, exact resumes, DDP).
"""
