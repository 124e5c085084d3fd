"""`parity selftest`: plant realistic V4 bugs into the optimized side and check the verdict catches and localizes
each one, and that clean runs raise no alarm. See `bugs.py` for the library and `run.py` for the procedure."""
