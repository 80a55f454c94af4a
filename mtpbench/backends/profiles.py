"""Which sampling profile (`sampling.PROFILE_TABLE`) a server uses, as the audit must assume it.

`auto` reads what the server says about itself, most specific first: llama.cpp's `/props` (its
`default_generation_settings` carry the sampler order the server was started with, `--samplers`), then the
`Server` header and `owned_by` at /v1/models (`llamacpp` for llama-server, `vllm`, `sglang`, ...; absent for
mlx_lm.server). The profile chosen and the evidence are recorded with every audit, so a wrong guess reads as a
profile mismatch, never as a sampler bug.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from ..sampling import LLAMA_CPP, MLX, PROFILES, TEMPER_FIRST, VLLM, chain_name, profile_of
from ..sweep.endpoint import Endpoint

PROPS_BYTES = 1 << 20
LLAMA_NAMES = ("llamacpp", "llama.cpp", "llama-cpp", "llama_cpp")


def get_json(client: httpx.Client, endpoint: Endpoint, path: str, root: bool = True,
             limit: int = PROPS_BYTES) -> tuple[Any, dict[str, str]]:
    """(parsed JSON body or None, response headers) of a bounded GET; never raises (a missing page is None)."""
    try:
        with client.stream("GET", endpoint.request_url(path, root=root),
                           timeout=min(endpoint.timeout_s, 10.0)) as resp:
            headers = {k.lower(): v for k, v in resp.headers.items()}
            if resp.status_code != 200:
                return None, headers
            data = b""
            for chunk in resp.iter_bytes():
                data += chunk
                if len(data) > limit:
                    return None, headers
        return json.loads(data), headers
    except (httpx.HTTPError, httpx.StreamError, ValueError):
        return None, {}


def reported_samplers(props: Any) -> list[str] | None:
    """The sampler order a llama.cpp `/props` answer reports (`default_generation_settings.params.samplers`, or
    `.samplers` in older builds); None when it reports none (not llama.cpp, or an old build)."""
    if not isinstance(props, dict) or not isinstance(props.get("default_generation_settings"), dict):
        return None
    gen = props["default_generation_settings"]
    for where in (gen.get("params"), gen):
        if isinstance(where, dict) and isinstance(where.get("samplers"), list):
            return [str(s) for s in where["samplers"]]
    return None


def detect_profile(requested: str, entries: list[dict[str, Any]] | None, error: str = "", props: Any = None,
                   headers: dict[str, str] | None = None) -> tuple[str, str]:
    """(profile, how it was chosen); profile '' when auto cannot decide (the runs are then left unaudited)."""
    if requested != "auto":
        return requested, "given with --audit-profile"
    samplers = reported_samplers(props)
    if samplers is not None:
        name = chain_name(samplers)
        return name, f"auto: /props reports llama.cpp's sampler order {'>'.join(samplers)} ({profile_of(name).source})"
    server = (headers or {}).get("server", "")
    if any(n in server.lower() for n in LLAMA_NAMES):
        return LLAMA_CPP, f"auto: Server header {server!r} (llama.cpp's default order; /props unread)"
    if not entries:
        return "", f"auto could not read /models ({error}); pass --audit-profile, one of {', '.join(PROFILES)}"
    owner = str(entries[0].get("owned_by") or "")
    if any(n in owner.lower() for n in LLAMA_NAMES):
        return LLAMA_CPP, f"auto: /models owned_by {owner!r} (llama.cpp's default order; /props unread)"
    if not owner or "mlx" in owner.lower():
        return MLX, f"auto: /models owned_by {owner or 'absent'} (mlx_lm.server and its forks)"
    if "vllm" in owner.lower():
        return VLLM, f"auto: /models owned_by {owner!r} (vLLM: temperature, min-p, then top-p over what top-k left)"
    return TEMPER_FIRST, f"auto: /models owned_by {owner!r} (SGLang-style: temperature first, top-p on the whole " \
                         f"distribution)"


def server_props(client: httpx.Client, endpoint: Endpoint) -> tuple[Any, dict[str, str]]:
    """llama.cpp's /props (None elsewhere) and the headers of that answer (a `Server` name where one is sent)."""
    return get_json(client, endpoint, "props")
