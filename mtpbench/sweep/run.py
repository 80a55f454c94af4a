"""The sweep: checkpoints x sampling settings x thinking x prompts x repetitions, AR and MTP at every K per cell.

A *cell* is one (model, setting, thinking, prompt, repetition); it runs the AR baseline and MTP at each K back to
back, in ABBA order across repetitions (AR first on even repetitions, last on odd ones) so slow drift hits both
modes alike. Each cell's rows are written as atomic parquet parts when it finishes, so a killed sweep loses at
most the cell in flight and a rerun of the same command finishes only what is missing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..model.checkpoint import Bundle, context_length, load, preflight, read_config, text_config
from ..decode import DecodeResult, generate_ar, generate_mtp
from ..errors import UserError
from ..model.kvcache import FULL_KV, KVCacheSpec
from .prompts import Prompt, encode, load_sets, supports_thinking
from ..provenance import now_iso, provenance
from .store import SCHEMA_VERSION, Created, create_results_dir, done_parts, read_manifest, remove_created, write_json, write_part
from ..model.roofline import bytes_per_token, copy_bandwidth, draft_step_bytes, weight_bytes
from ..sampling import SamplingConfig

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class Setting:
    """One sampling setting of the grid (the seed comes from the cell)."""

    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    draft_temperature: float | None = None

    def config(self, seed: int) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_p, self.top_k, self.min_p, seed)

    @property
    def label(self) -> str:
        base = self.config(0).label()
        if self.draft_temperature is not None and self.draft_temperature != self.temperature:
            base += f" draft_T={self.draft_temperature:g}"
        return base


@dataclass(frozen=True)
class SweepSpec:
    """Everything that determines which rows a sweep produces (and so whether a results dir can be resumed)."""

    models: tuple[str, ...]
    prompts: tuple[str, ...]
    ks: tuple[int, ...] = (1, 2, 3, 4)
    temps: tuple[float, ...] = (0.0,)
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    draft_temp: float | None = None
    max_tokens: int = 128
    repeats: int = 2
    seed: int = 0
    thinking: tuple[str, ...] = ("n/a",)  # "on", "off" when the chat template supports enable_thinking
    policies: tuple[str, ...] = ("as-is",)  # quantization policies applied in memory (see `mtpbench policies`)
    kv_bits: tuple[int, ...] = (0,)  # trunk KV-cache bits per cell (0: unquantized), see mtpbench.kvcache
    kv_group_size: int = 0
    prompt_limit: int = 0  # 0: every prompt of each set; N: the first N of each set
    ignore_eos: bool = False
    records: bool = True  # steps/tokens tables (p, q, alpha, PIT): needed for the preservation verdicts
    warmup_tokens: int = 16

    def __post_init__(self) -> None:
        if not self.models:
            raise UserError("no model given")
        if not self.prompts:
            raise UserError("no prompt set given")
        if self.repeats < 1:
            raise UserError(f"--repeats must be >= 1, got {self.repeats}")
        if self.max_tokens < 2:
            raise UserError(f"--max-tokens must be >= 2 (MTP needs at least one verify step), got {self.max_tokens}")
        if self.prompt_limit < 0:
            raise UserError("--prompt-limit must be >= 0")
        for t in self.thinking:
            if t not in ("on", "off", "n/a"):
                raise UserError(f"--thinking values are on and off, got {t!r}")
        for temp in self.temps:
            self.setting(temp).config(0)  # validates every sampling value up front
        if any(p != "as-is" for p in self.policies):
            from ..build.quantize import get_policy

            for p in self.policies:
                if p != "as-is":
                    get_policy(p)
        for bits in self.kv_bits:
            KVCacheSpec(bits, self.kv_group_size)
        if self.draft_temp is not None and self.draft_temp < 0:
            raise UserError(f"--draft-temp must be >= 0, got {self.draft_temp}")

    def setting(self, temp: float) -> Setting:
        return Setting(temp, self.top_p, self.top_k, self.min_p, self.draft_temp)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    def digest(self) -> str:
        return hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Cell:
    model: str
    policy: str
    setting: Setting
    thinking: str
    prompt: Prompt
    repetition: int
    seed: int
    kv: KVCacheSpec = FULL_KV

    @property
    def policy_label(self) -> str:
        """What was quantized: the weight policy, plus `+kv8` etc. when the KV cache is too (one comparable axis)."""
        return f"{self.policy}+{self.kv.label}" if self.kv.quantized else self.policy

    @property
    def cell_id(self) -> str:
        key = [self.model, asdict(self.setting), self.thinking, self.prompt.set_name, self.prompt.id, self.repetition]
        if self.policy_label != "as-is":
            key.append(self.policy_label)
        return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def run_id(self, mode: str, k: int) -> str:
        return f"{self.cell_id}-{mode}{k if mode == 'mtp' else ''}"

    def order(self, ks: tuple[int, ...]) -> list[tuple[str, int]]:
        """ABBA: AR first then K ascending on even repetitions; reversed on odd ones."""
        runs = [("ar", 0)] + [("mtp", k) for k in ks]
        return runs if self.repetition % 2 == 0 else runs[::-1]


def plan(spec: SweepSpec, prompts: list[Prompt]) -> list[Cell]:
    """Cells in execution order: grouped by model, then setting and thinking (one warm-up per group)."""
    chosen = prompts
    if spec.prompt_limit:
        per_set: dict[str, list[Prompt]] = {}
        for p in prompts:
            per_set.setdefault(p.set_name, []).append(p)
        chosen = [p for ps in per_set.values() for p in ps[: spec.prompt_limit]]
    # One seed per (prompt, repetition): runs of one verdict group never share a random stream (a shared PIT
    # stream across prompts would make the u values dependent and the test invalid).
    return [Cell(m, pol, spec.setting(t), th, p, r, spec.seed + r * len(chosen) + i, KVCacheSpec(kv, spec.kv_group_size))
            for m in spec.models for pol in spec.policies for kv in spec.kv_bits for t in spec.temps
            for th in spec.thinking for r in range(spec.repeats) for i, p in enumerate(chosen)]


@dataclass(frozen=True)
class RunEvent:
    """What the progress display shows after each run."""

    done: int
    total: int
    label: str
    tok_s: float


@dataclass
class SweepOutcome:
    out: Path
    cells_total: int
    cells_run: int
    cells_skipped: int
    failed_runs: list[str] = field(default_factory=list)


def thinking_flag(thinking: str) -> bool | None:
    return {"on": True, "off": False}.get(thinking)


def _validate_prompts(spec: SweepSpec, paths: dict[str, Path], prompts: list[Prompt]) -> None:
    """Tokenize every prompt with every model's tokenizer, check the context length and that the KV cache can be
    quantized as asked, before any work."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    for model, path in paths.items():
        tok = load_tokenizer(path)
        config = read_config(path)
        ctx = context_length(config)
        head_dim = int(text_config(config).get("head_dim", 0) or 0)
        for bits in (b for b in spec.kv_bits if b):
            try:
                KVCacheSpec(bits, spec.kv_group_size).resolved_group_size(head_dim)
            except UserError as e:
                raise UserError(f"{model}: --kv-bits {bits}: {e}") from None
        wants_thinking = [t for t in spec.thinking if t != "n/a"]
        if wants_thinking and not supports_thinking(tok):
            raise UserError(f"{model}: --thinking needs a chat template with enable_thinking; this one has none")
        for p in prompts:
            for th in spec.thinking:
                n = len(encode(tok, p, thinking_flag(th)))
                budget = n + (p.max_tokens or spec.max_tokens) + max(spec.ks) + 1
                if budget > ctx:
                    raise UserError(f"prompt {p.set_name}/{p.id} needs {budget} positions ({n} prompt tokens + "
                                    f"generation) but {model} has a context of {ctx}")


