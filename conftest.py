"""`pytest -m "not slow"` is the fast tier: every oracle and the bad-input tables, without the
runs that train, the subprocesses, the real architectures and the Results command.
`pytest --device cuda` runs the tests that take the `device` fixture, and only those, on that
device (the sampler, the rollout, the importance ratio in half precision, gradient accumulation
and a short run on the GPU); without the option every test runs on the CPU."""

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains, starts processes or builds real-size models "
                            "(the full suite only)")


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="device of the tests that take one (default "
                     "cpu); another device runs only those")


@pytest.fixture(scope="session")
def device(request):
    return request.config.getoption("--device")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--device") != "cpu":
        skipped = [item for item in items if "device" not in item.fixturenames]
        config.hook.pytest_deselected(items=skipped)
        items[:] = [item for item in items if "device" in item.fixturenames]
