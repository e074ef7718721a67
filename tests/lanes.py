"""The fast lane (`pytest -m "not slow"`, under 5 minutes on 2 cores) and the full suite (everything, under 25).

`fast_only(values, keep)` parametrises over every value for the full suite but keeps only `keep` in the fast lane:
the other values carry the `slow` mark."""

import pytest


def fast_only(values, keep):
    keep = set(keep)
    return [v if v in keep else pytest.param(v, marks=pytest.mark.slow) for v in values]
