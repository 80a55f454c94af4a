"""One quantization path (mlx's own) for the policies of `policies.py`, and grafting an MTP head onto a trunk.

The quantizer is always `mlx.nn.quantize` (affine), fed a per-module plan; `quantize_checkpoint` writes the result
so that both `mlx_lm.load` and `mtpbench.load` read it, `apply_policy` keeps it in memory for sweeps. Both run
`_quantize_in_place`, so they cannot drift apart.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from ..model.checkpoint import (
    COMPAT_KEYS,
    MTP_KEY,
    SIDECAR,
    Bundle,
    MTPSource,
    check_compatible,
    load,
    load_head_only,
    read_config,
    read_head_config,
    resolve,
    scan_headers,
    text_config,
)
from ..model.describe import component
from ..atomic import write_json
from ..errors import UserError
from ..model.mtp import MTPHead
from ..model.trunk import Trunk
from .policies import (DEFAULT_GROUP_SIZE, KEEP_BITS, MODE, MTP_VARIANTS, UNQUANTIZED_HEAD, VALID_BITS,
                       VOCAB_COMPONENTS, Policy, get_policy)

MANIFEST = "quantization_manifest.json"
GRAFT_MANIFEST = "graft_manifest.json"
# Files a checkpoint needs besides weights and config: the tokenizer and its generation defaults.
TOKENIZER_GLOBS = ("tokenizer*", "vocab.*", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                   "chat_template*", "generation_config.json", "*.tiktoken")
# Files of ours that describe a previous build and would be stale in a new one.
_OWN_FILES = (MANIFEST, GRAFT_MANIFEST)


# ---------------------------------------------------------------------------------------------------------------
# Planning and quantizing (the one quantization path)


def component_of(path: str, mtp: bool) -> str:
    """The component a module path or tensor name belongs to, as `inspect` names it (MTP ones get `mtp.`)."""
    if not mtp:
        return component(path)
    return "mtp." + ("fc" if path.split(".")[0] == "fc" else component(path))


@dataclass(frozen=True)
class Plan:
    """Which modules to quantize with which parameters, and which a rule wanted but the group size forbids."""

    quantize: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()


def _check_options(group_size: int, lm_head_bits: int | None) -> None:
    if group_size not in (32, 64, 128):
        raise UserError(f"group size must be 32, 64 or 128 (mlx affine quantization), got {group_size}")
    if lm_head_bits is not None and lm_head_bits not in (*VALID_BITS, KEEP_BITS):
        raise UserError(f"lm-head bits must be one of {', '.join(map(str, VALID_BITS))} or {KEEP_BITS} "
                        f"(unquantized), got {lm_head_bits}")


def trunk_rules(policy: Policy, lm_head_bits: int | None) -> dict[str, int]:
    """The policy's trunk table with the embedding/lm_head override (both vocab matrices; tied ones are one)."""
    rules = dict(policy.trunk_rules)
    if lm_head_bits is not None:
        rules.update({c: lm_head_bits for c in VOCAB_COMPONENTS})
    return {c: b for c, b in rules.items() if b != KEEP_BITS}


def plan(module: nn.Module, rules: dict[str, int], group_size: int, mtp: bool) -> Plan:
    """Match every quantizable leaf against the rules; skip (and report) input dims the group size does not divide."""
    todo: dict[str, dict[str, Any]] = {}
    skipped: list[str] = []
    where = "mtp." if mtp else ""
    for path, m in module.named_modules():
        bits = rules.get(component_of(path, mtp).removeprefix("mtp."))
        if not bits:
            continue
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)):
            raise UserError(f"{where}{path} is already quantized (q{m.bits} g{m.group_size}); "
                            f"quantize from an unquantized checkpoint")
        if not hasattr(m, "to_quantized"):
            continue
        in_dim = m.weight.shape[-1]
        if in_dim % group_size:
            skipped.append(f"{where}{path} (input dim {in_dim} not divisible by {group_size})")
            continue
        todo[path] = {"group_size": group_size, "bits": bits, "mode": MODE}
    return Plan(todo, tuple(skipped))


def quantize_module(module: nn.Module, todo: Plan) -> None:
    """mlx's quantizer, driven by the plan (a copy of each dict: nn.quantize may pop keys from it)."""
    nn.quantize(module, class_predicate=lambda p, _m: dict(todo.quantize[p]) if p in todo.quantize else False)


