"""Fixtures for the chart tests: a real helm binary (fetched once into .tools/) and rendered manifests."""

from __future__ import annotations

from typing import Any

import pytest
from helm_support import KUBE_VERSIONS, VALUES_SETS, Helm

from tests.helm.helm_tool import ensure_helm


@pytest.fixture(scope="session")
def helm() -> Helm:
    try:
        binary = ensure_helm()
    except Exception as e:  # noqa: BLE001 - report how the binary could not be obtained
        pytest.fail(f"could not obtain a helm binary via tests.helm.helm_tool: {e}")
    return Helm(binary)


@pytest.fixture(scope="session")
def rendered(helm: Helm) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """(values set, kube version) -> manifests, rendered once per session."""
    return {(name, kv): helm.render([path], kv) for name, path in VALUES_SETS.items() for kv in KUBE_VERSIONS}
