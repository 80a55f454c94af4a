"""Resolve and load a Qwen3.5/3.6 checkpoint together with its MTP head.

mlx_lm loads the trunk but its sanitizer drops every `mtp.*` tensor, so the head is read separately with
safetensors from the model files (any known prefix) or a `mtp.safetensors` sidecar. Everything a user can get
wrong ends in one `UserError` line, never a traceback.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from safetensors import SafetensorError, safe_open

from ..errors import UserError
from .mtp import (EXPERT_PROJS, FUSED, MTP_NORM_SUFFIXES, PER_EXPERT, SWITCH, CompiledHead, HiddenVariant, MTPHead,
                  mtp_tensor_names)
from .trunk import Trunk

SUPPORTED_MODEL_TYPES = ("qwen3_5", "qwen3_5_moe")
SIDECAR = "mtp.safetensors"
INDEX = "model.safetensors.index.json"
MTP_KEY = re.compile(r"^(?P<prefix>(?:model\.)?(?:language_model\.)?mtp\.)(?P<name>.+)$")


@dataclass(frozen=True)
class MTPSource:
    """Where the head's tensors were found and how they were stored."""

    files: tuple[str, ...]
    prefix: str
    tensor_count: int  # dense tensors (quantized linears count once)
    norm_convention: str  # "offset" (raw HF, used as 1 + w) or "shifted" (already 1 + w)
    quantized: dict[str, dict[str, int]] = field(default_factory=dict)  # linear name -> bits, group_size
    expert_layout: str | None = None  # MoE heads: how the experts were stored (mtp.EXPERT_LAYOUTS); None: dense


@dataclass(frozen=True)
class Bundle:
    """Everything needed to decode from a checkpoint, with the facts a report must state about it."""

    name: str
    path: Path
    config: dict[str, Any]
    model: nn.Module
    tokenizer: Any
    trunk: Trunk
    mtp: MTPHead | None
    mtp_source: MTPSource | None
    fingerprint: str
    hidden_variant: HiddenVariant

    @property
    def text_config(self) -> dict[str, Any]:
        return text_config(self.config)

    @property
    def eos_ids(self) -> frozenset[int]:
        return frozenset(int(i) for i in self.tokenizer.eos_token_ids)

    @property
    def context_length(self) -> int:
        return context_length(self.config)

    def require_mtp(self) -> MTPHead:
        if self.mtp is None:
            raise UserError(no_mtp_message(self.name))
        return self.mtp

    def with_hidden_variant(self, variant: HiddenVariant | str) -> Bundle:
        """The same loaded weights feeding the head the other trunk hidden (a new trunk view, its own compiled
        traces); cheap, so the hidden variant is a per-cell convention rather than a model to load."""
        variant = HiddenVariant(variant)
        if variant is self.hidden_variant:
            return self
        return replace(self, trunk=Trunk(self.model, variant), hidden_variant=variant)

    @cached_property
    def draft_head(self) -> CompiledHead:
        """The MTP head as decoders run it: compiled once per bundle, so every decode reuses the traces."""
        return CompiledHead(self.require_mtp(), self.trunk.embed, self.trunk.lm_head)


def no_mtp_message(name: str) -> str:
    return (f"{name}: no MTP head (no mtp.* tensors in the weights and no {SIDECAR}); many community "
            f"conversions strip mtp.*: graft it back with `mtpbench graft TRUNK --mtp-from ORIGINAL OUT`")


