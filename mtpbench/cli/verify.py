"""`mtpbench verify`: the distribution-preservation tests on a checkpoint; exit 0 not rejected, 1 rejected, 2 bad
input."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import UserError
from .common import friendly


@click.command("verify")
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
@click.option("--tests", default="exact,support,pit,score,conditional,calibration,greedy", show_default=True,
              help="Subset of exact,support,pit,score,conditional,calibration,two_sample,greedy.")
@click.option("--control", default=None, help="Run a deliberately different acceptance rule (see --list-controls).")
@click.option("--list-controls", is_flag=True, help="Print the controls, one per line: NAME negative|positive description.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "-o", default=None, help="Write the evidence (verdicts table) into this results dir.")
@click.option("--quiet", "-q", is_flag=True)
@friendly
def verify_cmd(model, k, temp, top_p, top_k, min_p, draft_temp, samples, tokens, tests, control, list_controls, seed,
               out, quiet):
    """Test that MTP sampling preserves the target distribution; exit 0 not rejected, 1 rejected, 2 bad input.

    Every sampled sequence is rescored by a fresh teacher-forced forward (mlx_lm's own model call): support (no
    impossible token under its own row or the fresh target), randomized PIT (KS) and log-likelihood score against
    the fresh rows, PIT conditional on the token's source (accepted, residual, bonus), acceptance above sum(alpha)
    (impossible for a preserving rule), exact target (enumerated joint of the first tokens, when top-k makes it
    small), two-sample MTP vs AR (opt in), greedy identity. Acceptance below sum(alpha) is its own family (an
    unbiased but different rule fails it); PIT and score on the decoder's own rows and the drift are diagnostics.
    Holm-corrected within each family over the whole run; samples alternate the capture and reforward rollbacks.
    """
    from ..decode.controls import CONTROLS, get_control

    if list_controls:
        for c in CONTROLS.values():
            click.echo(f"{c.name} {c.kind} {c.description}")
        return
    from ..defaults import default_model
    from ..model.checkpoint import load
    from ..sweep.axes import draft_temps, floats, k_values, words
    from ..sweep.spec import Setting
    from ..orchestrate.verify import TESTS, VerifyPlan, report_table, run_verify, total_ticks, write_evidence

    chosen = words(tests, "--tests")
    bad = [t for t in chosen if t not in TESTS]
    if bad:
        raise UserError(f"--tests: unknown test {bad[0]!r}; choose from {', '.join(TESTS)}")
    drafts = draft_temps(draft_temp, "--draft-temp")
    settings = list(dict.fromkeys(Setting(t, top_p, top_k, min_p, d) for t in floats(temp, "--temp")
                                  for d in (drafts if t > 0 else [None])))
    ctl = get_control(control)
    plan = VerifyPlan(ks=k_values(k), settings=tuple(settings), tests=chosen, control=ctl, seed=seed,
                      **({"samples": samples} if samples else {}), **({"tokens": tokens} if tokens else {}))
    if plan.samples < 10 or plan.tokens < 2:
        raise UserError("--samples must be >= 10 and --tokens >= 2")
    bundle = load(model or default_model(), require_mtp=True)
    if quiet:
        report = run_verify(bundle, plan)
    else:
        with click.progressbar(length=total_ticks(plan), label="verify", show_eta=True, file=sys.stderr) as bar:
            report = run_verify(bundle, plan, lambda: bar.update(1))
    click.echo(report_table(report))
    label = f"control {ctl.name} ({ctl.kind})" if ctl else "the exact rule"
    verdict = "REJECTED" if report.rejected else "not rejected"
    click.echo(f"\npreservation of the target distribution with {label}: {verdict} "
               f"(family of {sum(r.family == 'preservation' for g in report.groups for r in g.results)} tests, "
               f"Holm at 0.05)")
    from ..orchestrate.verify import blind_groups

    for g in blind_groups(report):
        click.echo(f"{g.setting.label} K={g.k}: could not see rule errors: only {g.accepted} accepted drafts "
                   f"(acceptance {g.acceptance:.3f}); support, fresh PIT and score still test the state")
    if report.acceptance_differs:
        click.echo("acceptance below sum(alpha): the rule accepts less than the optimal unbiased one")
    rescored = sum(g.rescore_s for g in report.groups)
    if rescored:
        click.echo(f"rescoring against the fresh target: {rescored:.1f} s (outside every decode timing)")
    if out:
        part = write_evidence(Path(out), report, bundle.name, plan, "mtpbench " + " ".join(sys.argv[1:]))
        click.echo(f"evidence: {part}")
    sys.exit(1 if report.rejected else 0)
