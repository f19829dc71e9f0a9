"""The browser page in real headless Chromium (Debian's package) with a fake microphone fed from a WAV made here:
it connects, the spoken question ends on server VAD, the answer arrives and plays. Driven over the Chrome DevTools
protocol; writes a screenshot (set MOSS_REALTIME_SCREENSHOT to keep it, e.g. docs/realtime-page.png)."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.request
import wave
from pathlib import Path

import numpy as np
import pytest

from moss_speech.model_repository.launcher import free_port

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def write_wav(path: Path, pcm: np.ndarray, rate: int = 48000) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.astype("<i2").tobytes())


class CDP:
    def __init__(self, ws) -> None:
        self.ws, self.ids = ws, itertools.count(1)

    async def call(self, method: str, **params):
        i = next(self.ids)
        await self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads(await asyncio.wait_for(self.ws.recv(), 60))
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(msg["error"])
                return msg["result"]

    async def eval(self, expr: str):
        r = await self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        return r["result"].get("value")


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install chromium)")
def test_page_talks_and_plays_the_answer(realtime_stack, tmp_path):
    from websockets.asyncio.client import connect

    from tests.realtime.conftest import speak

    question = speak("What is the tallest mountain in the world?", rate=48000)
    silence = np.zeros(48000, np.int16)
    wav = tmp_path / "mic.wav"
    write_wav(wav, np.concatenate([silence, question, silence, silence, silence]))  # Chromium loops it
    port = free_port()
    proc = subprocess.Popen(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--remote-debugging-port={port}",
            "--use-fake-device-for-media-stream",
            "--use-fake-ui-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}",
            "--autoplay-policy=no-user-gesture-required",
            "--window-size=900,1000",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2).read())
                page = next(t for t in targets if t["type"] == "page")
                break
            except (OSError, StopIteration):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

        async def main():
            async with connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
                cdp = CDP(ws)
                await cdp.call("Page.enable")
                await cdp.call("Page.navigate", url=f"http://127.0.0.1:{realtime_stack.port}/?autostart=1")
                state = {}
                end = time.monotonic() + 120
                while time.monotonic() < end:
                    state = await cdp.eval("JSON.stringify(window.state || {})")
                    state = json.loads(state or "{}")
                    if state.get("answers", 0) >= 1 and state.get("playedSamples", 0) > 24000:
                        break
                    await asyncio.sleep(0.5)
                await asyncio.sleep(0.5)
                shot = await cdp.call("Page.captureScreenshot", format="png")
                return state, base64.b64decode(shot["data"])

        state, png = asyncio.run(main())
    finally:
        proc.terminate()
        proc.wait(20)
    (tmp_path / "page.png").write_bytes(png)
    if os.environ.get("MOSS_REALTIME_SCREENSHOT"):
        Path(os.environ["MOSS_REALTIME_SCREENSHOT"]).write_bytes(png)
    assert state.get("connected"), state
    ev = state["events"]
    assert ev.get("session.created") == 1 and ev.get("input_audio_buffer.speech_started", 0) >= 1, state
    assert ev.get("input_audio_buffer.speech_stopped", 0) >= 1 and ev.get("response.output_audio.delta", 0) >= 1
    assert state["answers"] >= 1 and state["ttfaMs"] is not None and state["ttfaMs"] > 0
    assert state["playedSamples"] > 24000  # more than a second of the answer went through the playback worklet
    assert not state["errors"], state
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
