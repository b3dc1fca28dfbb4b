"""Atomizers: documents -> typed knowledge atoms (vllm_doc2atom.bank_interface.AtomRecord) with verified char spans."""
