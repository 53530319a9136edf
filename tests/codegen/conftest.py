"""Kernels under test run in Triton's CPU interpreter, switched on per test by the `interpret` fixture.

Not process-wide: other test directories keep their own kernels. burstc.codegen.cache loads the
kernels in the interpreted mode whatever the import order, so this works even when triton was
imported earlier without TRITON_INTERPRET."""
import pytest


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
