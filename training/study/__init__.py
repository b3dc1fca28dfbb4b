"""Self-study: study questions, prefix-shared batched generation, and joint fitting of a document's atoms."""
