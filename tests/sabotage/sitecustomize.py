"""Makes every non-native convlower variant wrong in each Python process started with this folder
on PYTHONPATH: tests/conftest.py puts it there under `pytest --sabotage-variants`, so that the
`python -m convlower` subprocesses of the demo and CLI tests run sabotaged too."""

from wrong_variants import make_variants_wrong

make_variants_wrong()
