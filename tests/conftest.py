import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "convlower",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("thorough", parent=settings.get_profile("convlower"), max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "convlower"))