def prepare_results_dir(out: Path, spec: SweepSpec, command: str) -> Created | None:
    """Create the dir with its manifest, or check that an existing one holds this very sweep (resume).

    Returns what this call created (None on a resume): the only things a failed run may remove."""
    manifest = out / "manifest.json"
    if manifest.exists():
        old = read_manifest(out)
        if old.get("spec") != spec.to_dict():
            diff = sorted(k for k in set(old.get("spec", {})) | set(spec.to_dict())
                          if old.get("spec", {}).get(k) != spec.to_dict().get(k))
            raise UserError(f"{out} holds a different sweep (differs in: {', '.join(diff)}); use another --out "
                            f"or remove it")
        return None
    created = create_results_dir(out)
    write_json(manifest, {"schema_version": SCHEMA_VERSION, "name": out.name, "created_at": now_iso(),
                          "command": command, "spec": spec.to_dict(), "provenance": provenance(), "models": {}})
    return created


def record_model(out: Path, name: str, info: dict[str, Any], policy: str = "as-is") -> None:
    """Store a model's `inspect` description in the manifest (refusing a checkpoint that changed on disk)."""
    manifest = read_manifest(out)
    name = name if policy == "as-is" else f"{name}@{policy}"
    known = manifest["models"].get(name)
    if known and known.get("fingerprint") != info["fingerprint"]:
        raise UserError(f"{name} changed on disk since this sweep started (fingerprint {known['fingerprint']} -> "
                        f"{info['fingerprint']}); use another --out")
    manifest["models"][name] = info
    write_json(out / "manifest.json", manifest)


