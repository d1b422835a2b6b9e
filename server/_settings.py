"""Server settings (environment variables prefixed ``SPLITEXPORT_``, or CLI flags)."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, create_model, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from splitexport.strategies import StrategyConfig, hyperparameter_fields

MIN_TOKEN_LENGTH = 16
"""Bearer tokens shorter than this are refused at startup (``secrets.token_urlsafe(16)`` gives 22)."""


_ORIGIN = re.compile(r"https?://([A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?")


def _check_token(token: str, where: str) -> str:
    if len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(f"{where}: a token has {len(token)} characters; use at least {MIN_TOKEN_LENGTH} "
                         "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))')")
    bad = sorted({c for c in token if c.isspace() or c in "#,"})
    if bad:
        raise ValueError(f"{where}: a token contains {', '.join(map(repr, bad))}; tokens are one word without "
                         "'#' or ',' ('#' starts a comment only at the start of a line)")
    return token


def _strategy_settings() -> Any:
    """A settings base with one field per strategy hyperparameter, ``total_rounds`` and ``strategy_seed``,
    each with the default, bounds and description of its declaration (the strategy's ``Params`` or
    ``StrategyConfig``): one source for the settings, the CLI flags and the harness."""
    run = StrategyConfig.model_fields
    fields: dict[str, Any] = {h.name: (h.field.annotation, h.field) for h in hyperparameter_fields().values()}
    fields["total_rounds"] = (run["total_rounds"].annotation, run["total_rounds"])
    fields["strategy_seed"] = (run["seed"].annotation, run["seed"])
    return create_model("_StrategySettings", __base__=BaseSettings, **fields)


_StrategySettings = _strategy_settings()


class ServerSettings(_StrategySettings):  # type: ignore[misc,valid-type]
    """How ``splitexport serve`` runs."""

    model_config = SettingsConfigDict(env_prefix="SPLITEXPORT_")

    bundle: Path
    state_dir: Path = Path("splitexport-state")
    host: str = "127.0.0.1"
    port: int = 8000
    tokens: str = ""
    """Comma-separated bearer tokens (or use ``tokens_file``); with none, only loopback is allowed."""
    tokens_file: Path | None = None
    """One token per line; blank lines and lines starting with ``#`` are skipped (see :meth:`token_set`)."""
    sqlite_synchronous: Literal["full", "normal"] = "full"
    """``state.db``'s ``PRAGMA synchronous``: ``full`` fsyncs every step's commit; ``normal`` survives a killed
    process but may lose the last steps to a power loss or OS crash (docs/protocol.md, Durability)."""
    checkpoint_every: int | None = Field(None, ge=1)
    """Snapshot B and its optimizer every N applied steps (default 100; a strategy also at every round end).
    Every step is also logged, so a crash loses no step whatever N is (docs/protocol.md)."""
    max_sessions_per_token: int = Field(64, ge=1)
    """Open sessions one token may hold (a device needs one; close or let expire the others), else 429."""
    max_sessions: int = Field(10_000, ge=1)
    """Open sessions in total, over every token, else 429 ``too_many_sessions``."""
    bad_token_burst: int = Field(10, ge=1)
    """Wrong bearer tokens one client address may send at once before 429 ``too_many_attempts``."""
    bad_token_per_s: float = Field(1.0, gt=0)
    """How fast an address's allowance of wrong tokens refills (valid tokens are never limited)."""
    session_ttl_s: float = Field(3600.0, gt=0)
    lease_timeout_s: float = Field(30.0, gt=0)
    """How long one device may hold B between its forward and backward calls."""
    max_body_bytes: int = Field(16 * 1024 * 1024, gt=0)
    max_batch: int = Field(1024, ge=1)
    body_timeout_s: float = Field(30.0, gt=0)
    """A request body must arrive in full within this many seconds of the request's start (else 408)."""
    max_grad_norm: float | None = Field(None, gt=0)
    """Refuse (422 ``gradient_too_large``) a step whose gradient of B's parameters has a larger L2 norm; off by
    default. A step that would make a weight or optimizer state non-finite is always refused (``non_finite_update``)."""
    device: str = "cpu"
    """Where B and its optimizer live: ``cpu`` or ``cuda`` / ``cuda:N`` (docs/scaling.md)."""
    threads: int | None = Field(None, ge=1)
    """torch intra-op threads for B (default: torch's, one per core). On a machine shared with other
    processes, fewer threads avoid oversubscription (docs/benchmarks.md measured 16x slower B steps)."""

    # -- browsers (docs/browser.md)
    cors_origins: list[str] = Field(default_factory=list)
    """Origins (``scheme://host[:port]``) whose pages may call the API cross-origin; none by default."""
    cors_max_age_s: int = Field(600, ge=0)
    """How long a browser may cache a CORS preflight (``Access-Control-Max-Age``)."""
    app: bool = False
    """Serve the browser training page at ``/app/`` and the operator dashboard at ``/dashboard``."""

    # -- multi-client strategies (docs/protocol.md); strategy=None keeps per-device sequential B steps
    strategy: str | None = None
    """A strategy of :mod:`splitexport.strategies` (ssl, psl, sfl, sglr, adasplit, fedavg)."""
    num_clients: int | None = Field(None, ge=1)
    """C: how many clients train (required with a strategy); the first iteration waits for this many sessions."""
    round_timeout_s: float = Field(30.0, gt=0)
    """How long a barrier waits for the expected clients before it proceeds with the ones present."""
    # the strategies' hyperparameters, total_rounds and strategy_seed: generated (_StrategySettings)

    def strategy_config(self, client_lr: float) -> StrategyConfig:
        """The run config of the configured strategy (requires ``num_clients``)."""
        assert self.num_clients is not None
        return StrategyConfig(num_clients=self.num_clients, client_lr=client_lr, total_rounds=self.total_rounds,
                              seed=self.strategy_seed, **{k: getattr(self, k) for k in hyperparameter_fields()})

    @field_validator("device")
    @classmethod
    def _check_device(cls, device: str) -> str:
        if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", device):
            raise ValueError(f"device {device!r} is not cpu, cuda or cuda:N")
        return device

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if not _ORIGIN.fullmatch(origin):
                raise ValueError(f"CORS origin {origin!r} is not scheme://host[:port] (no path, no trailing '/', "
                                 "no wildcard)")
        return origins

    def token_set(self) -> set[str]:
        """The bearer tokens; ``ValueError`` (one line) for an unreadable file or a token that breaks the rules.

        A token has at least :data:`MIN_TOKEN_LENGTH` characters and no whitespace, ``,`` or ``#``; in the
        file, a ``#`` starts a comment only at the start of a line (a ``#`` inside a token is refused, not cut).
        """
        tokens = {_check_token(t.strip(), "SPLITEXPORT_TOKENS") for t in self.tokens.split(",") if t.strip()}
        if self.tokens_file is not None:
            try:
                text = self.tokens_file.read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"cannot read the tokens file {self.tokens_file}: "
                                 f"{getattr(exc, 'strerror', None) or exc}") from exc
            for number, line in enumerate(text.splitlines(), 1):
                line = line.strip()
                if line and not line.startswith("#"):
                    tokens.add(_check_token(line, f"{self.tokens_file} line {number}"))
        return tokens

    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False
