"""Resolve and load a Qwen3.5/3.6 checkpoint together with its MTP head.

mlx_lm loads the trunk but its sanitizer drops every `mtp.*` tensor, so the head is read separately with
safetensors from the model files (any known prefix), a sidecar (MTPLX's search order, `model.formats`), or another
directory (`mtp_from`: a checkpoint or a standalone `qwen3_5_mtp` head repo, checked for compatibility like
`graft`). What the authors declare around the weights (MTPLX's contract, the config's quantization, norm markers)
is read as they meant it. Everything a user can get wrong ends in one `UserError` line, never a traceback.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import SwitchLinear
from safetensors import SafetensorError, safe_open

from ..errors import UserError
from . import conventions, formats
from .formats import HEAD_MODEL_TYPE, SIDECAR, NormDecision  # noqa: F401  (SIDECAR: re-exported)
from .mtp import (EXPERT_PROJS, FUSED, MTP_NORM_SUFFIXES, PER_EXPERT, SWITCH, CompiledHead, HiddenVariant, MTPHead,
                  mtp_tensor_names)
from .trunk import Trunk

SUPPORTED_MODEL_TYPES = ("qwen3_5", "qwen3_5_moe")
INDEX = "model.safetensors.index.json"
MTP_KEY = re.compile(r"^(?P<prefix>(?:model\.)?(?:language_model\.)?(?:model\.)?mtp\.)(?P<name>.+)$")
# The config keys a head must share with the trunk it drafts for (its experts are built from the trunk's config,
# so an MoE head's shape must match too): `graft` and `mtp_from` check them alike.
COMPAT_KEYS = ("hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads", "head_dim",
               "num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size")


@dataclass(frozen=True)
class MTPSource:
    """Where the head's tensors were found and how they were stored."""

    files: tuple[str, ...]
    prefix: str
    tensor_count: int  # tensors as stored (a quantized linear's weight, scales and biases count three)
    norm_convention: str  # "offset" (raw HF, used as 1 + w), "shifted" (already 1 + w), or "mixed" (per family)
    quantized: dict[str, dict[str, Any]] = field(default_factory=dict)  # linear -> bits, group_size, mode, source
    expert_layout: str | None = None  # MoE heads: how the experts were stored (mtp.EXPERT_LAYOUTS); None: dense
    norms: dict[str, NormDecision] = field(default_factory=dict)  # norm family -> its convention and why
    directory: str = ""  # where the head was read (another directory under `mtp_from`)
    dedicated: bool = False  # the head has its own embedding table and lm head


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
    # what the checkpoint (or the head's directory) declares in MTPLX's contract files, with where each was read
    declared: tuple[conventions.Declared, ...] = ()

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

    @property
    def concat(self) -> str:
        """The order the head's input halves are concatenated in (conventions.CONCATS)."""
        return self.mtp.concat if self.mtp is not None else conventions.EMBEDDING_HIDDEN

    def with_hidden_variant(self, variant: HiddenVariant | str) -> Bundle:
        """The same loaded weights feeding the head the other trunk hidden (a new trunk view, its own compiled
        traces); cheap, so the hidden variant is a per-cell convention rather than a model to load."""
        variant = HiddenVariant(variant)
        if variant is self.hidden_variant:
            return self
        return replace(self, trunk=Trunk(self.model, variant), hidden_variant=variant)

    def with_conventions(self, hidden: HiddenVariant | str | None = None, concat: str | None = None) -> Bundle:
        """The same weights under other head-input conventions (trunk hidden fed, concat order): views, no copy."""
        b = self.with_hidden_variant(hidden) if hidden else self
        if concat and self.mtp is not None and concat != b.concat:
            b = replace(b, mtp=b.mtp.with_concat(conventions.concat(concat, "concat")))
        return b

    @cached_property
    def draft_head(self) -> CompiledHead:
        """The MTP head as decoders run it: compiled once per bundle, so every decode reuses the traces. A head
        with dedicated embeddings embeds and scores with its own tables, others with the trunk's."""
        head = self.require_mtp()
        if head.dedicated:
            return CompiledHead(head, head.embed, head.logits)
        return CompiledHead(head, self.trunk.embed, self.trunk.lm_head)


