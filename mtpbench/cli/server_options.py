"""CLI helpers for measuring running servers: option values -> Endpoint objects (wired into `mtpbench sweep`).

Repeatable options pair by position with the `--endpoint`s: give none (defaults), one (applies to every
endpoint) or exactly one per endpoint. `--endpoint NAME=URL` names an endpoint's rows (the `backend` column);
without a name it is derived from host and port.
"""

from __future__ import annotations

from collections.abc import Sequence

import click

from ..backends.server import MODES, Endpoint
from ..errors import UserError


def parse_concurrency(text: str) -> tuple[int, ...]:
    """'1,4' -> (1, 4): simultaneous requests per level."""
    try:
        levels = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"--concurrency {text!r}: expected levels like 1 or 1,4") from None
    if not levels or any(c < 1 for c in levels):
        raise UserError(f"--concurrency {text!r}: levels must be integers >= 1")
    return levels


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


def endpoints_from_cli(urls: Sequence[str], served_models: Sequence[str] = (), api_key_env: str | None = None,
                       modes: Sequence[str] = (), concurrency: str = "1", request_timeout: float = 60.0,
                       retries: int = 0) -> list[Endpoint]:
    """Endpoint objects from the server options, validated (bad values raise UserError, shown as one line)."""
    if not urls:
        return []
    n = len(urls)
    levels = parse_concurrency(concurrency)
    models, kinds = _paired(served_models, n, "--served-model"), _paired(modes, n, "--endpoint-mode")
    endpoints = []
    for value, model, mode in zip(urls, models, kinds):
        name, url = split_endpoint(value)
        endpoints.append(Endpoint(url=url, name=name, served_model=model or None, api_key_env=api_key_env or None,
                                  mode=mode or "mtp", timeout_s=request_timeout, retries=retries,
                                  concurrency=levels))
    return endpoints


def server_options(fn):
    """The server options as click decorators, for `mtpbench sweep` (values go to endpoints_from_cli)."""
    for opt in reversed([
        click.option("--endpoint", "endpoints", multiple=True, metavar="[NAME=]URL",
                     help="Measure a running OpenAI-compatible server at this base URL (e.g. http://127.0.0.1:8000/v1) "
                          "instead of the reference decoder. Repeatable."),
        click.option("--served-model", "served_models", multiple=True, metavar="NAME",
                     help="Model name to request, per --endpoint by position (default: the first at /v1/models)."),
        click.option("--api-key-env", metavar="VAR", default=None,
                     help="Environment variable holding the API key (sent as a bearer token)."),
        click.option("--endpoint-mode", "endpoint_modes", multiple=True, type=click.Choice(MODES),
                     help="What each --endpoint runs: mtp (speculative) or ar; per endpoint by position [mtp]."),
        click.option("--concurrency", default="1", show_default=True, metavar="LEVELS",
                     help="Simultaneous requests per level, e.g. 1,4."),
        click.option("--request-timeout", type=float, default=60.0, show_default=True, metavar="S",
                     help="Longest silence allowed from a server (connect, or between two streamed chunks)."),
        click.option("--retries", type=int, default=0, show_default=True,
                     help="Retries of a request that failed before its first token (connect errors, HTTP 5xx/429)."),
    ]):
        fn = opt(fn)
    return fn
