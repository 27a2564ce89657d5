"""Evaluation: the protocol, metrics, score sheets, baselines, figures, the summary, the HTML
report, the model card and the supervised reference. Imports nothing of the other rooms."""
