"""Evaluation tools: compare finished runs and test WER differences.

``compare`` tabulates and plots runs of the recipe; ``significance`` holds
the matched-pair (MAPSSWE) and bootstrap tests it uses.
"""
