"""Voice calls go through the service's TritonPool, so `triton_url` may be a comma list or a dns:/// name."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from moss_speech.services.triton_pool import TritonPool
from moss_speech.services.voices import VoiceClient, VoiceError


@pytest.mark.parametrize("url", ["127.0.0.1:9,127.0.0.1:11", "dns:///localhost:9"])
def test_voice_client_uses_pool_endpoints(url) -> None:
    async def run():
        pool = TritonPool(url, "s2s")
        voices = VoiceClient(pool)
        client = await voices._client()
        assert client is voices._clients[pool.pick()] and set(voices._clients) <= set(pool.endpoints)
        # Nothing listens there: a clean UNAVAILABLE, not an exception from a malformed target.
        with pytest.raises(VoiceError) as err:
            await voices.call("list", {"owner": "k"}, timeout=2.0)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        await voices.close()
        await pool.close()

    asyncio.run(run())
