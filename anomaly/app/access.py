"""Who may use `anostyle serve` and for how long: the login token, the Host names, a trusted
proxy, the time and memory limits (`AccessOptions`). No web package is imported here, so that
`anostyle serve --help` can show these defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from stylegan.errors import UserError

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")
MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class AccessOptions:
    """How `anostyle serve` faces the network: login, Host names, proxy, time and memory."""

    token: str | None = None  # None: ANOSTYLE_TOKEN, else no login (loopback or no_auth only)
    no_auth: bool = False  # serve off loopback without a login, explicitly
    allowed_hosts: tuple[str, ...] = ()  # () : loopback names, or this machine's names
    proxy: str | None = None  # address(es) of a reverse proxy whose X-Forwarded-* are trusted
    header_timeout: float = 10.0  # s to send the request line and headers
    request_timeout: float = 60.0  # s for the body, decoding and scoring of one request
    max_decoded_mb: float = 256.0  # decoded image bytes per request

    def resolve(self, host: str, *, environ=os.environ) -> "AccessOptions":
        """The token from ANOSTYLE_TOKEN when not given; refuses an exposed server without one
        and short tokens, each with one sentence."""
        token = self.token if self.token is not None else (environ.get("ANOSTYLE_TOKEN") or None)
        if token is not None and len(token) < MIN_TOKEN_CHARS:
            raise UserError(f"the token has {len(token)} characters; use at least "
                            f"{MIN_TOKEN_CHARS}, e.g. from: python -c \"import secrets; "
                            f"print(secrets.token_urlsafe())\".")
        if token is not None and self.no_auth:
            raise UserError("--no-auth and a token (--token or ANOSTYLE_TOKEN) contradict each "
                            "other; give one of them.")
        if host not in LOOPBACK_NAMES and token is None and not self.no_auth:
            raise UserError(f"--host {host} exposes the page to other machines, so it needs a "
                            f"login: give --token (or set ANOSTYLE_TOKEN), or pass --no-auth to "
                            f"serve without one.")
        for name, value in (("--header-timeout", self.header_timeout),
                            ("--request-timeout", self.request_timeout),
                            ("--max-decoded-mb", self.max_decoded_mb)):
            if not 0 < value < 1e6:
                raise UserError(f"{name} {value} is out of range; give a positive number.")
        return AccessOptions(token, self.no_auth, self.allowed_hosts, self.proxy,
                             self.header_timeout, self.request_timeout, self.max_decoded_mb)
