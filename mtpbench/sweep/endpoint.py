"""A server to measure: its OpenAI base URL, how it is addressed, and what of it may be stored.

A user may put credentials in the URL (`http://user:KEY@host/v1`, `...?api_key=KEY`). Requests use them as given,
but nothing stored (manifest, rows, reports, logs, error messages) ever carries them: `url` is the redacted form,
and `redact` scrubs any text a server sends back. Keys given with `--api-key-env` are read from the environment
at request time and never stored either.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from ..errors import UserError

MODES = ("mtp", "ar")
AUDIT_PROFILES = ("auto", "mlx", "temper-first")  # auto: detected from /models (see backends.audit)
SCHEMES = {"http": 80, "https": 443}
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
SECRET_PARAM = re.compile(r"key|token|secret|passw|auth|sig|credential|session", re.IGNORECASE)
HIDDEN = "***"
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]*@")


def _redacted(url: httpx.URL) -> str:
    netloc = url.host if url.port is None else f"{url.host}:{url.port}"
    if ":" in url.host:  # IPv6
        netloc = f"[{url.host}]" + (f":{url.port}" if url.port is not None else "")
    if url.userinfo:
        netloc = f"{HIDDEN}@{netloc}"
    query = [(k, HIDDEN if SECRET_PARAM.search(k) else v) for k, v in url.params.multi_items()]
    text = f"{url.scheme}://{netloc}{url.path.rstrip('/')}"
    return text + ("?" + "&".join(f"{k}={v}" for k, v in query) if query else "")


@dataclass(frozen=True)
class Endpoint:
    """One server. `address` is what the user gave (kept in memory only); `url` is its redacted, storable form.

    `mode` is the user's label ("mtp" when the server runs speculative decoding, "ar" when not): mtpbench cannot
    see inside the server. `timeout_s` is the longest silence allowed (connect, or between two stream chunks),
    `deadline_s` the longest whole request (0: derived from the request's max tokens).
    """

    address: str = field(repr=False)
    name: str = ""
    served_model: str | None = None
    api_key_env: str | None = None
    mode: str = "mtp"
    timeout_s: float = 60.0
    deadline_s: float = 0.0
    retries: int = 0
    concurrency: tuple[int, ...] = (1,)
    audit_model: str | None = None  # a local checkpoint of the weights the server serves (the user asserts it)
    audit_profile: str = "auto"  # the sampling transform's order the server uses: auto | mlx | temper-first

    def __post_init__(self) -> None:
        try:
            u = httpx.URL(self.address)
        except (httpx.InvalidURL, TypeError) as e:
            raise UserError(f"endpoint {redact(str(self.address))!r}: not a URL ({redact(str(e))})") from None
        if u.scheme not in SCHEMES or not u.host:
            raise UserError(f"endpoint {_redacted(u) if u.host else redact(self.address)!r}: expected an http(s) "
                            f"base URL like http://127.0.0.1:8080/v1")
        if not self.name:
            label = f"{u.host}-{u.port or SCHEMES[u.scheme]}"
            object.__setattr__(self, "name", "".join(ch if ch in NAME_CHARS else "_" for ch in label))
        if not set(self.name) <= NAME_CHARS:
            raise UserError(f"endpoint name {self.name!r}: use letters, digits, '.', '_' and '-' only")
        if self.mode not in MODES:
            raise UserError(f"endpoint mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not self.timeout_s > 0:
            raise UserError(f"request timeout must be > 0 s, got {self.timeout_s}")
        if self.deadline_s < 0:
            raise UserError(f"request deadline must be >= 0 s (0: derived from max tokens), got {self.deadline_s}")
        if self.retries < 0:
            raise UserError(f"retries must be >= 0, got {self.retries}")
        if self.audit_profile not in AUDIT_PROFILES:
            raise UserError(f"audit profile must be one of {', '.join(AUDIT_PROFILES)}, got {self.audit_profile!r}")
        if not self.concurrency or any(int(c) != c or c < 1 for c in self.concurrency):
            raise UserError(f"concurrency levels must be integers >= 1, got {self.concurrency}")
        object.__setattr__(self, "concurrency", tuple(sorted({int(c) for c in self.concurrency})))

    @property
    def _parsed(self) -> httpx.URL:
        return httpx.URL(self.address)

    @property
    def url(self) -> str:
        """The base URL as it may be stored and shown: credentials in the user info and secret-looking query
        parameters replaced by ***."""
        return _redacted(self._parsed)

    def request_url(self, path: str, root: bool = False) -> httpx.URL:
        """The URL of `path` under the base URL (or under the server root, for /metrics), keeping the base's
        query string: `http://h/v1?api_key=K` + `chat/completions` -> `http://h/v1/chat/completions?api_key=K`."""
        u = self._parsed
        base = u.path.rstrip("/")
        if root:
            base = base.removesuffix("/v1")
        return u.copy_with(path=f"{base}/{path.lstrip('/')}")

    def secrets(self) -> list[str]:
        """Every credential this endpoint carries, so that text from the server can be scrubbed of it."""
        u = self._parsed
        found = [u.password, u.username] if u.userinfo else []
        found += [v for k, v in u.params.multi_items() if SECRET_PARAM.search(k)]
        if self.api_key_env and os.environ.get(self.api_key_env):
            found.append(os.environ[self.api_key_env])
        return [s for s in found if s and len(s) >= 3]

    def scrub(self, text: str) -> str:
        """`text` with this endpoint's credentials and any user info of any URL in it replaced by ***."""
        text = redact(text)
        for s in sorted(self.secrets(), key=len, reverse=True):
            text = text.replace(s, HIDDEN)
        return text

    def headers(self) -> dict[str, str]:
        """The bearer header, read from the named variable only when one is named (keys never land in results)."""
        if not self.api_key_env:
            return {}
        key = os.environ.get(self.api_key_env)
        if not key:
            raise UserError(f"endpoint {self.name}: environment variable {self.api_key_env} (API key) is not set")
        return {"Authorization": f"Bearer {key}"}

    def record(self) -> dict[str, Any]:
        """What decides which rows this endpoint produces (timeouts, retries and keys do not), as stored."""
        audit = {"audit_model": self.audit_model, "audit_profile": self.audit_profile} if self.audit_model else {}
        return {"url": self.url, "mode": self.mode, "concurrency": list(self.concurrency), **audit}


def redact(text: str) -> str:
    """User info of any URL in `text` (scheme://user:pass@) replaced by ***."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{HIDDEN}@", str(text))


def split_endpoint(value: str) -> tuple[str, str]:
    """'vllm-mtp=http://h:8000/v1' -> ('vllm-mtp', url); a bare URL -> ('', url)."""
    name, sep, url = value.partition("=")
    if sep and "://" not in name:
        return name.strip(), url.strip()
    return "", value.strip()


def _paired(values: Sequence[str], n: int, flag: str) -> list[str | None]:
    """One value per endpoint: none given -> None each; one -> that for all; else exactly n, in order."""
    if not values:
        return [None] * n
    if len(values) == 1:
        return [values[0]] * n
    if len(values) != n:
        raise UserError(f"{flag} given {len(values)} times for {n} endpoints: give it once (for all) or once per "
                        f"--endpoint, in the same order")
    return list(values)


def endpoints_from_options(urls: Sequence[str], served_models: Sequence[str] = (), api_key_env: str | None = None,
                           modes: Sequence[str] = (), concurrency: Sequence[int] = (1,), request_timeout: float = 60.0,
                           request_deadline: float = 0.0, retries: int = 0, audit_model: str | None = None,
                           audit_profiles: Sequence[str] = ()) -> tuple[Endpoint, ...]:
    """Endpoint objects from the sweep's server options, validated; the names must be distinct."""
    n = len(urls)
    models, kinds = _paired(served_models, n, "--served-model"), _paired(modes, n, "--endpoint-mode")
    profiles = _paired(audit_profiles, n, "--audit-profile")
    if audit_profiles and not audit_model:
        raise UserError("--audit-profile needs --audit-model (the local checkpoint the audit rescored with)")
    endpoints = []
    for value, model, mode, profile in zip(urls, models, kinds, profiles):
        name, url = split_endpoint(value)
        endpoints.append(Endpoint(address=url, name=name, served_model=model or None,
                                  api_key_env=api_key_env or None, mode=mode or "mtp", timeout_s=request_timeout,
                                  deadline_s=request_deadline, retries=retries, concurrency=tuple(concurrency),
                                  audit_model=audit_model or None, audit_profile=profile or "auto"))
    names = [e.name for e in endpoints]
    dup = next((x for x in names if names.count(x) > 1), None)
    if dup:
        raise UserError(f"two endpoints are named {dup!r}; name them (NAME=URL) so their rows stay apart")
    for e in endpoints:
        e.headers()  # a missing API key variable is reported before any work
    return tuple(endpoints)