def _quantize_in_place(
    model: nn.Module, head: MTPHead | None, policy: Policy, group_size: int, lm_head_bits: int | None
) -> tuple[Plan, Plan]:
    _check_options(group_size, lm_head_bits)
    trunk_plan = plan(model, trunk_rules(policy, lm_head_bits), group_size, mtp=False)
    head_plan = plan(head, dict(policy.mtp_rules), group_size, mtp=True) if head is not None else Plan()
    quantize_module(model, trunk_plan)
    if head is not None:
        quantize_module(head, head_plan)
    mx.eval(model.parameters(), head.parameters() if head is not None else [])
    return trunk_plan, head_plan


def quantized_modules(module: nn.Module, prefix: str = "") -> dict[str, dict[str, Any]]:
    """Module path -> {bits, group_size, mode} for every quantized leaf (whoever quantized it)."""
    return {prefix + p: {"group_size": m.group_size, "bits": m.bits, "mode": m.mode}
            for p, m in module.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}


def _head_quantization(head: MTPHead) -> dict[str, dict[str, int]]:
    """What MTPSource.quantized records: linear name -> bits, group_size."""
    return {p: {"bits": q["bits"], "group_size": q["group_size"]} for p, q in quantized_modules(head).items()}


def _shallow_copy(module: nn.Module | None) -> nn.Module | None:
    """A new module tree sharing the (immutable) arrays: quantizing it leaves the original untouched for free."""
    if module is None:
        return None
    return copy.deepcopy(module, memo={id(v): v for _, v in tree_flatten(module.parameters())})


def apply_policy(bundle: Bundle, policy: str | Policy, group_size: int = DEFAULT_GROUP_SIZE,
                 lm_head_bits: int | None = None) -> Bundle:
    """A new Bundle with trunk and head quantized in memory (the input bundle is untouched): a sweep axis.

    The name gets `@POLICY` and the fingerprint is derived from the source's and the options, so results of
    different policies never share a model key.
    """
    pol = get_policy(policy)
    model, head = _shallow_copy(bundle.model), _shallow_copy(bundle.mtp)
    _quantize_in_place(model, head, pol, group_size, lm_head_bits)
    source = bundle.mtp_source
    if source is not None and head is not None:
        source = replace(source, quantized=_head_quantization(head))
    tag = f"{pol.name} g{group_size}" + (f" lm{lm_head_bits}" if lm_head_bits else "")
    return replace(
        bundle, name=f"{bundle.name}@{pol.name}", model=model, trunk=Trunk(model, bundle.hidden_variant), mtp=head,
        mtp_source=source, fingerprint=hashlib.sha256(f"{bundle.fingerprint}:{tag}".encode()).hexdigest()[:16],
    )


# ---------------------------------------------------------------------------------------------------------------
# Manifests: every tensor, per-component totals (the "build stats" of the model cards)


def tensor_entries(params: dict[str, mx.array], quantized: dict[str, dict[str, Any]], mtp: bool) -> list[dict]:
    """One entry per tensor (names as written); quantized modules' tensors carry bits/group_size/mode."""
    entries = []
    for name, v in sorted(params.items()):
        module = name.rsplit(".", 1)[0]
        entry: dict[str, Any] = {"name": name, "component": component_of(module.removeprefix("mtp."), mtp),
                                 "shape": list(v.shape), "dtype": str(v.dtype).split(".")[-1], "bytes": int(v.nbytes)}
        entries.append({**entry, **quantized.get(module, {})})
    return entries


def totals(entries: list[dict], before: list[dict]) -> dict[str, dict[str, int]]:
    """Per component: tensor count and bytes now, and bytes before quantization."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "bytes": 0, "source_bytes": 0})
    for e in entries:
        out[e["component"]]["tensors"] += 1
        out[e["component"]]["bytes"] += e["bytes"]
    for e in before:
        out[e["component"]]["source_bytes"] += e["bytes"]
    return dict(sorted(out.items()))


def _mtp_params(head: MTPHead | None) -> dict[str, mx.array]:
    """The head's tensors under the `mtp.` prefix the loader expects (norms already shifted after loading)."""
    return {} if head is None else {f"mtp.{k}": v for k, v in tree_flatten(head.parameters())}


def _build_stats(entries: list[dict], before: list[dict], skipped: tuple[str, ...]) -> dict[str, Any]:
    quantized = {e["name"].rsplit(".", 1)[0]: {k: e[k] for k in ("bits", "group_size", "mode")}
                 for e in entries if "bits" in e}
    return {
        "source_tensor_count": len(before),
        "source_size_bytes": sum(e["bytes"] for e in before),
        "output_tensor_count": len(entries),
        "output_size_bytes": sum(e["bytes"] for e in entries),
        "quantized_linears": dict(sorted(quantized.items())),
        "skipped": list(skipped),
        "totals": totals(entries, before),
        "tensors": entries,
    }


