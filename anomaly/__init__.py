"""AnoStyle's anomaly detection, in rooms by stage: model/ (encoder, AnoModel, training the
encoder), methods/ (score formulas and the detector), scoring/ (score and tune over datasets),
evaluation/ (protocol, metrics, figures, baselines, report), app/ (serve); cli.py and adapt.py
on top. Imports run one way: evaluation <- methods <- model <- scoring <- adapt, cli."""
