"""`pytest -m "not slow"` is the fast tier: every oracle and the bad-input tables, without the
runs that train, the subprocesses, the real architectures and the Results command.
`pytest --device cuda` runs the tests that take the `device` fixture, and only those, on that
device (the sampler, the rollout, the importance ratio in half precision, gradient accumulation
and a short run on the GPU); without the option every test runs on the CPU.
`pytest -n 2 --dist loadgroup` (pytest-xdist) runs the suite on two workers of one thread each,
which on two cores finishes sooner than one process of two threads (a tiny-world iteration: 3.4 s
on one thread, 2.6 s on two); the numbers are the same at either thread count."""

import os

import pytest

if "PYTEST_XDIST_WORKER" in os.environ:  # before torch is imported; the runs it starts inherit it
    os.environ["OMP_NUM_THREADS"] = "1"
# Module fixtures too costly to build on each worker: the tests that take one run on one worker.
SHARED_FIXTURES = ("runs", "supervised_run", "sd15")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains, starts processes or builds real-size models "
                            "(the full suite only)")


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="device of the tests that take one (default "
                     "cpu); another device runs only those")


@pytest.fixture(scope="session")
def device(request):
    return request.config.getoption("--device")


@pytest.hookimpl(tryfirst=True)  # before xdist's worker reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        shared = [name for name in SHARED_FIXTURES if name in item.fixturenames]
        if shared:  # xdist schedules the largest group first
            item.add_marker(pytest.mark.xdist_group(shared[0]))
    if config.getoption("--device") != "cpu":
        skipped = [item for item in items if "device" not in item.fixturenames]
        config.hook.pytest_deselected(items=skipped)
        items[:] = [item for item in items if "device" in item.fixturenames]