def _head_entries(head: MTPHead | None) -> list[dict]:
    if head is None:
        return []
    return tensor_entries(_mtp_params(head), quantized_modules(head, "mtp."), mtp=True)


def model_entries(model: nn.Module, head: MTPHead | None) -> list[dict]:
    """Entries for trunk and head as they are now (called before and after quantizing)."""
    return tensor_entries(dict(tree_flatten(model.parameters())), quantized_modules(model), mtp=False) + \
        _head_entries(head)


# ---------------------------------------------------------------------------------------------------------------
# Writing checkpoints


def _check_out(out: Path, sources: tuple[Path, ...]) -> Path:
    """Refuse an output that is an input or holds files, before any work (the directory is made on write)."""
    out = Path(out).expanduser()
    if any(out.resolve() == s.resolve() for s in sources):
        raise UserError(f"{out}: the output directory must differ from the input checkpoint")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not an empty directory; choose a new output path")
    return out


def _copy_tokenizer(src: Path, out: Path) -> None:
    for pattern in TOKENIZER_GLOBS:
        for f in src.glob(pattern):
            if f.is_file():
                shutil.copy2(f, out / f.name)


def _save(path: Path, tensors: dict[str, mx.array]) -> None:
    mx.save_safetensors(str(path), tensors, metadata={"format": "mlx"})


def _write_weights(out: Path, weights: dict[str, mx.array]) -> None:
    """mlx_lm's sharding and file names (`model.safetensors` or `model-0000i-of-0000n.safetensors` + index)."""
    from mlx_lm.utils import make_shards

    shards = make_shards(weights)
    pattern = "model-{:05d}-of-{:05d}.safetensors" if len(shards) > 1 else "model.safetensors"
    weight_map = {}
    for i, shard in enumerate(shards):
        name = pattern.format(i + 1, len(shards))
        _save(out / name, shard)
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": int(sum(v.nbytes for v in weights.values()))},
             "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))


def quantization_block(model: nn.Module) -> dict[str, Any] | None:
    """mlx_lm's config block: global bits/group_size/mode plus every quantized module path as an override."""
    layers = quantized_modules(model)
    if not layers:
        return None
    (bits, group), _ = Counter((q["bits"], q["group_size"]) for q in layers.values()).most_common(1)[0]
    return {"group_size": group, "bits": bits, "mode": MODE, **dict(sorted(layers.items()))}


def _write_config(out: Path, config: dict[str, Any], model: nn.Module) -> None:
    """The source config with the quantization block replaced, written by mlx_lm's own save_config."""
    from mlx_lm.utils import save_config

    config = copy.deepcopy(config)
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    block = quantization_block(model)
    if block is not None:
        config["quantization"] = block  # save_config mirrors it into quantization_config, like mlx_lm convert
    save_config(config, config_path=out / "config.json")


def quantize_checkpoint(model: str | Path, out: Path, policy: str, group_size: int = DEFAULT_GROUP_SIZE,
                        lm_head_bits: int | None = None, mtp_layout: str = "inline") -> Path:
    """Load `model`, quantize trunk and head by `policy`, and write an MLX checkpoint directory at `out`."""
    if mtp_layout not in ("inline", "sidecar"):
        raise UserError(f"--mtp-layout must be inline or sidecar, got {mtp_layout!r}")
    pol = get_policy(policy)
    _check_options(group_size, lm_head_bits)
    src = resolve(model)
    out = _check_out(Path(out), (src,))
    bundle = load(src)
    before = model_entries(bundle.model, bundle.mtp)
    trunk_plan, head_plan = _quantize_in_place(bundle.model, bundle.mtp, pol, group_size, lm_head_bits)

    trunk = dict(tree_flatten(bundle.model.parameters()))
    head = _mtp_params(bundle.mtp)
    out.mkdir(parents=True, exist_ok=True)
    _write_weights(out, {**trunk, **head} if mtp_layout == "inline" else trunk)
    if head and mtp_layout == "sidecar":
        _save(out / SIDECAR, head)
    _write_config(out, bundle.config, bundle.model)
    _copy_tokenizer(bundle.path, out)

    entries = model_entries(bundle.model, bundle.mtp)
    manifest = {
        "kind": "quantize", "policy": pol.name, "description": pol.description, "mode": MODE,
        "group_size": group_size, "lm_head_bits": lm_head_bits, "mtp_layout": mtp_layout if head else None,
        "source": {"path": str(bundle.path), "fingerprint": bundle.fingerprint},
        **_build_stats(entries, before, trunk_plan.skipped + head_plan.skipped),
    }
    write_json(out / MANIFEST, manifest)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Grafting


