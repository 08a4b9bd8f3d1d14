"""Test tooling for `pytest --sabotage-variants` (see tests/conftest.py): make every non-native variant wrong."""