def resolve(path_or_repo: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A local directory, or a hub repo id found in the local cache (`cache_dir` or the default one; never downloads)."""
    p = Path(path_or_repo).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UserError(f"{p}: not a directory (a checkpoint is a directory with config.json and *.safetensors)")
        return p.resolve()
    text = str(path_or_repo)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise UserError(f"{text}: no such directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, local_files_only=True, cache_dir=cache_dir))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        raise UserError(f"{text}: not a local directory and not in the local Hugging Face cache; fetch it first "
                        f"with `hf download {text}` (mtpbench never downloads)") from None


def _index_files(path: Path, index: Path) -> set[str]:
    """The shard files a `model.safetensors.index.json` names, each checked to be a file inside the checkpoint."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (ValueError, OSError, AttributeError) as e:
        raise UserError(f"{index}: unreadable index ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UserError(f"{index}: 'weight_map' must map tensor names to shard file names")
    root = path.resolve()
    for tensor, name in weight_map.items():
        if Path(name).is_absolute() or (path / name).resolve().parent != root:
            raise UserError(f"{index}: {tensor} -> {name!r} points outside the checkpoint directory; refused")
    return set(weight_map.values()) - {SIDECAR}


def weight_files(path: Path) -> list[Path]:
    """The weight files mlx_lm will load (every `*.safetensors` but the MTP sidecar), checked against the index:
    a shard it names that is missing is named, and a file it does not name (a stale shard set beside a new
    single file, or the reverse) is refused, since mlx_lm would load them all."""
    files = sorted(f for f in path.glob("*.safetensors") if f.name != SIDECAR)
    index = path / INDEX
    if index.exists():
        named = _index_files(path, index)
        missing = sorted(n for n in named if not (path / n).is_file())
        if missing:
            raise UserError(f"{path}: {len(missing)} shard file(s) named by {INDEX} missing: "
                            f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        stray = [f.name for f in files if f.name not in named]
        if stray:
            raise UserError(f"{path}: {', '.join(stray[:3])} not named by {INDEX} (which names "
                            f"{', '.join(sorted(named)[:3])}): stale weights from another save? remove one set")
    elif len(files) > 1 and (path / "model.safetensors").exists():
        others = ", ".join(f.name for f in files if f.name != "model.safetensors")
        raise UserError(f"{path}: model.safetensors beside other weight files ({others[:200]}) and no {INDEX}: "
                        f"stale weights from another save? remove one set")
    if not files:
        raise UserError(f"{path}: no *.safetensors weights found")
    return files


def read_config(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise UserError(f"{path}: no config.json (not a checkpoint directory)")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_file}: invalid JSON ({e.msg}, line {e.lineno})") from None
    model_type = config.get("model_type")
    if model_type == "qwen3_next":
        raise UserError(f"{path}: Qwen3-Next (qwen3_next) is not supported yet: its trunk is mlx_lm's qwen3_next, "
                        f"not the qwen3_5 trunk mtpbench's capture and compiled layers are built on")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"{path}: unsupported model_type {model_type!r}; mtpbench supports "
                        f"{', '.join(SUPPORTED_MODEL_TYPES)} (Qwen3.5/3.6 dense and MoE with native MTP)")
    check_moe_config(path, text_config(config))
    return config


def check_moe_config(path: Path, text: dict[str, Any]) -> None:
    """An MoE text config's expert counts and sizes, checked before mlx_lm builds anything from them."""
    experts = text.get("num_experts", 0) or 0
    if not experts:
        return
    per_token = text.get("num_experts_per_tok", 0) or 0
    for key, value in (("num_experts", experts), ("num_experts_per_tok", per_token),
                       ("moe_intermediate_size", text.get("moe_intermediate_size", 0) or 0),
                       ("shared_expert_intermediate_size", text.get("shared_expert_intermediate_size", 0) or 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{path}: MoE config {key} = {value!r}: expected a positive integer")
    if per_token > experts:
        raise UserError(f"{path}: MoE config routes {per_token} experts per token but declares only {experts}")


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's settings: `text_config` for Qwen3.5/3.6 checkpoints, the config itself for text-only ones."""
    return config.get("text_config", config)


def context_length(config: dict[str, Any]) -> int:
    """Positions the trunk supports (max_position_embeddings, under text_config for Qwen3.5/3.6)."""
    return int(text_config(config).get("max_position_embeddings", 32768))


def mtp_layer_count(config: dict[str, Any]) -> int:
    text = text_config(config)
    for key in ("mtp_num_hidden_layers", "num_nextn_predict_layers"):
        for scope in (text, config):
            if key in scope:
                return int(scope[key] or 0)
    return 0


def scan_headers(files: list[Path]) -> dict[str, Path]:
    """Map every tensor name to its file, validating each file's header and size on the way."""
    where: dict[str, Path] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="numpy") as st:
                for k in st.keys():
                    where[k] = f
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{f}: unreadable safetensors (truncated or corrupt: {e})") from None
    return where


def fingerprint(path: Path) -> str:
    """sha256 over config.json and each weight file's name, size, header and first/last MiB: fast on big checkpoints."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(size - (1 << 20))
                h.update(fh.read())
    return h.hexdigest()[:16]


def _load_trunk(path: Path):
    import mlx_lm

    try:
        return mlx_lm.load(str(path))
    except (ValueError, OSError, RuntimeError, KeyError) as e:
        raise UserError(f"{path}: the trunk does not load with mlx_lm ({_load_error(e)})") from None


def _load_error(e: Exception) -> str:
    """mlx's load error on one line, naming what it lists: "Missing 750 parameters: \\na,\\nb." becomes
    "Missing 750 parameters: a, b, c ... (747 more)" (its first line alone would name nothing)."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    if not lines:
        return type(e).__name__
    head, names = lines[0], [n.rstrip(",.") for n in lines[1:]]
    if not names:
        return head
    more = f" ... ({len(names) - 3} more)" if len(names) > 3 else ""
    return f"{head.rstrip(': ')}: {', '.join(names[:3])}{more}"


def _quant_params(name: str, weight_shape: tuple[int, ...], scales_shape: tuple[int, ...], in_dim: int) -> dict:
    bits = weight_shape[-1] * 32 // in_dim
    group = in_dim // scales_shape[-1]
    if bits not in (2, 3, 4, 5, 6, 8) or group <= 0:
        raise UserError(f"MTP tensor {name}: cannot infer quantization (weight {weight_shape}, scales {scales_shape})")
    return {"bits": int(bits), "group_size": int(group)}


def load_mtp_head(
    path: Path, config: dict[str, Any], model: nn.Module, where: dict[str, Path]
) -> tuple[MTPHead | None, MTPSource | None]:
    """Build the head from the tensors found in `where`; None when the checkpoint has none."""
    found: dict[str, tuple[str, Path]] = {}
    prefixes = set()
    for key, f in where.items():
        m = MTP_KEY.match(key)
        if m:
            found[m["name"]] = (key, f)
            prefixes.add(m["prefix"])
    n_layers = mtp_layer_count(config)
    if not found:
        return None, None
    if n_layers == 0:
        raise UserError(f"{path}: weights contain mtp.* tensors but the config declares no MTP layers "
                        f"(mtp_num_hidden_layers)")
    if len(prefixes) > 1:
        raise UserError(f"{path}: MTP tensors under several prefixes ({', '.join(sorted(prefixes))})")
    args = model.language_model.args
    head = MTPHead(args, num_layers=n_layers)
    expected = dict(tree_flatten(head.parameters()))
    names = mtp_tensor_names(n_layers, moe=args.num_experts > 0)

    tensors: dict[str, mx.array] = {}
    files: dict[Path, dict[str, mx.array]] = {}
    for name, (key, f) in found.items():
        if f not in files:  # mx.load reads bf16 (numpy, behind safetensors' mlx reader, cannot)
            files[f] = mx.load(str(f))
        tensors[name] = files[f][key]
    layout = stack_experts(path, tensors, n_layers, args.num_experts) if args.num_experts > 0 else None
    missing = [n for n in names if n not in tensors]
    if missing:
        raise UserError(f"{path}: MTP head incomplete, missing {len(missing)} tensor(s) e.g. mtp.{missing[0]}")
    quantized = {}
    for name in names:
        if name.endswith(".weight") and name[: -len(".weight")] + ".scales" in tensors:
            base = name[: -len(".weight")]
            in_dim = expected[name].shape[-1]
            quantized[base] = _quant_params(name, tensors[name].shape, tensors[base + ".scales"].shape, in_dim)
        elif tuple(tensors[name].shape) != tuple(expected[name].shape):
            raise UserError(f"{path}: MTP tensor mtp.{name} has shape {tuple(tensors[name].shape)}, the config "
                            f"implies {tuple(expected[name].shape)}")
    if quantized:
        nn.quantize(head, class_predicate=lambda p, m: quantized.get(p, False) if hasattr(m, "to_quantized") else False)

    norm_keys = [n for n in names if any(n.endswith(s) for s in MTP_NORM_SUFFIXES)]
    norm_mean = float(mx.mean(mx.concatenate([tensors[n].astype(mx.float32).reshape(-1) for n in norm_keys])))
    offset = abs(norm_mean) < 0.5  # offsets sit near 0, shifted weights near 1
    if offset:
        for n in norm_keys:
            tensors[n] = tensors[n] + 1.0
    head.load_weights(list(tensors.items()), strict=True)
    head.eval()
    mx.eval(head.parameters())
    source = MTPSource(
        files=tuple(sorted({f.name for _, f in found.values()})),
        prefix=prefixes.pop(),
        tensor_count=len(names),
        norm_convention="offset" if offset else "shifted",
        quantized=quantized,
        expert_layout=layout,
    )
    return head, source


def stack_experts(path: Path, tensors: dict[str, mx.array], n_layers: int, n_experts: int) -> str:
    """Bring an MoE head's experts into the switch layers the module holds (`mlp.switch_mlp.*`, experts stacked on
    the first axis), in place, from any known layout; returns the layout found. What cannot be read is one line."""
    layouts = set()
    for i in range(n_layers):
        p = f"layers.{i}.mlp."
        if any(n.startswith(p + "switch_mlp.") for n in tensors):
            layouts.add(SWITCH)
        elif (gate_up := _pop_any(tensors, p + "experts.gate_up_proj")) is not None:
            down = _pop_any(tensors, p + "experts.down_proj")
            if down is None:
                raise UserError(f"{path}: MTP experts fused as mtp.{p}experts.gate_up_proj but "
                                f"mtp.{p}experts.down_proj is missing")
            if gate_up.ndim != 3 or gate_up.shape[0] != n_experts or gate_up.shape[1] % 2:
                raise UserError(f"{path}: MTP tensor mtp.{p}experts.gate_up_proj has shape {tuple(gate_up.shape)}; "
                                f"expected ({n_experts} experts, 2 x expert size, hidden)")
            mid = gate_up.shape[1] // 2
            tensors[p + "switch_mlp.gate_proj.weight"] = gate_up[:, :mid, :]
            tensors[p + "switch_mlp.up_proj.weight"] = gate_up[:, mid:, :]
            tensors[p + "switch_mlp.down_proj.weight"] = down
            layouts.add(FUSED)
        elif any(n.startswith(p + "experts.") for n in tensors):
            _stack_per_expert(path, tensors, p, n_experts)
            layouts.add(PER_EXPERT)
        else:
            raise UserError(f"{path}: MTP head has no experts for mtp.{p[:-1]} (the config declares {n_experts}; "
                            f"expected mtp.{p}experts.* or mtp.{p}switch_mlp.*)")
    return layouts.pop() if len(layouts) == 1 else "mixed"


def _pop_any(tensors: dict[str, mx.array], name: str) -> mx.array | None:
    for key in (name, name + ".weight"):
        if key in tensors:
            return tensors.pop(key)
    return None


def _stack_per_expert(path: Path, tensors: dict[str, mx.array], p: str, n_experts: int) -> None:
    one = re.compile(re.escape(p) + r"experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|scales|biases)$")
    stray = next((n for n in tensors if n.startswith(p + "experts.") and not one.match(n)), None)
    if stray is not None:
        raise UserError(f"{path}: MTP experts in an unknown layout (mtp.{stray}); known: per-expert "
                        f"(experts.N.gate_proj/up_proj/down_proj), fused (experts.gate_up_proj + experts.down_proj), "
                        f"MLX switch layers (switch_mlp.*)")
    hits = [m for n in tensors if (m := one.match(n))]
    beyond = next((m.group(0) for m in hits if int(m[1]) >= n_experts), None)
    if beyond is not None:
        raise UserError(f"{path}: MTP tensor mtp.{beyond} is beyond the {n_experts} experts the config declares")
    for proj in EXPERT_PROJS:
        for suffix in sorted({m[3] for m in hits}):
            keys = [f"{p}experts.{e}.{proj}.{suffix}" for e in range(n_experts)]
            gone = next((k for k in keys if k not in tensors), None)
            if gone is not None:
                raise UserError(f"{path}: MTP expert missing: mtp.{gone} (the config declares {n_experts} experts)")
            shapes = {tuple(tensors[k].shape) for k in keys}
            if len(shapes) > 1:
                raise UserError(f"{path}: MTP experts mtp.{p}experts.*.{proj}.{suffix} differ in shape "
                                f"({', '.join(map(str, sorted(shapes)))})")
            tensors[f"{p}switch_mlp.{proj}.{suffix}"] = mx.stack([tensors.pop(k) for k in keys])


def preflight(path_or_repo: str | Path, require_mtp: bool = True, cache_dir: str | Path | None = None) -> Path:
    """Every check that needs no model in memory (path, config, readable weights, MTP present): fail before work."""
    path = resolve(path_or_repo, cache_dir)
    config = read_config(path)
    files = weight_files(path)
    sidecar = path / SIDECAR
    where = scan_headers(files + ([sidecar] if sidecar.exists() else []))
    if require_mtp and not any(MTP_KEY.match(k) for k in where):
        raise UserError(no_mtp_message(str(path_or_repo)))
    if require_mtp and mtp_layer_count(config) == 0:
        raise UserError(f"{path}: weights contain mtp.* tensors but the config declares no MTP layers "
                        f"(mtp_num_hidden_layers)")
    return path


def load(
    path_or_repo: str | Path,
    hidden_variant: HiddenVariant | str = HiddenVariant.POST_NORM,
    require_mtp: bool = False,
    cache_dir: str | Path | None = None,
) -> Bundle:
    """Load trunk (mlx_lm), MTP head (safetensors), tokenizer and config from a directory or cached repo id."""
    path = resolve(path_or_repo, cache_dir)
    config = read_config(path)
    files = weight_files(path)
    sidecar = path / SIDECAR
    where = scan_headers(files + ([sidecar] if sidecar.exists() else []))
    model, tokenizer = _load_trunk(path)
    head, source = load_mtp_head(path, config, model, where)
    name = str(path_or_repo) if not Path(str(path_or_repo)).exists() else path.name
    if require_mtp and head is None:
        raise UserError(no_mtp_message(name))
    variant = HiddenVariant(hidden_variant)
    return Bundle(
        name=name, path=path, config=config, model=model, tokenizer=tokenizer, trunk=Trunk(model, variant),
        mtp=head, mtp_source=source, fingerprint=fingerprint(path), hidden_variant=variant,
    )
