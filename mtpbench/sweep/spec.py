"""What a sweep is: the values of its axes and options (validated once, before any work), and the cells it plans.

A *cell* is one point of the grid for one backend kind: the reference decoder at (model, policy, KV bits, sampling
setting, thinking, prompt, repetition, ...), or the same point without the decoder-only axes for server
endpoints. Within a cell the runs are AR and MTP at every K back to back, in ABBA order across repetitions (AR
first on even repetitions, last on odd ones) so slow drift hits both modes alike.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .endpoint import Endpoint
from ..errors import UserError
from ..model import conventions
from ..sampling import SamplingConfig
from .axes import AXES, BY_NAME, CELL, OPTION_BY_NAME, REFERENCE, SAMPLING_AXES, SERVER, TARGET, axes_for
from .prompts import Prompt



@dataclass(frozen=True)
class Setting:
    """One sampling setting of the grid (the seed comes from the cell). Greedy ignores top-p, top-k, min-p and the
    draft temperature, so a greedy setting keeps none of them: one greedy setting however the others vary."""

    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    draft_temperature: float | None = None

    def __post_init__(self) -> None:
        if self.draft_temperature is not None and self.draft_temperature < 0:
            raise UserError(f"--draft-temp must be >= 0, got {self.draft_temperature:g}")
        self.config(0)  # validates every value, greedy's ignored ones too: a bad value is an error either way
        if self.temperature == 0:
            for name, neutral in (("top_p", 1.0), ("top_k", 0), ("min_p", 0.0), ("draft_temperature", None)):
                object.__setattr__(self, name, neutral)

    def config(self, seed: int) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_p, self.top_k, self.min_p, seed)

    @property
    def draft(self) -> float:
        """The draft temperature actually used."""
        return self.temperature if self.draft_temperature is None else self.draft_temperature

    @property
    def label(self) -> str:
        base = self.config(0).label()
        if self.draft_temperature is not None and self.draft_temperature != self.temperature:
            base += f" draft_T={self.draft_temperature:g}"
        return base


@dataclass(frozen=True)
class SweepSpec:
    """Everything that determines which rows a sweep produces (and so whether a results dir can be resumed).

    `grid` holds the values of every axis of `axes.AXES`, by name; build one with `SweepSpec.of(...)`, which fills
    defaults and validates through the same parsers as the command line and the sweep file.
    """

    grid: tuple[tuple[str, tuple[Any, ...]], ...]
    endpoints: tuple[Endpoint, ...] = ()
    max_tokens: int = 128
    repeats: int = 2
    seed: int = 0
    prompt_limit: int = 0
    kv_group_size: int = 0
    ignore_eos: bool = False
    records: bool = True  # steps/tokens tables (p, q, alpha, PIT): needed for the preservation verdicts
    warmup_tokens: int = 16
    max_tokens_wins: bool = False  # the user gave --max-tokens: it overrides the prompt lines' own max_tokens
    mtp_from: str = ""  # draft with the MTP head of this directory (checked compatible, never copied); "": own
    # (axis, value) of each feeding convention taken from the checkpoints' runtime contract, not named by the user
    # (what the CLI says); the values themselves are in `grid`
    declared: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    @classmethod
    def of(cls, **values: Any) -> SweepSpec:
        """A spec from axis values (by axis name: `model=`, `k=`, `temperature=`, ...: text, a scalar or a list,
        as on the command line or in a sweep file) and scalar options; unnamed axes take their defaults."""
        from ..defaults import DEMO_PROMPT_SET, default_model, is_default_model
        from .prompts import available_sets

        grid: dict[str, tuple[Any, ...]] = {}
        named: set[str] = set()
        for axis in AXES:
            given = values.pop(axis.name, None)
            if given not in (None, (), []):
                named.add(axis.name)
            grid[axis.name] = axis.parse(given, axis.option) if axis.name in named else axis.default
        endpoints = tuple(values.pop("endpoints", ()))
        if not grid["model"] and not endpoints:
            grid["model"] = (default_model(),)
        heads = (values["mtp_from"],) if values.get("mtp_from") else grid["model"]
        declared = tuple((name, value) for name, value in conventions.declared_defaults(heads).items()
                         if name not in named)  # the checkpoints' own contract, where the user named no value
        grid.update({name: (value,) for name, value in declared})
        if not grid["prompts"]:
            demo = grid["model"] and all(is_default_model(m) for m in grid["model"])
            grid["prompts"] = (DEMO_PROMPT_SET,) if demo else tuple(s for s in available_sets()
                                                                     if s != DEMO_PROMPT_SET)
        unknown = sorted(set(values) - {f for f in cls.__dataclass_fields__ if f != "declared"})
        if unknown:
            raise UserError(f"unknown sweep setting(s): {', '.join(unknown)}")
        return cls(grid=tuple(grid.items()), endpoints=endpoints, declared=declared, **values)

    def __post_init__(self) -> None:
        names = [n for n, _ in self.grid]
        if sorted(names) != sorted(a.name for a in AXES):
            raise UserError(f"a sweep grid needs every axis ({', '.join(a.name for a in AXES)}), got {names}")
        for name, vals in self.grid:
            if not vals and not (name == "model" and self.endpoints):  # a server-only sweep loads no checkpoint
                raise UserError(f"{BY_NAME[name].option}: no value given")
        if not self.models and not self.endpoints:
            raise UserError("no model given")
        for opt, value in (("max_tokens", self.max_tokens), ("repeats", self.repeats),
                           ("prompt_limit", self.prompt_limit), ("seed", self.seed),
                           ("kv_group_size", self.kv_group_size)):
            OPTION_BY_NAME[opt].coerce(value, OPTION_BY_NAME[opt].flags[0])
        self.settings  # every sampling combination is valid
        if any(p != "as-is" for p in self.values("policy")):
            from ..builders.policies import get_policy

            for p in self.values("policy"):
                if p != "as-is":
                    get_policy(p)
        from ..model.kvcache import KVCacheSpec

        for bits in self.values("kv_bits"):
            KVCacheSpec(bits, self.kv_group_size)

    # --- reading it --------------------------------------------------------------------------------------------

    def values(self, axis: str) -> tuple[Any, ...]:
        return dict(self.grid)[axis]

    @property
    def models(self) -> tuple[str, ...]:
        return self.values("model")

    @property
    def prompts(self) -> tuple[str, ...]:
        return self.values("prompts")

    @property
    def ks(self) -> tuple[int, ...]:
        return self.values("k")

    @property
    def settings(self) -> tuple[Setting, ...]:
        """The sampling settings of the grid, each once (greedy collapses its ignored values)."""
        combos = itertools.product(*(self.values(a) for a in SAMPLING_AXES))
        return tuple(dict.fromkeys(Setting(*c) for c in combos))

    def to_dict(self) -> dict[str, Any]:
        """The spec as the manifest stores it (and resume compares): axes, options, endpoint records."""
        out: dict[str, Any] = {name: list(vals) for name, vals in self.grid  # defaults as before their axis:
                               if not (name == "context" and list(vals) == [0])
                               and not (name == "mtp_concat" and list(vals) == [conventions.EMBEDDING_HIDDEN])}
        if self.mtp_from:
            out["mtp_from"] = self.mtp_from
        out.update(max_tokens=self.max_tokens, repeats=self.repeats, seed=self.seed, prompt_limit=self.prompt_limit,
                   kv_group_size=self.kv_group_size, ignore_eos=self.ignore_eos, records=self.records,
                   warmup_tokens=self.warmup_tokens)
        if self.max_tokens_wins:  # only when set: directories written before this option still resume
            out["max_tokens_wins"] = True
        out["endpoints"] = {e.name: e.record() for e in self.endpoints}
        return json.loads(json.dumps(out))

    def digest(self) -> str:
        return hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Cell:
    """One point of the grid for one backend kind, on one prompt and repetition; its runs are AR and every K."""

    backend: str  # axes.REFERENCE or axes.SERVER: which axes it carries
    point: tuple[tuple[str, Any], ...]  # axis name -> value (target and cell axes; K is per run)
    prompt: Prompt
    repetition: int
    seed: int
    ks: tuple[int, ...] = field(default=(), compare=False)  # the runs: AR, then MTP at each K (reference only)
    max_tokens: int = field(default=128, compare=False)  # the user's --max-tokens, else the prompt's, else 128
    # run ids to run again (a resume of a cell whose other runs succeeded and are kept); None: every run
    redo: frozenset[str] | None = field(default=None, compare=False)

    def __getitem__(self, axis: str) -> Any:
        return dict(self.point).get(axis)

    @property
    def model(self) -> str | None:
        return self["model"]

    @property
    def policy(self) -> str:
        return self["policy"] or "as-is"

    @property
    def setting(self) -> Setting:
        return Setting(*(self[a] for a in SAMPLING_AXES))

    @property
    def thinking(self) -> str:
        return self["thinking"] or "n/a"

    @property
    def cell_id(self) -> str:
        """A hash of what makes this cell: every axis value it carries, the prompt (set, id and content) and the
        repetition. Editing a prompt's text gives new ids, so a resume reruns exactly those cells."""
        key = {"point": {k: v for k, v in self.point if k != "prompts" and not (k == "policy" and v == "as-is")
                         and not (k == "context" and not v)  # the native context: ids as before the axis
                         and not (k == "mtp_concat" and v == conventions.EMBEDDING_HIDDEN)},
               "prompt": [self.prompt.set_name, self.prompt.id, self.prompt.digest], "repetition": self.repetition}
        return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]

    @property
    def warm_group(self) -> tuple:
        """Cells that share one warm-up: the same point except the prompt set."""
        return tuple((k, v) for k, v in self.point if k != "prompts")

    def run_id(self, mode: str, k: int) -> str:
        return f"{self.cell_id}-{mode}{k if mode == 'mtp' else ''}"

    def order(self, ks: tuple[int, ...]) -> list[tuple[str, int]]:
        """ABBA: AR first then K ascending on even repetitions; reversed on odd ones."""
        runs = [("ar", 0)] + [("mtp", k) for k in ks]
        return runs if self.repetition % 2 == 0 else runs[::-1]


