"""pytest plugins of the test suite, registered in tests/conftest.py: every test may ask for their fixtures by name."""
