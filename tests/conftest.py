"""Shared fixtures."""

import pytest

from tiny_project import write_tiny_project


@pytest.fixture
def tiny_project(tmp_path):
    return write_tiny_project(tmp_path / "proj")