def load_head(path: Path, config: dict[str, Any]) -> tuple[MTPHead, MTPSource]:
    """Only the MTP head of a checkpoint or standalone head repo (no trunk in memory)."""
    head, source, _ = load_head_only(path)
    return head, source


def _copy_without_mtp(src: Path, dst: Path) -> list[str]:
    """Copy a weight file, dropping any mtp.* tensors (a trunk's old head would clash with the new one).

    Returns the tensor names kept; an untouched file is copied byte for byte.
    """
    names = list(scan_headers([src]))
    keep = [k for k in names if not MTP_KEY.match(k)]
    if len(keep) == len(names):
        shutil.copy2(src, dst)
    elif keep:
        tensors, meta = mx.load(str(src), return_metadata=True)
        mx.save_safetensors(str(dst), {k: tensors[k] for k in keep}, metadata=meta)
    return keep


def _copy_trunk(src: Path, out: Path) -> None:
    """Every file of the trunk except its config, old head and our stale manifests; weights without mtp.*."""
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name in (SIDECAR, "config.json", *_OWN_FILES):
            continue
        if f.suffix == ".safetensors":
            _copy_without_mtp(f, out / f.name)
        elif f.name.endswith(".safetensors.index.json"):
            index = json.loads(f.read_text())
            index["weight_map"] = {k: v for k, v in index.get("weight_map", {}).items() if not MTP_KEY.match(k)}
            write_json(out / f.name, index)
        else:
            shutil.copy2(f, out / f.name)


def _with_mtp_layers(config: dict[str, Any], n: int) -> dict[str, Any]:
    config = copy.deepcopy(config)
    text_config(config)["mtp_num_hidden_layers"] = n
    return config


def graft(trunk_model: str | Path, mtp_from: str | Path, out: Path, mtp_policy: str | None = None) -> Path:
    """Write `out`: the trunk's files as they are, plus `mtp_from`'s head as a `mtp.safetensors` sidecar.

    The trunk is copied, not re-serialized (its layout, shards and quantization stay byte for byte); only an
    existing head is removed. `mtp_policy` (mtp-int4, mtp-q8) optionally quantizes the grafted head.
    """
    variant = mtp_policy or UNQUANTIZED_HEAD
    if variant not in MTP_VARIANTS:
        raise UserError(f"unknown MTP policy {mtp_policy!r}: use one of {', '.join(MTP_VARIANTS)}")
    trunk_path, head_path = resolve(trunk_model), resolve(mtp_from)
    out = _check_out(Path(out), (trunk_path, head_path))
    trunk_cfg, head_cfg = read_config(trunk_path), read_head_config(head_path)
    head, source = load_head(head_path, head_cfg)
    check_compatible(trunk_cfg, head_cfg, str(trunk_model), str(mtp_from))
    group_size = DEFAULT_GROUP_SIZE
    before = _head_entries(head)
    head_plan = plan(head, dict(MTP_VARIANTS[variant][1]), group_size, mtp=True)
    quantize_module(head, head_plan)
    mx.eval(head.parameters())

    out.mkdir(parents=True, exist_ok=True)
    _copy_trunk(trunk_path, out)
    params = _mtp_params(head)
    _save(out / SIDECAR, params)
    write_json(out / "config.json", _with_mtp_layers(trunk_cfg, len(head.layers)))
    manifest = {
        "kind": "graft", "mtp_policy": mtp_policy or "as-is", "mode": MODE, "group_size": group_size, "mtp_layout": "sidecar",
        "trunk": {"path": str(trunk_path), "config_keys_checked": list(COMPAT_KEYS)},
        "mtp_source": {"path": str(head_path), "prefix": source.prefix, "files": list(source.files),
                       "norm_convention": source.norm_convention},
        **_build_stats(_head_entries(head), before, head_plan.skipped),
    }
    write_json(out / GRAFT_MANIFEST, manifest)
    return out


# ---------------------------------------------------------------------------------------------------------------


def summary(out: Path) -> str:
    """One line from a written manifest: what was quantized, size before -> after."""
    from ..fmt import memory

    path = Path(out) / MANIFEST
    m = json.loads((path if path.exists() else Path(out) / GRAFT_MANIFEST).read_text())
    what = f"policy {m['policy']}" if m["kind"] == "quantize" else f"grafted MTP head ({m['mtp_policy']})"
    skipped = f", {len(m['skipped'])} skipped" if m["skipped"] else ""
    return (f"{what}: {len(m['quantized_linears'])} module(s) quantized{skipped}; {m['output_tensor_count']} "
            f"tensors, {memory(m['source_size_bytes'])} -> {memory(m['output_size_bytes'])}")
