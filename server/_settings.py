"""Server settings (environment variables prefixed ``SPLITEXPORT_``, or CLI flags)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServerSettings(BaseSettings):
    """How ``splitexport serve`` runs."""

    model_config = SettingsConfigDict(env_prefix="SPLITEXPORT_")

    bundle: Path
    state_dir: Path = Path("splitexport-state")
    host: str = "127.0.0.1"
    port: int = 8000
    tokens: str = ""
    """Comma-separated bearer tokens (or use ``tokens_file``); with none, only loopback is allowed."""
    tokens_file: Path | None = None
    checkpoint_every: int | None = Field(None, ge=1)
    """Snapshot B and its optimizer every N applied steps (default 100; with a strategy 1). Without a
    strategy every step is also logged, so a crash loses no step whatever N is (docs/protocol.md)."""
    session_ttl_s: float = Field(3600.0, gt=0)
    lease_timeout_s: float = Field(30.0, gt=0)
    """How long one device may hold B between its forward and backward calls."""
    max_body_bytes: int = Field(16 * 1024 * 1024, gt=0)
    max_batch: int = Field(1024, ge=1)
    threads: int | None = Field(None, ge=1)
    """torch intra-op threads for B (default: torch's, one per core). On a machine shared with other
    processes, fewer threads avoid oversubscription (docs/benchmarks.md measured 16x slower B steps)."""

    # -- multi-client strategies (docs/protocol.md); strategy=None keeps per-device sequential B steps
    strategy: str | None = None
    """A strategy of :mod:`splitexport.strategies` (ssl, psl, sfl, sglr, adasplit, fedavg)."""
    num_clients: int | None = Field(None, ge=1)
    """C: how many clients train (required with a strategy); the first iteration waits for this many sessions."""
    round_timeout_s: float = Field(30.0, gt=0)
    """How long a barrier waits for the expected clients before it proceeds with the ones present."""
    alpha: float = 0.0
    phi: float = Field(0.0, ge=0, le=1)
    phase_rounds: int | None = None
    kappa: float = Field(0.5, ge=0, le=1)
    eta: float = Field(0.5, gt=0, le=1)
    lam: float = Field(1e-4, ge=0)
    gamma: float = Field(0.87, ge=0, le=1)
    total_rounds: int = Field(10, ge=1)
    strategy_seed: int = 0

    def token_set(self) -> set[str]:
        tokens = {t.strip() for t in self.tokens.split(",") if t.strip()}
        if self.tokens_file is not None:
            for line in self.tokens_file.read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    tokens.add(line)
        return tokens

    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False
