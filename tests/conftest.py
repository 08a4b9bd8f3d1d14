import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings

settings.register_profile(
    "convlower",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("thorough", parent=settings.get_profile("convlower"), max_examples=1000)
settings.register_profile(
    "sabotage",
    parent=settings.get_profile("convlower"),
    phases=[Phase.explicit, Phase.generate],  # a failure is the point: no shrinking, no replay
    database=None,  # keep the sabotaged run's failures out of the example database
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "convlower"))

SABOTAGE = Path(__file__).parent / "sabotage"
WRONG = pytest.StashKey[list]()
"""The variants --sabotage-variants made wrong, for the report header."""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--sabotage-variants",
        action="store_true",
        help="make every non-native convlower variant wrong (its output + 0.05), in this process and in the "
        "Python subprocesses tests start: the suite must then fail in every family's file and end to end",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Under --sabotage-variants: wrap the registry's variants before any test module is imported,
    and put tests/sabotage (its sitecustomize.py does the same) first on subprocesses' PYTHONPATH."""
    if not config.getoption("sabotage_variants"):
        return
    from tests.sabotage.wrong_variants import make_variants_wrong

    wrong = make_variants_wrong()
    if "HYPOTHESIS_PROFILE" not in os.environ:
        settings.load_profile("sabotage")
    config.stash[WRONG] = wrong
    os.environ["PYTHONPATH"] = os.pathsep.join([str(SABOTAGE), *filter(None, [os.environ.get("PYTHONPATH")])])


def pytest_unconfigure(config: pytest.Config) -> None:
    if config.stash.get(WRONG, None):
        rest = os.environ["PYTHONPATH"].split(os.pathsep)[1:]
        if rest:
            os.environ["PYTHONPATH"] = os.pathsep.join(rest)
        else:
            del os.environ["PYTHONPATH"]


def pytest_report_header(config: pytest.Config) -> str | None:
    wrong = config.stash.get(WRONG, None)
    return f"sabotage: {len(wrong)} variants made wrong (+0.05): {', '.join(wrong)}" if wrong else None
