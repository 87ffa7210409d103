"""Golden files made by running the official MoCo v3 and DINO code (make_golden.py), read by tests/test_golden_*.py."""
