"""How published MTP heads are stored, read as their authors wrote them: which file holds the head, which norm
convention each norm family uses, and how each linear is quantized.

Sources (read for facts, cited where a rule comes from):
- MTPLX 2.12.2 `mtplx/artifacts.py::expected_mtp_file`: the sidecar is `config.mlx_lm_extra_tensors.mtp_file` when
  declared, else the first of `mtp.safetensors`, `mtp/weights.safetensors`, `model-mtp.safetensors`;
  `mtplx/mtp_patch.py::_mtp_norms_are_delta_encoded`: the config markers that say the head's norms are stored as
  offsets (`mtplx_mtp_norm_encoding`, `mtp_norm_encoding`, `mtplx_mtp_quantization.norm_encoding` /
  `norm_weight_encoding` = delta, delta_plus_one or mlx_delta); `mtplx/compressed_tensors.py`: the value
  thresholds (q/k norms below 1.25, the other norms below 0.5 when stored as offsets).
- The AirRunner mlx-lm fork (`feat/mtp-batched`, `mlx_lm/models/qwen3_5.py::sanitize`): a checkpoint is raw Hugging
  Face when a `conv1d.weight` is stored (C, 1, K) (last axis != 1); its norms, the MTP head's included, are shifted
  (+1) at conversion, so a converted one stores them shifted.
- mlx-vlm (`speculative/drafters/qwen3_5_mtp`): a standalone `model_type: qwen3_5_mtp` drafter stores the head's
  tensors at the root (no `mtp.` prefix) with norms shifted by its sanitize.
- mlx_lm 0.32 `utils.load_model` / `infer_quant_config`: `config.quantization` holds the default {group_size, bits,
  mode} and per-module overrides keyed by module path; the affine mode keeps float scales and biases, mxfp4 (4 bits,
  group 32), nvfp4 (4, 16) and mxfp8 (8, 32) keep uint8 scales and no biases.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from safetensors import safe_open

from ..errors import UserError

SIDECAR = "mtp.safetensors"
SIDECARS = (SIDECAR, "mtp/weights.safetensors", "model-mtp.safetensors")  # MTPLX's search order
HEAD_MODEL_TYPE = "qwen3_5_mtp"  # a standalone head repo (mlx-vlm's drafter split, MTP-only packs)
OFFSET, SHIFTED = "offset", "shifted"
_DELTA_MARKERS = ("delta", "delta_plus_one", "mlx_delta")
_QK_FAMILIES = ("q_norm", "k_norm")
_OFFSET_BELOW, _QK_SHIFTED_ABOVE = 0.5, 1.25
_FP_MODES = {(4, 16): "nvfp4", (4, 32): "mxfp4", (8, 32): "mxfp8"}


# ------------------------------------------------------------------------------------------------------ the sidecar


def declared_sidecar(path: Path, config: dict[str, Any]) -> str | None:
    """The sidecar a config names (`mlx_lm_extra_tensors.mtp_file`), checked to stay inside the checkpoint."""
    extra = config.get("mlx_lm_extra_tensors")
    name = extra.get("mtp_file") if isinstance(extra, dict) else None
    if not name:
        return None
    if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
        raise UserError(f"{path}: config.json mlx_lm_extra_tensors.mtp_file = {name!r}: expected a file inside the "
                        f"checkpoint directory")
    if not (path / name).is_file():
        raise UserError(f"{path}: config.json mlx_lm_extra_tensors.mtp_file names {name!r}, which is missing")
    return name


def sidecar(path: Path, config: dict[str, Any]) -> Path | None:
    """The MTP sidecar file, in MTPLX's order; None when the head (if any) is in the model files."""
    name = declared_sidecar(path, config)
    if name is not None:
        return path / name
    return next((path / rel for rel in SIDECARS if (path / rel).is_file()), None)


def sidecar_names(path: Path, config: dict[str, Any]) -> set[str]:
    """Top-level file names that hold an MTP head rather than trunk weights."""
    names = {rel for rel in SIDECARS if "/" not in rel}
    declared = declared_sidecar(path, config)
    return names | ({declared} if declared and "/" not in declared else set())


# ------------------------------------------------------------------------------------------ norm conventions per family


@dataclass(frozen=True)
class NormDecision:
    """How one norm family of the head is stored (`offset`: used as 1 + w; `shifted`: as is), and why."""

    convention: str
    reason: str


