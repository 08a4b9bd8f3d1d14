"""The model zoo: torch modules with factories returning (module, example_inputs)."""
