"""The test suite (see conftest.py for its layout)."""
