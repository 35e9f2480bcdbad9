"""Pieces of the LibriSpeech recipe that any SpeechBrain recipe training an
SPG lobe can reuse.

``trace`` records the training trace and the per-epoch history (and sends
them to the train logger); ``recipe`` trains safely: optimiser groups of
the gates, exact resumes, DDP.
"""
