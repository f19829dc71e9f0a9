from __future__ import annotations

import shutil

import pytest

from tests.scaleout.redis_support import RedisServer


@pytest.fixture
def redis_server(tmp_path):
    if shutil.which("redis-server") is None and not __import__("os").path.exists("/usr/bin/redis-server"):
        pytest.fail("redis-server is not installed (dev.sh installs the Debian package)")
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()
