"""Offline side of vllm-doc2atom: model preparation, atomization, training and compilation (CLI `doc2atom`)."""
