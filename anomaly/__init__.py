"""AnoStyle's anomaly detection: izif encoder, reconstruction, scores, evaluation and the CLI."""
