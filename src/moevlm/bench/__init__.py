"""``moevlm bench``: speed on the machine it runs on (``scenarios.py``), measured with ``harness.py``."""