def _run_row(cell: Cell, bundle: Bundle, mode: str, k: int, order: int, r: DecodeResult | None, error: str,
             spec: SweepSpec, sweep: str, started: str, weights: tuple[int, int]) -> dict[str, Any]:
    """One runs-table row; `weights` = (trunk, draft step) weight bytes, for the roofline columns."""
    s = cell.setting
    ok = r is not None and not error
    row = {
        "run_id": cell.run_id(mode, k), "cell_id": cell.cell_id, "sweep": sweep, "backend": "reference",
        "model": cell.model, "model_fingerprint": bundle.fingerprint, "model_path": str(bundle.path),
        "policy": cell.policy_label, "kv_bits": cell.kv.bits, "mode": mode, "k": k, "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
        "min_p": s.min_p, "draft_temperature": s.temperature if s.draft_temperature is None else s.draft_temperature,
        "setting": s.label, "thinking": cell.thinking, "prompt_set": cell.prompt.set_name,
        "prompt_id": cell.prompt.id, "category": cell.prompt.category, "repetition": cell.repetition,
        "seed": cell.seed, "max_tokens": cell.prompt.max_tokens or spec.max_tokens, "order": order,
        "status": "ok" if ok else "failed", "error": error or None, "hidden_variant": bundle.hidden_variant.value,
        "started_at": started, **provenance(),
    }
    if r is not None:
        tau = r.mean_acceptance_length if mode == "mtp" else 1.0
        row.update(
            weight_bytes_per_token=bytes_per_token(*weights, k, tau),
            memory_gb_s=copy_bandwidth(),
            prompt_tokens=r.prompt_tokens, generated_tokens=r.generated_tokens, prefill_s=r.prefill_s,
            decode_s=r.decode_s, decode_tok_s=r.decode_tok_s, ttft_s=r.prefill_s,
            peak_memory_bytes=r.peak_memory_bytes, verify_steps=r.verify_steps, drafted_tokens=r.drafted_tokens,
            accepted_tokens=r.accepted_tokens,
            mean_acceptance_length=r.mean_acceptance_length if mode == "mtp" else None,
            drafted_at_depth=r.drafted_at_depth, accepted_at_depth=r.accepted_at_depth, finished_by=r.finished_by,
            output_hash=hashlib.sha1(json.dumps(r.tokens).encode()).hexdigest()[:16],
        )
    return row


def run_cell(bundle: Bundle, cell: Cell, spec: SweepSpec, sweep: str,
             on_run: Callable[[str, float], None] | None = None) -> tuple[list[dict], list[dict], list[dict]]:
    """Run AR and every K of one cell; returns (runs, steps, tokens) rows."""
    ids = encode(bundle.tokenizer, cell.prompt, thinking_flag(cell.thinking))
    max_tokens = cell.prompt.max_tokens or spec.max_tokens
    runs, steps, tokens = [], [], []
    weights = (weight_bytes(bundle), draft_step_bytes(bundle))  # once per cell, not per run
    for order, (mode, k) in enumerate(cell.order(spec.ks)):
        cfg = cell.setting.config(cell.seed)
        started, error, result = now_iso(), "", None
        try:
            if mode == "ar":
                result = generate_ar(bundle, ids, cfg, max_tokens, records=spec.records, ignore_eos=spec.ignore_eos,
                                     kv=cell.kv)
            else:
                result = generate_mtp(bundle, ids, cfg, k, max_tokens, cell.setting.draft_temperature,
                                      records=spec.records, ignore_eos=spec.ignore_eos, kv=cell.kv)
                if result.verify_steps == 0:
                    error = "drafted nothing: generation ended after the first token, so MTP was never exercised"
        except UserError:
            raise
        except Exception as e:  # a failed run is recorded and the sweep goes on
            error = f"{type(e).__name__}: {e}"
        row = _run_row(cell, bundle, mode, k, order, result, error, spec, sweep, started, weights)
        runs.append(row)
        if result is not None:
            steps += [{"run_id": row["run_id"], **asdict(s)} for s in result.steps]
            tokens += [{"run_id": row["run_id"], **asdict(t)} for t in result.token_records]
        if on_run:
            on_run(f"{cell.prompt.id} {mode}{k if k else ''}", row.get("decode_tok_s") or float("nan"))
    return runs, steps, tokens


def warm_up(bundle: Bundle, cell: Cell, spec: SweepSpec) -> None:
    """Unrecorded AR and MTP runs so first-call costs (allocation, kernel setup) never land in a timed row."""
    ids = encode(bundle.tokenizer, cell.prompt, thinking_flag(cell.thinking))
    cfg = cell.setting.config(cell.seed)
    n = min(spec.warmup_tokens, cell.prompt.max_tokens or spec.max_tokens)
    generate_ar(bundle, ids, cfg, n, records=spec.records, ignore_eos=True, kv=cell.kv)
    for k in spec.ks:
        generate_mtp(bundle, ids, cfg, k, n, cell.setting.draft_temperature, records=spec.records, ignore_eos=True,
                     kv=cell.kv)


