import pytest


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch):
    """Unit tests never start Ray: any ray.init call fails loudly."""
    import ray

    def _refuse(*args, **kwargs):
        raise RuntimeError("unit tests must not start Ray (move the test to tests/integration)")

    monkeypatch.setattr(ray, "init", _refuse)
