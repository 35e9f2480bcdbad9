"""Evaluation: compare runs, test WER differences, finish a run.

``compare`` tabulates and plots runs of the recipe; ``significance`` holds
the matched-pair (MAPSSWE) and bootstrap tests it uses; ``summary`` ends a
run (prune, export, evaluate the export, write the summary).
"""