def write_cell(out: Path, cell_id: str, runs: list[dict], steps: list[dict], tokens: list[dict]) -> None:
    """Steps and tokens first, runs last: a runs part is the mark of a finished cell."""
    write_part(out, "steps", cell_id, steps)
    write_part(out, "tokens", cell_id, tokens)
    write_part(out, "runs", cell_id, runs)


def by_model(cells: list[Cell]) -> Iterator[tuple[tuple[str, str], list[Cell]]]:
    """Cells grouped by (model, policy): each group loads (and quantizes) its checkpoint once."""
    groups: dict[tuple[str, str], list[Cell]] = {}
    for c in cells:
        groups.setdefault((c.model, c.policy), []).append(c)
    yield from groups.items()


def run_sweep(spec: SweepSpec, out: Path, command: str = "",
              progress: Callable[[RunEvent], None] | None = None, executor: str = "local",
              ray_address: str | None = None) -> SweepOutcome:
    """Validate everything, then run every missing cell; safe to call again on the same dir to resume.

    `executor`: "local" runs the cells in this process; "ray" runs each (model, policy) group as a Ray task
    (`mtpbench.sweep.ray_executor.run_ray`) on the cluster at `ray_address`, or on a local Ray instance.
    Both write the same parts, so either can resume a dir the other started.
    """
    if executor not in EXECUTORS:
        raise UserError(f"unknown executor {executor!r} (choose from {', '.join(EXECUTORS)})")
    if ray_address and executor != "ray":
        raise UserError("--ray-address needs --executor ray")
    prompts = load_sets(list(spec.prompts))
    paths = {m: preflight(m, require_mtp=True) for m in spec.models}
    _validate_prompts(spec, paths, prompts)
    cells = plan(spec, prompts)
    created = prepare_results_dir(out, spec, command)
    try:
        if executor == "ray":
            from .ray_executor import run_ray

            return run_ray(spec, out, cells, progress, address=ray_address)
        return _execute(spec, out, cells, progress)
    except BaseException:
        if created and not done_parts(out):
            remove_created(created)  # nothing measured yet: leave no half-made dir behind, and nothing else
        raise


CellSink = Callable[[Cell, list[dict], list[dict], list[dict]], None]


def run_group(spec: SweepSpec, model: str, policy: str, cells: list[Cell], sweep_name: str, on_cell: CellSink,
              on_run: Callable[[str, float], None] | None = None) -> dict[str, Any]:
    """Load (and quantize) one checkpoint once, warm up per setting, run its cells; returns its description.

    The unit of work of every executor: in process, or one Ray task per (model, policy) group.
    """
    from ..model.describe import describe

    bundle = load(model, require_mtp=True)
    if policy != "as-is":
        from ..build.quantize import apply_policy

        bundle = apply_policy(bundle, policy)
    warmed: set[tuple] = set()
    for cell in cells:
        group = (cell.setting, cell.thinking, cell.kv)
        if group not in warmed:
            warm_up(bundle, cell, spec)
            warmed.add(group)
        on_cell(cell, *run_cell(bundle, cell, spec, sweep_name, on_run))
    return describe(bundle)


def _execute(spec: SweepSpec, out: Path, cells: list[Cell], progress) -> SweepOutcome:
    done = done_parts(out)
    todo = [c for c in cells if c.cell_id not in done]
    outcome = SweepOutcome(out, len(cells), 0, len(cells) - len(todo))
    runs_total = len(todo) * (1 + len(spec.ks))
    counter = {"n": 0}

    def on_run(label: str, tok_s: float) -> None:
        counter["n"] += 1
        if progress:
            progress(RunEvent(counter["n"], runs_total, label, tok_s))

    def on_cell(cell: Cell, runs: list[dict], steps: list[dict], tokens: list[dict]) -> None:
        write_cell(out, cell.cell_id, runs, steps, tokens)
        outcome.cells_run += 1
        outcome.failed_runs.extend(f"{r['run_id']}: {r['error']}" for r in runs if r["status"] != "ok")

    for (model, policy), group_cells in by_model(todo):
        info = run_group(spec, model, policy, group_cells, out.name, on_cell, on_run)
        record_model(out, model, info, policy)
    _write_verdicts(out)
    return outcome


def _write_verdicts(out: Path) -> None:
    from .store import read_table
    from ..stats.sweep_verdicts import sweep_verdicts

    rows = sweep_verdicts(read_table(out, "runs"), read_table(out, "steps"), read_table(out, "tokens"))
    write_part(out, "verdicts", "sweep", rows)


def default_out(spec: SweepSpec, results_root: Path = Path("results")) -> Path:
    """A deterministic name, so rerunning the same command resumes the same directory."""
    first = Path(spec.models[0]).name or "model"
    return results_root / f"{first}-{spec.digest()}"