def norm_family(name: str) -> str:
    """'layers.0.self_attn.q_norm.weight' -> 'q_norm'; 'norm.weight' -> 'norm'."""
    return name.split(".")[-2]


def _marker(config: dict[str, Any]) -> str | None:
    """The config key and value that declare the head's norms stored as offsets (MTPLX's markers), or None."""
    candidates = [(k, config.get(k)) for k in ("mtplx_mtp_norm_encoding", "mtp_norm_encoding")]
    quant = config.get("mtplx_mtp_quantization")
    if isinstance(quant, dict):
        candidates += [(f"mtplx_mtp_quantization.{k}", quant.get(k)) for k in ("norm_encoding", "norm_weight_encoding")]
    for key, value in candidates:
        if value is not None and str(value).strip().lower() in _DELTA_MARKERS:
            return f"config.json {key} = {value}"
    return None


def conv1d_layout(files: list[Path], where: dict[str, Path]) -> str | None:
    """'hf' when the weights store a GatedDeltaNet conv1d as (C, 1, K) (raw Hugging Face), 'mlx' for (C, K, 1)."""
    key = next((k for k in where if k.endswith("conv1d.weight") and where[k] in files), None)
    if key is None:
        return None
    with safe_open(str(where[key]), framework="numpy") as st:
        shape = st.get_slice(key).get_shape()
    return "mlx" if shape[-1] == 1 else "hf"


def decide_norms(tensors: dict[str, mx.array], norm_keys: list[str], config: dict[str, Any], structure: str | None
                 ) -> dict[str, NormDecision]:
    """Family -> decision. Structure first (the config's own marker, a standalone drafter, the conv1d layout of the
    files the head sits in: see `structural`), each family's values only where nothing structural says: offsets
    sit near 0, shifted weights near 1; q/k norms between 0.5 and 1.25 are ambiguous (MTPLX's two thresholds) and
    follow the head's other norms."""
    families = sorted({norm_family(n) for n in norm_keys})
    marker = _marker(config)
    if marker is not None:
        return {f: NormDecision(OFFSET, marker) for f in families}
    if structure is not None:
        convention, reason = structure.split(":", 1)
        return {f: NormDecision(convention, reason) for f in families}
    means = {f: float(mx.mean(mx.concatenate([tensors[n].astype(mx.float32).reshape(-1) for n in norm_keys
                                                if norm_family(n) == f]))) for f in families}
    out: dict[str, NormDecision] = {}
    for f in families:
        if f not in _QK_FAMILIES:
            out[f] = NormDecision(OFFSET if abs(means[f]) < _OFFSET_BELOW else SHIFTED,
                                  f"values: mean {means[f]:.2f}")
    layer_votes = [d.convention for d in out.values()]
    for f in families:
        if f in _QK_FAMILIES:
            m = means[f]
            if abs(m) < _OFFSET_BELOW or m > _QK_SHIFTED_ABOVE:
                out[f] = NormDecision(OFFSET if abs(m) < _OFFSET_BELOW else SHIFTED, f"values: mean {m:.2f}")
            else:  # q/k norms of either convention can sit between 0.5 and 1.25 (MTPLX's two thresholds)
                vote = max(set(layer_votes), key=layer_votes.count) if layer_votes else SHIFTED
                out[f] = NormDecision(vote, f"values: mean {m:.2f} (ambiguous: as the other norms)")
    return out


def structural(config: dict[str, Any], standalone: bool, inline: bool, trunk_conv: str | None) -> str | None:
    """'convention:reason' from how the head is stored, or None when only its values can tell."""
    if standalone:
        return f"{SHIFTED}:model_type {HEAD_MODEL_TYPE} drafter (stored shifted by its converter's sanitize)"
    if inline and trunk_conv == "hf":
        return f"{OFFSET}:in raw Hugging Face files (conv1d stored (C, 1, K))"
    if inline and trunk_conv == "mlx":
        return f"{SHIFTED}:in converted MLX files (conv1d stored (C, K, 1): shifted at conversion)"
    return None


def summary(decisions: dict[str, NormDecision]) -> str:
    kinds = {d.convention for d in decisions.values()}
    return kinds.pop() if len(kinds) == 1 else "mixed"