def _chosen(spec: SweepSpec, prompts: list[Prompt]) -> list[Prompt]:
    if not spec.prompt_limit:
        return prompts
    per_set: dict[str, list[Prompt]] = {}
    for p in prompts:
        per_set.setdefault(p.set_name, []).append(p)
    return [p for ps in per_set.values() for p in ps[: spec.prompt_limit]]


def _points(spec: SweepSpec, backend: str) -> Iterable[tuple[tuple[str, Any], ...]]:
    """Every combination of the backend's target and cell axes (sampling collapsed to distinct settings), target
    axes outermost so that one loaded model serves a contiguous run of cells."""
    axes = [a for a in axes_for(backend) if a.scope in (TARGET, CELL) and a.name not in SAMPLING_AXES
            and a.name != "prompts"]
    targets = [a for a in axes if a.scope == TARGET]
    cells = [a for a in axes if a.scope == CELL]
    sampling = [a for a in axes_for(backend) if a.name in SAMPLING_AXES]
    for t in itertools.product(*(spec.values(a.name) for a in targets)):
        for s in spec.settings:
            for c in itertools.product(*(spec.values(a.name) for a in cells)):
                values = {a.name: v for a, v in zip(targets, t)}
                values.update({a: getattr(s, "draft_temperature" if a == "draft_temp" else a) for a in
                               (x.name for x in sampling)})
                values.update({a.name: v for a, v in zip(cells, c)})
                yield tuple(values.items())


