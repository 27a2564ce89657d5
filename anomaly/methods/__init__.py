"""The methods: every method name in one registry, the score formulas as pure functions, the
tuned detector and its `detector.json` schema, residual heatmaps."""
