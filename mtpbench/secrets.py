"""Credentials never stored: the one place that knows what a secret looks like in a URL, in a command line and on
the wire, and replaces it before any text is stored or shown.

A user may put credentials in an endpoint URL (`http://user:KEY@host/v1`, `...?api_key=KEY`) or name a variable
holding a bearer key. Requests use them as given; everything written (the manifest's command, rows, reports,
logs, error messages) passes through `redact_urls` or `scrub`. A server may echo a credential back in any form the
client sent it in, so `encodings` lists every one: the literal text, its percent-encoded form, the base64 of a
Basic `user:password` header, and the bearer header.
"""

from __future__ import annotations

import base64
import re
import shlex
from collections.abc import Iterable, Sequence
from urllib.parse import quote, unquote

HIDDEN = "***"
# query parameters whose value is a credential: api_key, key, token, access_token, secret, password, auth, sig, ...
SECRET_PARAM = re.compile(r"key|token|secret|passw|auth|sig|credential|session", re.IGNORECASE)
_URL = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<rest>[^\s'\"<>]*)")
_QUERY_PAIR = re.compile(r"(?P<sep>[?&;])(?P<key>[^=&;#\s]+)=(?P<value>[^&;#\s]*)")
MIN_SECRET = 3  # shorter values are not scrubbed from text: they would hide ordinary words and digits


def _redact_one(scheme: str, rest: str) -> str:
    authority_end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    authority, tail = rest[:authority_end], rest[authority_end:]
    if "@" in authority:
        authority = f"{HIDDEN}@{authority.rsplit('@', 1)[1]}"
    tail = _QUERY_PAIR.sub(lambda m: f"{m['sep']}{m['key']}={HIDDEN}" if SECRET_PARAM.search(unquote(m["key"]))
                           else m[0], tail)
    return f"{scheme}{authority}{tail}"


def redact_urls(text: str) -> str:
    """`text` with the user info of every URL in it and the values of its secret-looking query parameters
    (api_key, key, token, secret, password, access_token, ...) replaced by ***."""
    return _URL.sub(lambda m: _redact_one(m["scheme"], m["rest"]), str(text))


def redact_command(argv: Sequence[str], program: str = "mtpbench") -> str:
    """A command line as it may be stored and shown (manifest `command`, the report's "Reproduce with"): every
    argument's URLs redacted, quoted so that it still pastes into a shell."""
    return " ".join([program, *(shlex.quote(redact_urls(a)) for a in argv)])


def encodings(secrets: Iterable[str], basic: Iterable[tuple[str, str]] = (), bearer: Iterable[str] = ()) -> list[str]:
    """Every form in which the client sends these credentials, longest first: each secret literally and
    percent-encoded; each Basic pair as `user:password`, its base64 (with and without padding) and its header;
    each bearer key's header. Values shorter than MIN_SECRET are left out."""
    found: set[str] = set()
    for s in secrets:
        found |= {s, quote(s, safe=""), quote(s)}
    for user, password in basic:
        pair = f"{user}:{password}"
        b64 = base64.b64encode(pair.encode()).decode()
        found |= {pair, b64, b64.rstrip("="), f"Basic {b64}", quote(pair, safe="")}
    for key in bearer:
        found |= {key, f"Bearer {key}", base64.b64encode(key.encode()).decode().rstrip("=")}
    return sorted((s for s in found if len(s) >= MIN_SECRET), key=len, reverse=True)


def scrub(text: str, forms: Sequence[str]) -> str:
    """`text` with every URL redacted and every form of a credential (see `encodings`) replaced by ***, and a text
    cut short in the middle of one (a body's head) ending in *** instead of the credential's beginning."""
    text = redact_urls(text)
    for s in forms:
        text = text.replace(s, HIDDEN)
    for s in forms:
        cut = next((k for k in range(len(s) - 1, MIN_SECRET - 1, -1) if text.endswith(s[:k])), 0)
        if cut:
            text = text[:-cut] + HIDDEN
    return text
