"""The amortized compile mode's own code: the trained memory compiler, its training and its checkpoints."""