def no_mtp_message(name: str) -> str:
    return (f"{name}: no MTP head (no mtp.* tensors in the weights and no sidecar: {', '.join(formats.SIDECARS)}); "
            f"many community conversions strip mtp.*: use a head from elsewhere with `--mtp-from DIR`, or graft it "
            f"back with `mtpbench graft TRUNK --mtp-from ORIGINAL OUT`")


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
    return set(weight_map.values())


def weight_files(path: Path, config: dict[str, Any] | None = None) -> list[Path]:
    """The weight files mlx_lm will load (every `*.safetensors` but an MTP sidecar), checked against the index:
    a shard it names that is missing is named, and a file it does not name (a stale shard set beside a new
    single file, or the reverse) is refused, since mlx_lm would load them all."""
    sidecars = formats.sidecar_names(path, config or {})
    files = sorted(f for f in path.glob("*.safetensors") if f.name not in sidecars)
    index = path / INDEX
    if index.exists():
        named = _index_files(path, index) - sidecars
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


def _config_file(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise UserError(f"{path}: no config.json (not a checkpoint directory)")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_file}: invalid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(config, dict):
        raise UserError(f"{cfg_file}: expected a JSON object")
    return config


def read_head_config(path: Path) -> dict[str, Any]:
    """The config of a directory a head is read from: a checkpoint, or a standalone `qwen3_5_mtp` head repo."""
    config = _config_file(path)
    if config.get("model_type") == HEAD_MODEL_TYPE:
        if not isinstance(config.get("text_config"), dict):
            raise UserError(f"{path}: a {HEAD_MODEL_TYPE} head repo needs a text_config (the trunk's)")
        check_moe_config(path, config["text_config"])
        return config
    return read_config(path)


def read_config(path: Path) -> dict[str, Any]:
    config = _config_file(path)
    model_type = config.get("model_type")
    if model_type == HEAD_MODEL_TYPE:
        raise UserError(f"{path}: a standalone MTP head ({HEAD_MODEL_TYPE}), no trunk: use it with a trunk, "
                        f"`--model TRUNK --mtp-from {path}`")
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


