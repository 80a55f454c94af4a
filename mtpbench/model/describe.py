"""What a checkpoint is, as `mtpbench inspect` and the model card show it."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from .checkpoint import Bundle

_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


_QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)


def _format(module: nn.Module) -> str:
    if isinstance(module, _QUANTIZED):
        mode = getattr(module, "mode", "affine")
        return f"{'q' + str(module.bits) if mode == 'affine' else mode} g{module.group_size}"
    w = getattr(module, "weight", None)
    return _DTYPE_NAMES.get(str(w.dtype).split(".")[-1], str(w.dtype)) if w is not None else "?"


def component(path: str) -> str:
    if "embed_tokens" in path:
        return "embedding"
    if "lm_head" in path:
        return "lm_head"
    if "linear_attn" in path:
        return "gated_deltanet"
    if "self_attn" in path:
        return "attention"
    if "switch_mlp" in path or ".experts." in path:
        return "experts"
    if "shared_expert_gate" in path or re.search(r"mlp\.gate(\.|$)", path):
        return "router"
    if "mlp" in path:
        return "mlp"
    return "norms"


def component_formats(module: nn.Module, prefix: str = "") -> dict[str, str]:
    """Component -> format(s), e.g. {'mlp': 'q4 g64', 'attention': 'bf16'}; mixed components list each."""
    seen: dict[str, set[str]] = defaultdict(set)
    for path, m in module.named_modules():
        if isinstance(m, (nn.Linear, nn.QuantizedLinear, nn.Embedding, nn.QuantizedEmbedding, nn.RMSNorm,
                          SwitchLinear, QuantizedSwitchLinear)):
            name = "fc" if path.endswith("fc") and prefix else component(path)
            seen[prefix + name].add(_format(m))
    return {k: ", ".join(sorted(v)) for k, v in sorted(seen.items())}


def logical_parameters(module: nn.Module) -> int:
    """Parameters as logical elements: a quantized layer's packed words unpacked (32 / bits values each), its
    scales and biases not counted (they are how the values are stored, not more of them)."""
    packed = {path: m.bits for path, m in module.named_modules() if isinstance(m, _QUANTIZED)}
    total = 0
    for key, v in tree_flatten(module.parameters()):
        owner, _, leaf = key.rpartition(".")
        if owner in packed and leaf in ("scales", "biases"):
            continue
        total += v.size * 32 // packed[owner] if owner in packed and leaf == "weight" else v.size
    return int(total)


def _expert_params(module: nn.Module) -> int:
    """Parameters of the routed experts (switch layers), as the config sizes them (quantization-independent)."""
    return int(sum(m.num_experts * m.input_dims * m.output_dims for _, m in module.named_modules()
                   if isinstance(m, (SwitchLinear, QuantizedSwitchLinear))))


def moe_facts(text: dict[str, Any], total: int, experts: int) -> dict[str, Any] | None:
    """Experts, experts per token, and the parameters one token activates (the routed experts' share of the
    expert parameters, everything else whole)."""
    n, k = int(text.get("num_experts", 0) or 0), int(text.get("num_experts_per_tok", 0) or 0)
    if not n:
        return None
    return {"experts": n, "experts_per_token": k, "expert_size": text.get("moe_intermediate_size"),
            "shared_expert_size": text.get("shared_expert_intermediate_size"), "total_parameters": total,
            "active_parameters": int(total - experts + experts * k // n)}


def describe(bundle: Bundle) -> dict[str, Any]:
    text = bundle.text_config
    layers = bundle.model.layers
    pattern = "".join("G" if layer.is_linear else "A" for layer in layers)
    params = logical_parameters(bundle.model)
    info: dict[str, Any] = {
        "name": bundle.name,
        "path": str(bundle.path),
        "architecture": bundle.config.get("architectures", [bundle.config.get("model_type")])[0],
        "model_type": bundle.config.get("model_type"),
        "layers": len(layers),
        "layer_pattern": pattern,
        "layer_pattern_legend": "G = Gated DeltaNet, A = gated full attention",
        "hidden_size": text.get("hidden_size"),
        "vocab_size": text.get("vocab_size"),
        "parameters": int(params),
        "formats": component_formats(bundle.model),
        "tokenizer": {
            "class": type(bundle.tokenizer._tokenizer).__name__,
            "vocab_size": len(bundle.tokenizer.vocab) if hasattr(bundle.tokenizer, "vocab") else None,
            "eos_ids": sorted(bundle.eos_ids),
            "chat_template": bool(getattr(bundle.tokenizer, "chat_template", None)),
        },
        "fingerprint": bundle.fingerprint,
        "moe": moe_facts(text, int(params), _expert_params(bundle.model)),
        "mtp": None,
        "declared_conventions": [{"name": d.name, "value": d.value, "source": d.source} for d in bundle.declared],
    }
    if bundle.mtp is not None and bundle.mtp_source is not None:
        src = bundle.mtp_source
        info["mtp"] = {
            "tensors": src.tensor_count,
            "prefix": src.prefix,
            "files": list(src.files),
            "norm_convention": src.norm_convention,
            "norm_families": {f: {"convention": d.convention, "reason": d.reason} for f, d in src.norms.items()},
            "layers": len(bundle.mtp.layers),
            "parameters": logical_parameters(bundle.mtp),
            "formats": component_formats(bundle.mtp, prefix="mtp."),
            "quantization": {name: dict(q) for name, q in sorted(src.quantized.items())},
            "hidden_variant": bundle.hidden_variant.value,
            "concat": bundle.concat,
            "expert_layout": src.expert_layout,
            "directory": src.directory,
            "dedicated_embeddings": src.dedicated,
        }
        head_params = info["mtp"]["parameters"]
        if (facts := moe_facts(text, head_params, _expert_params(bundle.mtp))) is not None:
            info["mtp"]["active_parameters"] = facts["active_parameters"]
    return info


def describe_text(info: dict[str, Any]) -> str:
    lines = [
        f"{info['name']}  ({info['architecture']}, fingerprint {info['fingerprint']})",
        f"  path:        {info['path']}",
        f"  layers:      {info['layers']}  pattern {info['layer_pattern']}  ({info['layer_pattern_legend']})",
        f"  size:        {info['parameters']:,} parameters, hidden {info['hidden_size']}, vocab {info['vocab_size']}",
        "  formats:     " + "; ".join(f"{k} {v}" for k, v in info["formats"].items()),
        *([f"  experts:     {moe['experts']} per layer, {moe['experts_per_token']} per token (expert size "
           f"{moe['expert_size']}, shared expert {moe['shared_expert_size']}); {moe['total_parameters']:,} "
           f"parameters in total, {moe['active_parameters']:,} active per token"] if (moe := info.get("moe")) else []),
        f"  tokenizer:   {info['tokenizer']['class']}, eos {info['tokenizer']['eos_ids']}, "
        f"chat template {'yes' if info['tokenizer']['chat_template'] else 'no'}",
    ]
    mtp = info["mtp"]
    if mtp is None:
        lines.append("  MTP head:    none (no mtp.* tensors)")
    else:
        lines += [
            f"  MTP head:    {mtp['tensors']} tensors {_stored_under(mtp['prefix'])} in {', '.join(mtp['files'])}; "
            f"{mtp['layers']} layer(s), {mtp['parameters']:,} parameters",
            *([f"               read from {mtp['directory']} (--mtp-from)"] if mtp.get("directory")
              and mtp["directory"] != info["path"] else []),
            f"               hidden fed {mtp['hidden_variant']}, input {mtp['concat']}"
            + ("; own embedding and lm head (mtp_use_dedicated_embeddings)" if mtp.get("dedicated_embeddings") else ""),
            "               norms: " + _norms_line(mtp["norm_families"]),
            *([f"               experts stored {mtp['expert_layout']}; {mtp['active_parameters']:,} parameters "
               f"active per token"] if mtp.get("expert_layout") else []),
            "               formats: " + "; ".join(f"{k} {v}" for k, v in mtp["formats"].items()),
            *(["               quantization read from: " + "; ".join(
                f"{src} ({len(mods)} module(s))" for src, mods in _by_source(mtp["quantization"]))]
              if mtp.get("quantization") else []),
        ]
    for i, d in enumerate(info.get("declared_conventions") or []):
        lines.append(("  declares:    " if i == 0 else "               ")
                     + f"{d['name'].replace('_', '-')} {d['value']} ({d['source']})")
    if info.get("declared_conventions"):
        lines.append("               (sweeps use the declared mtp-hidden, mtp-concat and mtp-chain unless told "
                     "otherwise; history stays committed, as `mtplx run` does)")
    return "\n".join(lines)


def _stored_under(prefix: str) -> str:
    return f"under '{prefix}'" if prefix else "at the root (a standalone head)"


def _norms_line(families: dict[str, dict[str, str]]) -> str:
    """'all 7 families shifted (why)', or each convention's families and the reasons (values: each family's mean)."""
    by_convention: dict[str, list[str]] = defaultdict(list)
    for f, d in families.items():
        by_convention[d["convention"]].append(f)
    what = "; ".join(f"{f'all {len(fs)} families' if len(by_convention) == 1 else ', '.join(fs)} {c}"
                     for c, fs in by_convention.items())
    reasons = {d["reason"] for d in families.values()}
    if len(reasons) == 1:
        why = reasons.pop()
    elif all(r.startswith("values: mean ") for r in reasons):
        why = "values: " + ", ".join(f"{f} {d['reason'][len('values: mean '):]}" for f, d in families.items())
    else:
        why = "; ".join(f"{f}: {d['reason']}" for f, d in families.items())
    return f"{what} ({why})"


def _by_source(quantization: dict[str, dict[str, Any]]) -> list[tuple[str, list[str]]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for name, q in quantization.items():
        groups[q.get("source", "?")].append(name)
    return sorted(groups.items())
