"""Routing questions to atoms, measured offline: routing examples, self-contained routing text, evaluation."""
