"""Shared fixtures: synthetic CRs, the real RG1 chest CR, a pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest

from cxrtriage.inference.phantom import Phantom, PhantomGenerator, write_cr

#: Seeds for tests; far from training (0..) and from the held-out evaluation set.
TEST_SEED = 2_000_000


@pytest.fixture(scope="session")
def phantom() -> Phantom:
    return PhantomGenerator(1024, 880)(TEST_SEED, affected_zones=(0, 1, 4))


@pytest.fixture(scope="session")
def phantom_cr(tmp_path_factory: pytest.TempPathFactory, phantom: Phantom) -> Path:
    return write_cr(phantom, tmp_path_factory.mktemp("cr") / "phantom.dcm")


@pytest.fixture(scope="session")
def rg1() -> Path:
    """The real adult PA chest CR shipped by pydicom-data (MONOCHROME1, 15-bit)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCR.dcm")
    if path is None:  # pragma: no cover - pydicom-data is a test dependency
        pytest.skip("pydicom-data is not installed: pip install -e '.[test]'")
    return Path(path)


@pytest.fixture(scope="session")
def rg1_j2k() -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("RG1_J2KR.dcm"))


@pytest.fixture(scope="session")
def pipeline():
    from cxrtriage.inference.pipeline import Pipeline

    return Pipeline()