def plan(spec: SweepSpec, prompts: list[Prompt],
         bucketed: dict[tuple[str, int], list[Prompt]] | None = None) -> list[Cell]:
    """Cells in execution order: the reference decoder's (grouped by model and policy, then setting and the other
    axes, then repetition and prompt), then the servers' (the same order without the decoder-only axes).

    A cell at a context bucket takes its prompts from `bucketed[(model, bucket)]` (the long-context documents cut
    with that model's tokenizer: `backends.reference.context_prompts`); the native context takes `prompts`.

    One seed per (prompt, repetition), derived from their identity (`cell_seed`): runs of one verdict group never
    share a random stream (a shared PIT stream across prompts would make the u values dependent and the test
    invalid), and adding, removing or editing a prompt never hands another cell's seed to a new one.
    """
    chosen = _chosen(spec, prompts)
    kinds = ([REFERENCE] if spec.models else []) + ([SERVER] if spec.endpoints else [])
    cells = []
    for kind in kinds:
        for point in dict.fromkeys(_points(spec, kind)):
            values = dict(point)
            bucket = values.get("context") or 0
            here = chosen if not bucket else (bucketed or {}).get((values["model"], bucket))
            if here is None:
                raise UserError(f"--context {bucket}: no prompts were cut for {values['model']}")
            for r in range(spec.repeats):
                for p in here:
                    limit = spec.max_tokens if spec.max_tokens_wins else p.max_tokens or spec.max_tokens
                    cells.append(Cell(kind, point + (("prompts", p.set_name),), p, r, cell_seed(spec.seed, p, r),
                                      spec.ks if kind == REFERENCE else (), limit))
    return cells


