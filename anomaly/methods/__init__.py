"""The methods: the score formulas as pure functions, the tuned detector and its `detector.json`
schema, residual heatmaps."""
