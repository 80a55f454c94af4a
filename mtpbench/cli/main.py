"""The `mtpbench` command line: parse, validate, call one library function, print. Nothing else lives here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..model.blas import reexec_with_openblas
from .common import _friendly, int_list
from .server_options import server_options
from ..errors import UserError


def parse_k(text: str) -> list[int]:
    """'1..4' -> [1, 2, 3, 4]; '1,2,4'; '3'."""
    from ..decode import MAX_K

    try:
        if ".." in text:
            lo, hi = (int(x) for x in text.split("..", 1))
            if hi < lo:
                raise UserError(f"--k {text}: empty range (write low..high, e.g. 1..4)")
            ks = list(range(lo, hi + 1))
        else:
            ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--k {text!r}: expected a depth like 3, a list like 1,2,4 or a range like 1..4") from None
    if not ks:
        raise UserError("--k: no depth given")
    bad = [k for k in ks if not 1 <= k <= MAX_K]
    if bad:
        raise UserError(f"--k: depth {bad[0]} is out of range (1..{MAX_K})")
    return sorted(set(ks))


def sampling_options(fn):
    for opt in reversed([
        click.option("--temp", "temperature", type=float, default=0.0, show_default=True, help="Temperature; 0 is greedy."),
        click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus mass (1 disables)."),
        click.option("--top-k", type=int, default=0, show_default=True, help="Top-k (0 disables)."),
        click.option("--min-p", type=float, default=0.0, show_default=True, help="Min-p (0 disables)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Random seed."),
    ]):
        fn = opt(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--blas", type=click.Choice(["openblas", "reference"]), default="openblas", show_default=True,
              help="Linux CPU only: preload OpenBLAS under mlx (fast, same results) or keep mlx's bundled reference BLAS.")
@click.version_option(package_name="mtpbench")
def main(blas: str) -> None:
    """Benchmark and verify native MTP speculative decoding for Qwen3.5/3.6 checkpoints on MLX.

    With no --model, commands use the embedded default: a small Qwen3.5-style model with an MTP head trained on
    the Python standard library, so every command runs offline on a fresh machine.
    """
    # The choice is acted on in `entry()`, before anything loads mlx; here it only documents the option.


def entry() -> None:
    """Console-script entry: preload OpenBLAS (re-executing once) unless `--blas reference`, then run the CLI."""
    argv = sys.argv[1:]
    choice = "openblas"
    for i, a in enumerate(argv):
        if a == "--blas" and i + 1 < len(argv):
            choice = argv[i + 1]
        elif a.startswith("--blas="):
            choice = a.split("=", 1)[1]
    reexec_with_openblas(choice)
    main()


@main.command("make-demo")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Checkpoint dir to write [default: a new dir, results/demo-rebuild]; the shipped one is never "
                   "overwritten unless named.")
@click.option("--prompts-out", type=click.Path(dir_okay=False), default=None,
              help="Where the held-out prompt set goes [default: next to the checkpoint, stdlib.jsonl].")
@click.option("--phase1-steps", type=int, default=None, help="Joint trunk + MTP steps [default: the recipe's].")
@click.option("--phase2-steps", type=int, default=None, help="Head distillation steps [default: the recipe's].")
@_friendly
def make_demo_cmd(out, prompts_out, phase1_steps, phase2_steps):
    """Rebuild the embedded default with its recipe (about 45 minutes on 2 CPU cores, progress shown).

    Runs under the same BLAS set-up as every mtpbench command (OpenBLAS preloaded, one thread on Linux), which
    makes the run deterministic; recipe.json records it. Compare with the shipped one:
    `mtpbench acceptance -m OUT --prompts stdlib` or `mtpbench sweep -m OUT --temp 0`.
    """
    from dataclasses import replace

    from ..build.demo import Recipe, train

    dest = Path(out) if out else Path("results") / "demo-rebuild"
    steps = {"phase1_steps": phase1_steps, "phase2_steps": phase2_steps}
    r = replace(Recipe(), **{k: v for k, v in steps.items() if v})
    train(dest, r, Path(prompts_out) if prompts_out else dest.parent / f"{dest.name}-stdlib.jsonl")
    click.echo(str(dest))


@main.command("make-tiny")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--layers", type=int, default=4, show_default=True, help="Trunk layers (every 2nd is attention).")
@click.option("--hidden", type=int, default=64, show_default=True)
@click.option("--vocab", type=int, default=320, show_default=True, help="Tokenizer size (byte-level BPE, >= 261).")
@click.option("--no-mtp", is_flag=True, help="Write no MTP head (like conversions that strip mtp.*).")
@click.option("--mtp-layout", type=click.Choice(["inline", "sidecar"]), default="inline", show_default=True)
@click.option("--mtp-prefix", default="mtp.", show_default=True,
              help="mtp. | model.mtp. | language_model.mtp. | model.language_model.mtp.")
@click.option("--hf-norms", is_flag=True, help="Raw Hugging Face layout: norms as offsets, HF key names and conv layout.")
@click.option("--shards", type=int, default=1, show_default=True, help="Split the weights into N shards with an index.")
@_friendly
def make_tiny_cmd(out, seed, layers, hidden, vocab, no_mtp, mtp_layout, mtp_prefix, hf_norms, shards):
    """Write a tiny random Qwen3.5 checkpoint with an MTP head to OUT (for tests and experiments)."""
    from ..build.tiny import TinySpec, make_tiny

    try:
        spec = TinySpec(seed=seed, layers=layers, hidden=hidden, vocab=vocab, mtp=not no_mtp, mtp_layout=mtp_layout,
                        mtp_prefix=mtp_prefix, hf_norms=hf_norms, shards=shards)
        path = make_tiny(out, spec)
    except ValueError as e:
        raise UserError(str(e)) from None
    click.echo(str(path))


@main.command("inspect")
@click.argument("model", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_friendly
def inspect_cmd(model, as_json):
    """Describe MODEL (a directory or a cached hub repo id; default: the embedded demo checkpoint)."""
    from ..model.checkpoint import load
    from ..defaults import default_model
    from ..model.describe import describe, describe_text

    info = describe(load(model or default_model()))
    click.echo(json.dumps(info, indent=2) if as_json else describe_text(info))


@main.command("generate")
@click.option("--model", "-m", help="Checkpoint directory or cached repo id (default: embedded demo).")
@click.option("--prompt", "-p", required=True, help="Prompt text.")
@click.option("--chat", is_flag=True, help="Apply the tokenizer's chat template to the prompt.")
@click.option("--ar", "ar_mode", is_flag=True, help="Autoregressive baseline (the default when --k is not given).")
@click.option("--k", type=int, default=None, help="MTP draft depth; speculative decoding when given.")
@click.option("--draft-temp", type=float, default=None, help="Draft temperature (default: same as --temp).")
@sampling_options
@click.option("--max-tokens", type=int, default=128, show_default=True)
@click.option("--num-samples", type=int, default=1, show_default=True, help="Independent samples (seeds seed..seed+N-1).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per sample.")
@_friendly
def generate_cmd(model, prompt, chat, ar_mode, k, draft_temp, temperature, top_p, top_k, min_p, seed, max_tokens,
                 num_samples, as_json):
    """Generate from one prompt with the AR baseline or the reference MTP decoder."""
    from ..model.checkpoint import load
    from ..defaults import default_model
    from ..generation import generate_samples

    if ar_mode and k is not None:
        raise UserError("--ar and --k are exclusive")
    if max_tokens < 1 or num_samples < 1:
        raise UserError("--max-tokens and --num-samples must be >= 1")
    from ..sampling import SamplingConfig

    cfg = SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed)
    if k is not None:
        from ..decode import MAX_K

        if not 1 <= k <= MAX_K:
            raise UserError(f"--k must be between 1 and {MAX_K}, got {k}")
    if draft_temp is not None and draft_temp < 0:
        raise UserError(f"--draft-temp must be >= 0, got {draft_temp}")
    bundle = load(model or default_model(), require_mtp=k is not None)
    for sample in generate_samples(bundle, prompt, cfg, k, max_tokens, num_samples, draft_temp, chat):
        if as_json:
            click.echo(json.dumps(sample))
        else:
            click.echo(sample["text"])


def _floats(text: str, name: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise UserError(f"--{name} {text!r}: expected numbers separated by commas") from None


def _words(text) -> tuple[str, ...]:
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    return tuple(x.strip() for x in items if str(x).strip())


def _read_toml(path: str) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise UserError(f"--config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"--config {path}: invalid TOML ({e})") from None


def _bench_into(out: Path, models: list[str], ks: tuple[int, ...], large: bool, quiet: bool) -> None:
    """`mtpbench bench` per checkpoint into out/bench/<name>/bench.json; a complete one is kept (resume)."""
    import json

    from ..bench import bench_targets, run_bench
    from .bench import safe_name

    for model, settings in bench_targets(models, ks, large):
        where = out / "bench" / safe_name(model)
        done = where / "bench.json"
        if done.exists() and json.loads(done.read_text()).get("complete"):
            continue
        run_bench(model, where, ks, settings, log=None if quiet else (lambda m: click.echo(f"bench: {m}", err=True)))


SWEEP_KEYS = {"model", "k", "temp", "top_p", "top_k", "min_p", "draft_temp", "max_tokens", "repeats", "seed",
              "prompts", "thinking", "prompt_limit", "ignore_eos", "no_records", "out", "policy", "kv_bits",
              "kv_group_size"}


@main.command("sweep")
@click.option("--model", "-m", multiple=True, help="Checkpoint dir or cached repo id; repeat for several (default: embedded demo).")
@click.option("--k", default="1..4", show_default=True, help="Draft depths: 3, 1,2,4 or 1..4.")
@click.option("--temp", default="0,0.6", show_default=True, help="Temperatures, comma-separated (0 = greedy).")
@click.option("--top-p", type=float, default=0.95, show_default=True, help="Nucleus mass for sampled settings.")
@click.option("--top-k", type=int, default=20, show_default=True, help="Top-k for sampled settings (0 disables).")
@click.option("--min-p", type=float, default=0.0, show_default=True)
@click.option("--draft-temp", type=float, default=None, help="Draft temperature (default: the target's).")
@click.option("--max-tokens", type=int, default=128, show_default=True, help="Tokens per run (a prompt line may override).")
@click.option("--repeats", type=int, default=2, show_default=True, help="Repetitions of every cell.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--prompts", default=None, help="Prompt sets by name or .jsonl path, comma-separated "
              "(default: stdlib for the embedded demo, else every bundled set).")
@click.option("--thinking", default="n/a", help="on,off: an axis when the chat template supports enable_thinking.")
@click.option("--policy", default="as-is", show_default=True,
              help="Quantization policies, comma-separated, applied in memory (see `mtpbench policies`).")
@click.option("--kv-bits", default="0", show_default=True,
              help="Trunk KV-cache bits, comma-separated (0: unquantized; 8, 4, ...: mlx_lm's quantized KV cache). "
                   "Each value is an axis point, shown as policy `<policy>+kv8`.")
@click.option("--kv-group-size", type=int, default=0,
              help="Quantization group of the KV cache (default: 64, or what divides the head dim).")
@click.option("--prompt-limit", type=int, default=0, help="Use only the first N prompts of each set (0: all).")
@click.option("--ignore-eos", is_flag=True, help="Generate exactly --max-tokens tokens per run.")
@click.option("--no-records", is_flag=True, help="Skip the steps/tokens tables (no per-cell preservation verdicts).")
@click.option("--out", "-o", default=None, help="Results dir (default: results/<model>-<spec hash>, so reruns resume).")
@click.option("--config", "config_file", default=None, help="TOML sweep file; command-line values override it.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary (for scripts).")
@click.option("--no-report", is_flag=True, help="Do not render the HTML report at the end.")
@click.option("--bench", "bench_models", is_flag=True,
              help="Also run `mtpbench bench` on each checkpoint (cost terms, AR parity with mlx_lm, predicted vs "
                   "realized speedup, roofline, context scaling) into <out>/bench/; the report shows it.")
@click.option("--bench-large", is_flag=True,
              help="With --bench: also bench a generated ~118M-parameter checkpoint, where verify is cheap.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Where cells run: in this process, or one Ray task per (model, policy) group (needs the ray extra).")
@click.option("--ray-address", default=None, metavar="HOST:PORT",
              help="With --executor ray: the cluster's head (e.g. HEAD:6379); default: a local Ray instance.")
@server_options
@click.pass_context
@_friendly
def sweep_cmd(ctx, config_file, quiet, no_report, bench_models, bench_large, executor, ray_address, endpoints, served_models, api_key_env,
              endpoint_modes, concurrency, request_timeout, retries, **cli_values):
    """Sweep checkpoints x K x sampling settings x prompt sets: AR and MTP side by side, into parquet.

    Rerunning the same command resumes: only missing cells run. Results land in results/<name>/ as parquet
    tables (runs, steps, tokens, verdicts) with a manifest; an HTML report is rendered at the end.
    """
    from click.core import ParameterSource

    from ..defaults import DEMO_PROMPT_SET, default_model, is_default_model
    from ..sweep.prompts import available_sets
    from ..sweep.store import read_table
    from ..sweep.run import SweepSpec, default_out, run_sweep

    values = {}
    if config_file:
        values = {k.replace("-", "_"): v for k, v in _read_toml(config_file).items()}
        unknown = sorted(set(values) - SWEEP_KEYS)
        if unknown:
            raise UserError(f"--config {config_file}: unknown key(s) {', '.join(unknown)}")
    for name, v in cli_values.items():
        if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE or name not in values:
            values[name] = v
    from .server_options import endpoints_from_cli

    servers = endpoints_from_cli(endpoints, served_models, api_key_env, endpoint_modes, concurrency, request_timeout,
                                 retries)
    if ray_address and executor != "ray":
        raise UserError("--ray-address needs --executor ray")
    if servers and executor != "local":
        raise UserError("--executor ray runs checkpoints with the reference decoder; --endpoint sweeps measure "
                        "servers from this machine: use one or the other")
    models = tuple(e.name for e in servers) or _words(values["model"]) or (default_model(),)
    prompts = _words(values["prompts"] or "")
    if not prompts:
        prompts = (DEMO_PROMPT_SET,) if all(is_default_model(m) for m in models) else tuple(
            s for s in available_sets() if s != DEMO_PROMPT_SET)
    k_text = values["k"] if isinstance(values["k"], str) else ",".join(str(x) for x in values["k"])
    temps = values["temp"] if isinstance(values["temp"], (list, tuple)) else _floats(values["temp"], "temp")
    spec = SweepSpec(
        models=models, prompts=prompts, ks=tuple(parse_k(k_text)), temps=tuple(float(t) for t in temps),
        top_p=float(values["top_p"]), top_k=int(values["top_k"]), min_p=float(values["min_p"]),
        draft_temp=None if values["draft_temp"] is None else float(values["draft_temp"]),
        max_tokens=int(values["max_tokens"]), repeats=int(values["repeats"]), seed=int(values["seed"]),
        thinking=_words(values["thinking"]) or ("n/a",), prompt_limit=int(values["prompt_limit"]),
        ignore_eos=bool(values["ignore_eos"]), records=not values["no_records"],
        policies=_words(values["policy"]) or ("as-is",), kv_bits=int_list(values["kv_bits"], "--kv-bits"),
        kv_group_size=int(values["kv_group_size"]),
    )
    out = Path(values["out"]) if values["out"] else default_out(spec)
    command = "mtpbench " + " ".join(sys.argv[1:]) if sys.argv[0].endswith(("mtpbench", "cli.py", "__main__.py")) else ""
    bar = None

    def progress(ev):
        nonlocal bar
        if quiet:
            return
        if bar is None:
            bar = click.progressbar(length=ev.total, label="sweep", show_eta=True, show_pos=True,
                                    item_show_func=lambda s: s, file=sys.stderr)
            bar.__enter__()
        bar.update(1, f"{ev.label}: {ev.tok_s:.1f} tok/s")

    try:
        if servers:
            from ..backends.server import run_server_sweep

            outcome = run_server_sweep(spec, servers, out, None if quiet else click.echo, command)
        else:
            outcome = run_sweep(spec, out, command or f"mtpbench sweep --k {k_text}", progress, executor=executor,
                                ray_address=ray_address)
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    if not quiet:
        if outcome.cells_skipped:
            click.echo(f"resumed: {outcome.cells_skipped} of {outcome.cells_total} cells were already done")
        from ..report.console import sweep_summary

        click.echo(sweep_summary(read_table(out, "runs")))
    click.echo(f"results: {out}")
    if bench_models and not servers:
        _bench_into(out, list(spec.models), spec.ks, bench_large, quiet)
    if not no_report:
        from ..report.html import render_report

        report = render_report([out], Path("reports") / f"{out.name}.html")
        click.echo(f"report: {report}")
    if outcome.failed_runs:
        click.echo(f"{len(outcome.failed_runs)} run(s) failed, e.g. {outcome.failed_runs[0]}", err=True)
        sys.exit(1)


@main.command("report")
@click.argument("results_dirs", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--out", default=None, help="HTML file (default: reports/<first results dir>.html).")
@click.option("--title", default=None)
@_friendly
def report_cmd(results_dirs, out, title):
    """Render one self-contained HTML report from one or more results dirs (they merge into one comparison)."""
    from ..report import render_report

    dirs = [Path(d) for d in results_dirs]
    path = render_report(dirs, Path(out) if out else Path("reports") / f"{dirs[0].name}.html", title=title)
    click.echo(str(path))


@main.command("card")
@click.argument("results_dir", type=click.Path())
@click.option("--model", "-m", default=None, help="Model name in the results (needed when there are several).")
@click.option("--format", "fmt", type=click.Choice(["markdown", "json"]), default="markdown", show_default=True)
@click.option("-o", "--out", default=None, help="Write to a file instead of stdout.")
@_friendly
def card_cmd(results_dir, model, fmt, out):
    """Model-card tables (Mode | tok/s | speedup, acceptance by depth, verdict, formats), ready to paste."""
    from ..report import render_card

    text = render_card(Path(results_dir), model=model, fmt=fmt)
    if out:
        Path(out).write_text(text)
        click.echo(out)
    else:
        click.echo(text)


def _verify_table(report) -> str:
    import pandas as pd

    rows = []
    for g in report.groups:
        for r in g.results:
            rows.append({"setting": g.setting.label, "K": g.k, "test": r.test, "family": r.family, "n": r.n,
                         "statistic": f"{r.statistic:.4g}", "p": f"{r.p_value:.3g}", "p (Holm)": f"{r.p_holm:.3g}",
                         "detectable": f"{r.detectable:.3g} {r.unit}" if r.detectable == r.detectable else "-",
                         "verdict": "REJECTED" if r.rejected() else ("n/a" if r.p_value != r.p_value else "ok"),
                         "acceptance (expected)": f"{g.acceptance:.3f} ({g.expected_acceptance:.3f})"})
    return pd.DataFrame(rows).to_string(index=False)


@main.command("verify")
@click.option("--model", "-m", help="Checkpoint dir or cached repo id (default: embedded demo).")
@click.option("--k", default="1..4", show_default=True, help="Draft depths: 3, 1,2,4 or 1..4.")
@click.option("--temp", default="0,0.6,1.0", show_default=True, help="Temperatures, comma-separated (0: greedy identity).")
@click.option("--top-p", type=float, default=0.95, show_default=True)
@click.option("--top-k", type=int, default=20, show_default=True, help="<= 10 also enables the exact target test.")
@click.option("--min-p", type=float, default=0.0, show_default=True)
@click.option("--draft-temp", default="same", show_default=True,
              help="Draft temperatures, comma-separated; 'same' = the target's. Each is crossed with --temp.")
@click.option("--samples", type=int, default=None, help="Sequences per (setting, K) [default: 150].")
@click.option("--tokens", type=int, default=None, help="Tokens per sequence [default: 12].")
@click.option("--tests", default=",".join(("exact", "pit", "score", "calibration", "greedy")), show_default=True,
              help="Subset of exact,pit,score,calibration,two_sample,greedy.")
@click.option("--control", default=None, help="Run a deliberately different acceptance rule (see --list-controls).")
@click.option("--list-controls", is_flag=True, help="Print the controls, one per line: NAME negative|positive description.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "-o", default=None, help="Write the evidence (verdicts table) into this results dir.")
@click.option("--quiet", "-q", is_flag=True)
@_friendly
def verify_cmd(model, k, temp, top_p, top_k, min_p, draft_temp, samples, tokens, tests, control, list_controls, seed,
               out, quiet):
    """Test that MTP sampling preserves the target distribution; exit 0 not rejected, 1 rejected, 2 bad input.

    Tests: exact target (enumerated joint of the first tokens, when top-k makes it small), randomized PIT (KS),
    log-likelihood score z-test, acceptance calibration against sum(alpha) (its own family: an unbiased but
    different rule fails it without failing preservation), two-sample MTP vs AR (opt in), greedy identity.
    Holm-corrected within each family over the whole run.
    """
    from ..decode.controls import CONTROLS, get_control

    if list_controls:
        for c in CONTROLS.values():
            click.echo(f"{c.name} {c.kind} {c.description}")
        return
    from ..model.checkpoint import load
    from ..defaults import default_model
    from ..sweep.run import Setting
    from ..verify import TESTS, VerifyPlan, run_verify, total_ticks, verdict_rows

    chosen = _words(tests)
    bad = [t for t in chosen if t not in TESTS]
    if bad:
        raise UserError(f"--tests: unknown test {bad[0]!r}; choose from {', '.join(TESTS)}")
    drafts = [None if d == "same" else float(d) for d in _words(draft_temp)]
    if any(d is not None and d < 0 for d in drafts):
        raise UserError("--draft-temp must be >= 0")
    settings = []
    for t in _floats(temp, "temp"):
        for d in (drafts if t > 0 else [None]):
            s = Setting(t, top_p, top_k, min_p, d)
            s.config(0)
            if s not in settings:
                settings.append(s)
    ctl = get_control(control)
    plan = VerifyPlan(ks=tuple(parse_k(k)), settings=tuple(settings), tests=chosen, control=ctl, seed=seed,
                      **({"samples": samples} if samples else {}), **({"tokens": tokens} if tokens else {}))
    if plan.samples < 10 or plan.tokens < 2:
        raise UserError("--samples must be >= 10 and --tokens >= 2")
    bundle = load(model or default_model(), require_mtp=True)
    if quiet:
        report = run_verify(bundle, plan)
    else:
        with click.progressbar(length=total_ticks(plan), label="verify", show_eta=True, file=sys.stderr) as bar:
            report = run_verify(bundle, plan, lambda: bar.update(1))
    click.echo(_verify_table(report))
    label = f"control {ctl.name} ({ctl.kind})" if ctl else "the exact rule"
    verdict = "REJECTED" if report.rejected else "not rejected"
    click.echo(f"\npreservation of the target distribution with {label}: {verdict} "
               f"(family of {sum(r.family == 'preservation' for g in report.groups for r in g.results)} tests, "
               f"Holm at 0.05)")
    if report.acceptance_differs:
        click.echo("acceptance differs from sum(alpha): the rule is not the optimal unbiased one")
    if out:
        from ..sweep.store import write_json, write_part
        from ..provenance import now_iso, provenance

        root = Path(out)
        if not (root / "manifest.json").exists():
            write_json(root / "manifest.json", {"schema_version": 1, "name": root.name, "created_at": now_iso(),
                                                "command": "mtpbench " + " ".join(sys.argv[1:]), "spec": {},
                                                "provenance": provenance(), "models": {}})
        import hashlib

        part = "verify-" + hashlib.sha1(repr((bundle.name, plan)).encode()).hexdigest()[:12]
        write_part(root, "verdicts", part, verdict_rows(report, bundle.name, ctl))
        click.echo(f"evidence: {root / 'verdicts' / ('part-' + part + '.parquet')}")
    sys.exit(1 if report.rejected else 0)


@main.command("acceptance")
@click.option("--model", "-m", help="Checkpoint dir or cached repo id (default: embedded demo).")
@click.option("--prompts", default=None, help="Prompt sets (names or .jsonl paths) whose text is scanned.")
@click.option("--text", "text_file", default=None, type=click.Path(), help="A text file to scan instead.")
@sampling_options
@_friendly
def acceptance_cmd(model, prompts, text_file, temperature, top_p, top_k, min_p, seed):
    """Teacher-forced depth-1 acceptance scan: one trunk and one MTP pass per text, no decoding.

    Prints, per category, the greedy draft-match rate and the mean alpha = sum min(p, q) at the given sampling
    settings: the acceptance a decoder would see at depth 1 on such text, orders of magnitude faster.
    """
    import pandas as pd

    from ..model.checkpoint import load
    from ..decode.scan import scan
    from ..defaults import DEMO_PROMPT_SET, default_model, is_default_model
    from ..sweep.prompts import encode, load_sets
    from ..sampling import SamplingConfig

    cfg = SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed)
    model = model or default_model()
    bundle = load(model, require_mtp=True)
    if text_file:
        try:
            texts = [("text", Path(text_file).name, list(bundle.tokenizer.encode(Path(text_file).read_text())))]
        except OSError as e:
            raise UserError(f"--text {text_file}: {e.strerror}") from None
    else:
        names = _words(prompts or "") or ((DEMO_PROMPT_SET,) if is_default_model(model) else ("code", "chat"))
        texts = [(p.category, p.id, encode(bundle.tokenizer, p, None)) for p in load_sets(list(names))]
    rows = []
    for category, name, ids in texts:
        if len(ids) < 3:
            continue
        s = scan(bundle, ids, cfg)
        rows.append({"category": category, "positions": len(s.match), "greedy_match": s.match.mean(),
                     "alpha": s.alpha.mean(), "matches": int(s.match.sum())})
    if not rows:
        raise UserError("no text long enough to scan (3 tokens or more)")
    df = pd.DataFrame(rows)
    g = df.groupby("category").agg(texts=("positions", "size"), positions=("positions", "sum"),
                                   matches=("matches", "sum"), alpha=("alpha", "mean"))
    g["greedy_match"] = g["matches"] / g["positions"]
    click.echo(f"depth-1 teacher-forced acceptance of {bundle.name} ({cfg.label()} for alpha)")
    click.echo(g[["texts", "positions", "greedy_match", "alpha"]].round(4).to_string())


from .bench import bench_cmd  # noqa: E402
from .models import graft_cmd, policies_cmd, quantize_cmd  # noqa: E402

main.add_command(bench_cmd)
main.add_command(policies_cmd)
main.add_command(quantize_cmd)
main.add_command(graft_cmd)

if __name__ == "__main__":
    entry()