SEED_BITS = 31  # seeds fit a signed 32-bit integer: every server's `seed` field takes them


def cell_seed(sweep_seed: int, prompt: Prompt, repetition: int) -> int:
    """A stable seed from a cell's identity (the sweep's seed, the prompt's set, id and digest, the repetition):
    a blake2b hash, the same on every machine and Python, and independent of the prompt's position in its set."""
    key = json.dumps([sweep_seed, prompt.set_name, prompt.id, prompt.digest, repetition]).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") >> (64 - SEED_BITS)


def default_out(spec: SweepSpec, results_root: Path = Path("results")) -> Path:
    """A deterministic name, so rerunning the same command resumes the same directory."""
    first = Path(spec.models[0]).name if spec.models else spec.endpoints[0].name
    return results_root / f"{first or 'model'}-{spec.digest()}"


def thinking_flag(thinking: str) -> bool | None:
    return {"on": True, "off": False}.get(thinking)




def spec_from_values(values: dict[str, Any], max_tokens_wins: bool = False) -> SweepSpec:
    """A spec from merged command-line and sweep-file values (axis names and `axes.OPTIONS` names; None or
    missing: not given). The server options become endpoints; every value is validated here, before any work.
    `max_tokens_wins`: the user gave --max-tokens (typed or in the sweep file), so it overrides prompt lines'."""
    from .endpoint import endpoints_from_options

    def given(name: str, default: Any = None) -> Any:
        v = values.get(name)
        return default if v is None or v == () else v

    axes = {a.name: given(a.name) for a in AXES}
    opts = {name: OPTION_BY_NAME[name] for name in ("concurrency", "request_timeout", "request_deadline", "retries")}
    server = {name: o.coerce(given(name, o.default), o.flags[0]) for name, o in opts.items()}
    endpoints = endpoints_from_options(given("endpoint", ()), given("served_model", ()), given("api_key_env"),
                                       given("endpoint_mode", ()), server["concurrency"], server["request_timeout"],
                                       server["request_deadline"], server["retries"], given("audit_model"),
                                       given("audit_profile", ())) if given("endpoint") else ()
    if given("audit_model") and not endpoints:
        raise UserError("--audit-model audits servers: give an --endpoint")
    scalars = {}
    for name in ("max_tokens", "repeats", "seed", "prompt_limit", "kv_group_size", "ignore_eos"):
        o = OPTION_BY_NAME[name]
        scalars[name] = o.coerce(given(name, o.default), o.flags[0])
    if given("mtp_from"):
        scalars["mtp_from"] = OPTION_BY_NAME["mtp_from"].coerce(given("mtp_from"), "--mtp-from")
    records = not OPTION_BY_NAME["no_records"].coerce(given("no_records", False), "--no-records")
    return SweepSpec.of(**axes, endpoints=endpoints, records=records, max_tokens_wins=max_tokens_wins, **scalars)
