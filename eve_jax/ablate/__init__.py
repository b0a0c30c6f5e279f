"""The paper's ablations, reproduced at small scale: `python -m eve_jax.ablate`.

tables.py (rows as config overrides, the paper's numbers), schedule.py (the
small recipe and each stage's command), runner.py (resumable runs),
report.py (markdown + JSON with the paper's directions judged).
"""