# ----------------------------------------------------------------------------------------- quantization per module


def _quant_blocks(config: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    text = config.get("text_config", config)
    owners = ((config, ""),) + (((text, "text_config."),) if text is not config else ())
    return [(f"config.json {label}{key}", owner[key]) for owner, label in owners
            for key in ("quantization", "quantization_config", "mtplx_mtp_quantization")
            if isinstance(owner.get(key), dict)]


def _override(blocks: list[tuple[str, dict[str, Any]]], base: str, prefix: str, specs: dict[str, Any]
              ) -> tuple[str, Any] | None:
    """A per-module quantization entry for the head's linear `base` under any of the paths converters write."""
    paths = dict.fromkeys([prefix + base, *(p + base for p in ("mtp.", "model.mtp.", "language_model.mtp.",
                                                                "language_model.model.mtp.",
                                                                "model.language_model.mtp.")), base])
    for label, block in blocks:
        for container, where in ((block, label), (block.get("modules"), f"{label}.modules")):
            if isinstance(container, dict):
                for p in paths:
                    if p in container and (isinstance(container[p], dict) or container[p] is False):
                        return f"{where}[{p!r}]", container[p]
    if base in specs:
        return f"mtplx_runtime.json mtp_contract.mtp_prequantized_module_specs[{base!r}]", specs[base]
    return None


def stored_quantization(name: str, tensors: dict[str, mx.array], in_dim: int) -> dict[str, Any]:
    """What the stored tensors say: bits and group size from the shapes, the mode from the scales' dtype."""
    w, scales = tensors[name + ".weight"], tensors[name + ".scales"]
    bits, group = w.shape[-1] * 32 // in_dim, in_dim // max(scales.shape[-1], 1)
    if scales.dtype == mx.uint8:
        mode = _FP_MODES.get((bits, group))
        if mode is None or name + ".biases" in tensors:
            raise UserError(f"MTP tensor mtp.{name}: uint8 scales with {bits} bits in groups of {group} fit no mlx "
                            f"quantization mode (mxfp4 4/32, nvfp4 4/16, mxfp8 8/32)")
    else:
        mode = "affine"
        if bits not in (1, 2, 3, 4, 5, 6, 8) or group <= 0 or name + ".biases" not in tensors:
            raise UserError(f"MTP tensor mtp.{name}: cannot infer quantization (weight {tuple(w.shape)}, scales "
                            f"{tuple(scales.shape)}{'' if name + '.biases' in tensors else ', no biases'})")
    return {"bits": int(bits), "group_size": int(group), "mode": mode}


def module_quantization(name: str, tensors: dict[str, mx.array], in_dim: int, config: dict[str, Any], prefix: str,
                        specs: dict[str, Any]) -> dict[str, Any]:
    """{bits, group_size, mode, source} of one quantized linear of the head: the per-module entry its config
    declares (checked against the tensors, refused in one line when it does not fit them), else the config's
    default when it fits the tensors, else what the tensors say (as mlx_lm does for paths its map does not name)."""
    stored = stored_quantization(name, tensors, in_dim)
    blocks = _quant_blocks(config)
    found = _override(blocks, name, prefix, specs)
    if found is not None:
        where, entry = found
        if entry is False:
            raise UserError(f"{where} = false (unquantized) but mtp.{name} is stored quantized ({stored['bits']} "
                            f"bits, group {stored['group_size']}, {stored['mode']})")
        declared = {"bits": entry.get("bits"), "group_size": entry.get("group_size"),
                    "mode": entry.get("mode", "affine")}
        if declared != {k: stored[k] for k in declared}:
            raise UserError(f"{where} = {declared} does not fit mtp.{name} as stored ({stored['bits']} bits, group "
                            f"{stored['group_size']}, {stored['mode']})")
        return {**stored, "source": where}
    for label, block in blocks:
        default = {"bits": block.get("bits"), "group_size": block.get("group_size"),
                   "mode": block.get("mode", "affine")}
        if default == {k: stored[k] for k in default}:
            return {**stored, "source": label}
    return {**stored, "source": "the stored shapes and scales"}


def upcast_note() -> str:
    return ("note: mlx runs unquantized MoE experts (GatherMM) only in float32 on the CPU: the experts' weights are "
            "upcast to float32 and their outputs cast back")
