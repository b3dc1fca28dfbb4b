"""The parts of benchmarks/stress.py, one concern each (the script is the entry point; see its docstring).

Not named `stress`: a package beside stress.py would shadow it on the script's sys.path.
"""
