"""Training data: QA sources, question-to-atom labels, probes, splits, teacher targets."""
