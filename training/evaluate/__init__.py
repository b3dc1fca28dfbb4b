"""`doc2atom eval`: every method on the same base model and held-out documents, scored side by side."""
