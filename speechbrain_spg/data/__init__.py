"""Data and models made on this machine, for tests, demos and benchmarks.

``synthetic`` speaks a corpus with eSpeak NG in LibriSpeech's layout;
``architectures`` builds wav2vec2 / HuBERT / WavLM models from their
configurations with random weights (hub weights cannot be downloaded here).
"""
