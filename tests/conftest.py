import os

import pytest

import helpers

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


@pytest.fixture(scope="session")
def free_port():
    return helpers.free_port


@pytest.fixture(scope="session")
def ray_local():
    """One in-process Ray on 127.0.0.1 for the whole session (pipeline stages reuse an initialised Ray)."""
    from pipeline.common import init_ray

    ray = init_ray(num_cpus=2)
    yield ray
    ray.shutdown()
