"""The store of created voices: one folder every Triton pod mounts (a ReadWriteMany volume next to the model
repository), written by the `voice` model, read by every vocoder instance on a cache miss.

Layout: `<id>.npz` (prompt_codes int64 [P], prompt_mel float32 [80, rP], xvector float32 [192]) and `<id>.json`
(the record: name, description, owner key id, duration, creation time, sha256 of the conditioning). Both are
written to a temporary name and renamed, the npz first, so a reader sees a whole voice or none; deleting removes
the json first, so a half-deleted voice is already unknown. Voice ids are random and never reused, so a cached
conditioning can never go stale: the vocoder only has to check that the record still exists (one stat).
Why a folder and not the conditioning in-band or in Redis: docs/contracts.md ("Created voices").
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from moss_speech.contract.voices import CREATED_PREFIX, is_created

STORE_ENV = "MOSS_SPEECH_VOICE_STORE"  # overrides the default folder (a mounted volume in Kubernetes)


def default_store_dir(repository: Path) -> Path:
    """`$MOSS_SPEECH_VOICE_STORE`, else `<repository>.voices` beside the model repository (Triton would try to
    load a folder inside it as a model)."""
    env = os.environ.get(STORE_ENV)
    return Path(env) if env else repository.parent / f"{repository.name}.voices"


@dataclass(frozen=True)
class VoiceRecord:
    voice_id: str
    name: str
    description: str
    owner: str  # API key id of the creator ("" where the service has no keys)
    duration_seconds: float
    created_unix: float
    digest: str  # sha256 of the npz bytes: the cache key of the conditioning
    prompt_tokens: int


def new_voice_id() -> str:
    return CREATED_PREFIX + secrets.token_hex(12)


def conditioning_bytes(codes: np.ndarray, mel: np.ndarray, xvector: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(
        buf,
        prompt_codes=np.asarray(codes, np.int64),
        prompt_mel=np.asarray(mel, np.float32),
        xvector=np.asarray(xvector, np.float32),
    )
    return buf.getvalue()


class VoiceStore:
    def __init__(self, directory: Path | str):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _paths(self, voice_id: str) -> tuple[Path, Path]:
        if not is_created(voice_id):  # also keeps ids from naming paths outside the folder
            raise KeyError(voice_id)
        return self.dir / f"{voice_id}.npz", self.dir / f"{voice_id}.json"

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def save(
        self,
        voice_id: str,
        name: str,
        description: str,
        owner: str,
        duration_seconds: float,
        codes: np.ndarray,
        mel: np.ndarray,
        xvector: np.ndarray,
    ) -> VoiceRecord:
        npz, meta = self._paths(voice_id)
        data = conditioning_bytes(codes, mel, xvector)
        record = VoiceRecord(
            voice_id,
            name,
            description,
            owner,
            round(float(duration_seconds), 3),
            time.time(),
            hashlib.sha256(data).hexdigest(),
            int(len(codes)),
        )
        self._write(npz, data)
        self._write(meta, json.dumps(asdict(record)).encode())
        return record

    def exists(self, voice_id: str) -> bool:
        """One stat (the vocoder asks once per window)."""
        return is_created(voice_id) and os.path.isfile(f"{self.dir}/{voice_id}.json")

    def record(self, voice_id: str) -> VoiceRecord:
        """Raises KeyError for an unknown (or deleted) voice."""
        try:
            return VoiceRecord(**json.loads(self._paths(voice_id)[1].read_text()))
        except FileNotFoundError:
            raise KeyError(voice_id) from None

    def conditioning(self, voice_id: str) -> tuple[VoiceRecord, dict[str, np.ndarray]]:
        record = self.record(voice_id)
        data = self._paths(voice_id)[0].read_bytes()
        if hashlib.sha256(data).hexdigest() != record.digest:
            raise ValueError(f"voice {voice_id}: stored conditioning differs from its record (sha256)")
        with np.load(io.BytesIO(data)) as f:
            return record, {k: f[k] for k in ("prompt_codes", "prompt_mel", "xvector")}

    def records(self, owner: str | None = None) -> list[VoiceRecord]:
        """Every voice (of `owner` when given), oldest first."""
        out = []
        for path in self.dir.glob(f"{CREATED_PREFIX}*.json"):
            try:
                record = self.record(path.stem)
            except (KeyError, ValueError):  # deleted meanwhile, or not ours
                continue
            if owner is None or record.owner == owner:
                out.append(record)
        return sorted(out, key=lambda r: (r.created_unix, r.voice_id))

    def delete(self, voice_id: str) -> None:
        npz, meta = self._paths(voice_id)
        meta.unlink()  # FileNotFoundError -> the caller's NOT_FOUND
        npz.unlink(missing_ok=True)
