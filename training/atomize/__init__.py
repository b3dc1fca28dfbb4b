"""Atomizers: documents -> typed knowledge atoms (vllm_doc2atom.bank.AtomRecord) with verified char spans."""
