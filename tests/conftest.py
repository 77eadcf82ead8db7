import os

# Several host devices so sharding code runs on CPU; must be set before JAX initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402
import pytest  # noqa: E402

import jaxq  # noqa: E402,F401  (enables x64)

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run tests marked slow (full statistical checks)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _mapped_regions() -> int:
    try:
        with open("/proc/self/maps") as fh:
            return sum(1 for _ in fh)
    except OSError:
        return -1


def _drop_programs():
    from jaxq.sim.batch import clear_programs

    clear_programs()
    jax.clear_caches()


# Mappings after which a test drops every compiled program (the kernel's default limit is 65,530).
_MAPPINGS_HIGH = 45_000


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs(request):
    """Drop every compiled program after each test module. A serial run of the whole suite otherwise
    keeps hundreds of XLA:CPU executables alive in one process, each with its own memory mappings, and
    XLA aborts (or segfaults in its compiler) once the process nears the kernel's vm.max_map_count
    (never in a module run alone). ``JAXQ_TEST_MAPS=FILE`` appends each module's mapping count before
    and after, for diagnosis."""
    yield
    before = _mapped_regions()
    _drop_programs()
    log = os.environ.get("JAXQ_TEST_MAPS")
    if log:
        with open(log, "a") as fh:
            fh.write(f"{request.module.__name__} {before} {_mapped_regions()}\n")


@pytest.fixture(autouse=True)
def _bound_mappings():
    """A module that compiles many programs (every engine x every policy) drops them part-way, when
    the process holds more than _MAPPINGS_HIGH mappings."""
    yield
    if _mapped_regions() > _MAPPINGS_HIGH:
        _drop_programs()