def fingerprint(path: Path, extra: tuple[Path, ...] = ()) -> str:
    """sha256 over config.json and each weight file's name, size, header and first/last MiB (the top-level ones and
    `extra`, e.g. a sidecar in a subdirectory): fast on big checkpoints."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in [*sorted(path.glob("*.safetensors")), *(e for e in extra if e.parent != path)]:
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


def check_compatible(trunk_cfg: dict[str, Any], head_cfg: dict[str, Any], trunk_name: str, head_name: str,
                     refusal: str = "cannot graft") -> None:
    """Refuse, in one line, a head whose shapes or layer count do not fit the trunk."""
    t, h = text_config(trunk_cfg), text_config(head_cfg)
    for key in COMPAT_KEYS:
        if t.get(key) != h.get(key):
            raise UserError(f"{refusal}: {key} differs (trunk {trunk_name}: {t.get(key)}, "
                            f"MTP source {head_name}: {h.get(key)})")
    trunk_layers, head_layers = mtp_layer_count(trunk_cfg), mtp_layer_count(head_cfg)
    if trunk_layers and trunk_layers != head_layers:
        raise UserError(f"{refusal}: MTP layer count differs (trunk {trunk_name} declares {trunk_layers}, "
                        f"MTP source {head_name} has {head_layers})")


def _found_tensors(where: dict[str, Path], standalone: bool) -> tuple[dict[str, tuple[str, Path]], set[str]]:
    """name (relative to the head) -> (stored key, file), and the prefixes seen; a standalone head repo may store
    its tensors at the root (mlx-vlm's drafter split strips `mtp.`)."""
    found: dict[str, tuple[str, Path]] = {}
    prefixes = set()
    for key, f in where.items():
        m = MTP_KEY.match(key)
        if m:
            found[m["name"]] = (key, f)
            prefixes.add(m["prefix"])
        elif standalone:
            found[key] = (key, f)
            prefixes.add("")
    return found, prefixes


def _contract_specs(directory: Path) -> dict[str, Any]:
    """MTPLX's `mtp_prequantized_module_specs` (module -> bits, group_size, mode), from the first contract block."""
    for _, block in conventions.contract_sources(directory):
        specs = block.get("mtp_prequantized_module_specs")
        if isinstance(specs, dict):
            return {str(k): v for k, v in specs.items() if isinstance(v, dict)}
    return {}


def _declared_value(declared: tuple[conventions.Declared, ...], name: str) -> conventions.Declared | None:
    return next((d for d in declared if d.name == name), None)


def _quantize_at_load(head: MTPHead, declared: tuple[conventions.Declared, ...]) -> dict[str, dict[str, Any]]:
    """MTPLX quantizes an unquantized head at load when its contract names `mtp_quant_bits` (policy `all`: every
    linear, fc included; `cyankiwi`: the layers' linears only): do the same, and say which modules."""
    bits = _declared_value(declared, "mtp_quant_bits")
    prequantized = _declared_value(declared, "mtp_prequantized")
    if bits is None or (prequantized is not None and prequantized.value == "true"):
        return {}
    mode = _declared_value(declared, "mtp_quant_mode")
    group = _declared_value(declared, "mtp_quant_group_size")
    policy = _declared_value(declared, "mtp_quant_policy")
    params = {"bits": int(bits.value), "group_size": int(group.value) if group else 64,
              "mode": mode.value if mode else "affine"}
    layers_only = policy is not None and policy.value == "layers"
    chosen: dict[str, dict[str, Any]] = {}

    def pick(path: str, module: nn.Module) -> Any:
        if not hasattr(module, "to_quantized") or isinstance(module, nn.Embedding) or (
                layers_only and not path.startswith("layers.")):
            return False
        if module.weight.shape[-1] % params["group_size"]:
            return False
        chosen[path] = {**params, "source": f"{bits.source} (quantized at load, as MTPLX does)"}
        return dict(params)

    nn.quantize(head, class_predicate=pick)
    return chosen


def load_mtp_head(
    path: Path, config: dict[str, Any], args: Any, where: dict[str, Path], *, sidecar: Path | None = None,
    trunk_conv: str | None = None, declared: tuple[conventions.Declared, ...] = (),
) -> tuple[MTPHead | None, MTPSource | None]:
    """Build the head from the tensors found in `where`; None when the checkpoint has none. `args` are the trunk's
    text-model args (the head is built to its shapes); `config` is the config of the directory the head is read
    from (a checkpoint, or a standalone head repo)."""
    standalone = config.get("model_type") == HEAD_MODEL_TYPE
    found, prefixes = _found_tensors(where, standalone)
    n_layers = mtp_layer_count(config)
    if not found:
        return None, None
    if n_layers == 0:
        raise UserError(f"{path}: weights contain mtp.* tensors but the config declares no MTP layers "
                        f"(mtp_num_hidden_layers)")
    if len(prefixes) > 1:
        raise UserError(f"{path}: MTP tensors under several prefixes ({', '.join(sorted(prefixes))})")
    dedicated = bool(text_config(config).get("mtp_use_dedicated_embeddings"))
    head = MTPHead(args, num_layers=n_layers, dedicated=dedicated)
    expected = dict(tree_flatten(head.parameters()))
    names = mtp_tensor_names(n_layers, moe=args.num_experts > 0, dedicated=dedicated, tied=head.tied)

    tensors: dict[str, mx.array] = {}
    files: dict[Path, dict[str, mx.array]] = {}
    for name, (key, f) in found.items():
        if f not in files:  # mx.load reads bf16 (numpy, behind safetensors' mlx reader, cannot)
            files[f] = mx.load(str(f))
        tensors[name] = files[f][key]
    layout = stack_experts(path, tensors, n_layers, args.num_experts) if args.num_experts > 0 else None
    missing = [n for n in names if n not in tensors]
    if missing:
        raise UserError(f"{path}: MTP head incomplete, missing {len(missing)} tensor(s) e.g. mtp.{missing[0]}"
                        + (" (mtp_use_dedicated_embeddings: true asks for the head's own embedding and lm head)"
                           if dedicated and missing[0] in ("embed_tokens.weight", "lm_head.weight") else ""))
    prefix = prefixes.pop()
    specs = _contract_specs(path)
    quantized: dict[str, dict[str, Any]] = {}
    for name in names:
        if name.endswith(".weight") and name[: -len(".weight")] + ".scales" in tensors:
            base = name[: -len(".weight")]
            quantized[base] = formats.module_quantization(base, tensors, expected[name].shape[-1], config, prefix,
                                                          specs)
        elif tuple(tensors[name].shape) != tuple(expected[name].shape):
            raise UserError(f"{path}: MTP tensor mtp.{name} has shape {tuple(tensors[name].shape)}, the config "
                            f"implies {tuple(expected[name].shape)}")
    if quantized:
        nn.quantize(head, class_predicate=lambda p, m: (
            {k: v for k, v in quantized[p].items() if k != "source"} if p in quantized and hasattr(m, "to_quantized")
            else False))

    norm_keys = [n for n in names if any(n.endswith(s) for s in MTP_NORM_SUFFIXES)]
    inline = sidecar is None or all(f != sidecar for _, f in found.values())
    decisions = formats.decide_norms(tensors, norm_keys, config,
                                     formats.structural(config, standalone, inline, trunk_conv))
    for n in norm_keys:
        if decisions[formats.norm_family(n)].convention == formats.OFFSET:
            tensors[n] = tensors[n] + 1.0
    try:
        head.load_weights(list(tensors.items()), strict=True)
    except ValueError as e:
        raise UserError(f"{path}: the MTP tensors do not fit the head ({str(e).splitlines()[0]})") from None
    head.eval()
    if not quantized:
        quantized = _quantize_at_load(head, declared)
    mx.eval(head.parameters())
    source = MTPSource(
        files=tuple(sorted({str(f.relative_to(path)) for _, f in found.values()})),
        prefix=prefix,
        tensor_count=len(found),
        norm_convention=formats.summary(decisions),
        quantized=quantized,
        expert_layout=layout,
        norms=decisions,
        directory=str(path),
        dedicated=dedicated,
    )
    return head, source


def read_head(path: Path, config: dict[str, Any], args: Any,
              declared: tuple[conventions.Declared, ...] = ()) -> tuple[MTPHead | None, MTPSource | None]:
    """The MTP head stored in directory `path` (inline, in a sidecar, or a standalone head repo), built to `args`."""
    files = weight_files(path, config)
    side = formats.sidecar(path, config)
    where = scan_headers(files + ([side] if side else []))
    return load_mtp_head(path, config, args, where, sidecar=side, trunk_conv=formats.conv1d_layout(files, where),
                         declared=declared)


def load_head_only(path: Path) -> tuple[MTPHead, MTPSource, dict[str, Any]]:
    """Only the MTP head of a directory (no trunk in memory: a 27B trunk is not needed to read 15 tensors)."""
    from mlx_lm.models.qwen3_5 import TextModelArgs

    config = read_head_config(path)
    head, source = read_head(path, config, TextModelArgs.from_dict(text_config(config)), conventions.contract(path))
    if head is None or source is None:
        raise UserError(f"{path.name}: no MTP head (no mtp.* tensors and no sidecar: "
                        f"{', '.join(formats.SIDECARS)})")
    return head, source, config


class _Float32Experts(SwitchLinear):
    """Unquantized experts run in float32 (mlx's CPU GatherMM supports no other dtype), outputs cast back."""

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return super().__call__(x.astype(mx.float32), indices, sorted_indices).astype(x.dtype)


_UPCAST_SAID = False


def upcast_cpu_experts(*modules: nn.Module | None) -> int:
    """On the CPU, switch every unquantized half-precision expert layer to float32 (weights and gather), and say so
    once per process on stderr; returns how many layers changed."""
    global _UPCAST_SAID
    if mx.default_device() != mx.cpu:
        return 0
    changed = 0
    for module in modules:
        for _, m in ([] if module is None else module.named_modules()):
            if type(m) is SwitchLinear and m.weight.dtype in (mx.bfloat16, mx.float16):
                m.update({k: v.astype(mx.float32) for k, v in m.parameters().items()})
                m.__class__ = _Float32Experts
                changed += 1
    if changed and not _UPCAST_SAID:
        _UPCAST_SAID = True
        print(formats.upcast_note(), file=sys.stderr)
    return changed


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


def preflight(path_or_repo: str | Path, require_mtp: bool = True, cache_dir: str | Path | None = None,
              mtp_from: str | Path | None = None) -> Path:
    """Every check that needs no model in memory (path, config, readable weights, MTP present, a head from
    `mtp_from` compatible with the trunk): fail before work."""
    path = resolve(path_or_repo, cache_dir)
    config = read_config(path)
    files = weight_files(path, config)
    if mtp_from is not None:
        head_path = resolve(mtp_from, cache_dir)
        head_cfg = read_head_config(head_path)
        check_compatible(config, head_cfg, str(path_or_repo), str(mtp_from), "--mtp-from: the head does not fit")
        path_for_head, config_for_head = head_path, head_cfg
        files = weight_files(head_path, head_cfg)
    else:
        path_for_head, config_for_head = path, config
    side = formats.sidecar(path_for_head, config_for_head)
    where = scan_headers(files + ([side] if side else []))
    conventions.contract(path_for_head)  # a value mtpbench cannot model is refused before any work
    standalone = config_for_head.get("model_type") == HEAD_MODEL_TYPE
    if require_mtp and not (_found_tensors(where, standalone)[0]):
        raise UserError(no_mtp_message(str(mtp_from or path_or_repo)))
    if require_mtp and mtp_layer_count(config_for_head) == 0:
        raise UserError(f"{path_for_head}: weights contain mtp.* tensors but the config declares no MTP layers "
                        f"(mtp_num_hidden_layers)")
    return path


def load(
    path_or_repo: str | Path,
    hidden_variant: HiddenVariant | str | None = None,
    require_mtp: bool = False,
    cache_dir: str | Path | None = None,
    mtp_from: str | Path | None = None,
    concat: str | None = None,
) -> Bundle:
    """Load trunk (mlx_lm), MTP head (safetensors: the checkpoint's own, or `mtp_from`'s, checked compatible and
    never copied), tokenizer and config from a directory or cached repo id. The head-input conventions default to
    what the head's directory declares in MTPLX's contract (else post-norm hidden, embedding first)."""
    path = resolve(path_or_repo, cache_dir)
    config = read_config(path)
    name = str(path_or_repo) if not Path(str(path_or_repo)).exists() else path.name
    scan_headers(weight_files(path, config))  # a truncated or corrupt file is one line before mlx_lm reads it
    if mtp_from is not None:
        head_path = resolve(mtp_from, cache_dir)
        head_cfg = read_head_config(head_path)
        check_compatible(config, head_cfg, name, str(mtp_from), "--mtp-from: the head does not fit")
    else:
        head_path, head_cfg = path, config
    declared = conventions.contract(head_path)
    model, tokenizer = _load_trunk(path)
    head, source = read_head(head_path, head_cfg, model.language_model.args, declared)
    if require_mtp and head is None:
        raise UserError(no_mtp_message(str(mtp_from or name)))
    upcast_cpu_experts(model, head)
    axes = {d.name: d.value for d in declared}
    variant = HiddenVariant(hidden_variant or axes.get("mtp_hidden", HiddenVariant.POST_NORM.value))
    if head is not None:
        head.concat = conventions.concat(concat or axes.get("mtp_concat", conventions.EMBEDDING_HIDDEN), "concat")
    side = formats.sidecar(path, config)
    fp = fingerprint(path, (side,) if side else ())
    if mtp_from is not None:
        head_side = formats.sidecar(head_path, head_cfg)
        fp = hashlib.sha256(f"{fp}:{fingerprint(head_path, (head_side,) if head_side else ())}".encode()) \
            .hexdigest()[:16]
    return Bundle(
        name=name, path=path, config=config, model=model, tokenizer=tokenizer, trunk=Trunk(model, variant),
        mtp=head, mtp_source=source, fingerprint=fp, hidden_variant=variant, declared=declared,
    )
