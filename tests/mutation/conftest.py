"""Keeps pytest out of tests/mutation: run.py and mutants.py are a script and its data, not tests."""

collect_ignore_glob = ["*.py"]
