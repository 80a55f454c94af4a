"""Resume repairs what it finds (issue 32): a damaged part is moved aside and its cell rerun, failed runs are rerun
while the cell's successful ones are kept, seeds come from a cell's identity (adding a prompt never hands out a kept
cell's seed), and an option the user typed wins over the prompt file's defaults."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mtpbench.errors import UserError
from mtpbench.sweep.prompts import load_sets
from mtpbench.sweep.spec import SweepSpec, plan, spec_from_values
from mtpbench.sweep.store import DAMAGED, TABLES, read_table
from tests.test_reliability import _code_prompts, _copy, _quick, done_sweep  # noqa: F401 (a fixture)


def garble(part: Path) -> bytes:
    """Overwrite everything between a parquet file's leading magic and its footer with random bytes: the footer
    (and so `pq.read_metadata`) stays intact, every data page is garbage. Returns the damaged bytes."""
    data = bytearray(part.read_bytes())
    footer = struct.unpack("<I", data[-8:-4])[0]
    rnd = random.Random(0)
    for i in range(4, len(data) - 8 - footer):
        data[i] = rnd.randrange(256)
    part.write_bytes(bytes(data))
    pq.read_metadata(part)  # the footer still reads: only a whole read finds the damage
    with pytest.raises(OSError):
        pq.read_table(part)
    return bytes(data)


@pytest.mark.parametrize("table", list(TABLES))
def test_a_damaged_part_under_an_intact_footer_is_moved_aside_and_its_cell_rerun(cli, tmp_path, done_sweep, tiny,
                                                                                table):
    out = _copy(done_sweep, tmp_path / "res")
    victim = sorted((out / table).glob("part-*.parquet"))[0]
    damaged = garble(victim)
    report = cli("report", out, "-o", tmp_path / "page.html")  # the report warns and skips it
    assert report.exit_code == 0 and victim.name in report.stderr
    res = cli(*_quick(tiny, out, done_sweep.parent / "two.jsonl")[:-1])
    assert res.exit_code == 0, res.stderr
    said = [line for line in res.stderr.splitlines() if "damaged" in line]
    assert len(said) == 1 and victim.name in said[0] and f"{DAMAGED}/{table}" in said[0], res.stderr
    assert (out / DAMAGED / table / victim.name).read_bytes() == damaged  # kept, never deleted
    assert pq.read_table(victim).num_rows > 0  # rewritten whole
    done = 2 if table == "verdicts" else 1  # a verdicts part is recomputed; a cell part reruns its cell
    assert f"resumed: {done} of 2 cells were already done" in res.stdout
    runs = read_table(out, "runs")
    assert len(runs) == 2 * 2 and set(runs["status"]) == {"ok"} and runs["run_id"].is_unique
    for t in TABLES:
        read_table(out, t)  # every table reads whole again
    again = cli(*_quick(tiny, out, done_sweep.parent / "two.jsonl")[:-1])
    assert "damaged" not in again.stderr and "resumed: 2 of 2" in again.stdout


def test_a_failed_k_is_rerun_on_resume_and_the_cells_other_runs_are_kept(cli, tmp_path, tiny, monkeypatch):
    """A run that failed (here K=2, on every prompt) is rerun by the next resume, alone: the same cell's AR and K=1
    runs, and their steps and tokens rows, are kept as they were, so every K ends up on the same prompts."""
    from mtpbench.backends.reference import ReferenceBackend

    prompts = _code_prompts(tmp_path / "p.jsonl", 2)
    out = tmp_path / "res"
    args = _quick(tiny, out, prompts)
    args[args.index("--k") + 1] = "1,2"
    real = ReferenceBackend._decode

    def k2_fails(self, cell, ids, mode, k, *a, **kw):
        if mode == "mtp" and k == 2 and "ignore_eos" not in kw:  # a timed run (the warm-up passes ignore_eos=)
            raise RuntimeError("K=2 broke")
        return real(self, cell, ids, mode, k, *a, **kw)

    monkeypatch.setattr(ReferenceBackend, "_decode", k2_fails)
    assert cli(*args).exit_code == 1
    before = read_table(out, "runs").set_index("run_id")
    assert set(before[before["k"] == 2]["status"]) == {"failed"} and (before[before["k"] != 2]["status"] == "ok").all()
    steps_before = read_table(out, "steps")
    monkeypatch.setattr(ReferenceBackend, "_decode", real)
    res = cli(*args)
    assert res.exit_code == 0, res.stderr
    assert "2 cell(s) have failed runs: rerunning only those" in res.stderr
    after = read_table(out, "runs").set_index("run_id")
    assert len(after) == 2 * 3 and set(after["status"]) == {"ok"}
    kept = before[before["k"] != 2].index
    cols = ["started_at", "decode_s", "output_hash", "order", "seed"]
    assert after.loc[kept, cols].equals(before.loc[kept, cols])  # the same measurements, not new ones
    steps = read_table(out, "steps")
    k1 = set(before[before["k"] == 1].index)
    assert len(steps[steps["run_id"].isin(k1)]) == len(steps_before[steps_before["run_id"].isin(k1)]) > 0
    assert (after[after["k"] == 2]["order"].values == before[before["k"] == 2]["order"].values).all()


def test_adding_a_prompt_never_reuses_a_seed(cli, tmp_path, tiny):
    """Seeds come from (sweep seed, prompt set, id, digest, repetition): a prompt added to the set and a resume give
    the new cells seeds no kept cell has, and leave the kept cells' seeds alone."""
    prompts = _code_prompts(tmp_path / "set.jsonl", 3)
    out = tmp_path / "res"
    args = [a for a in _quick(tiny, out, prompts, "--repeats", "2") if a != "--quiet"]
    assert cli(*args).exit_code == 0
    before = read_table(out, "runs")
    seeds = before.groupby(["prompt_id", "repetition"])["seed"].agg(set)
    assert all(len(s) == 1 for s in seeds) and len({next(iter(s)) for s in seeds}) == 3 * 2
    _code_prompts(prompts, 4)  # p3 added
    res = cli(*args)
    assert res.exit_code == 0 and "resumed: 6 of 8" in res.stdout, res.stderr
    after = read_table(out, "runs")
    pairs = after.groupby(["prompt_id", "repetition"])["seed"].agg(set)
    assert len(pairs) == 4 * 2 and len({next(iter(s)) for s in pairs}) == 4 * 2  # one seed per cell, none shared
    assert all(pairs[k] == seeds[k] for k in seeds.index)


def test_cell_seeds_depend_on_identity_not_position(tmp_path):
    prompts = _code_prompts(tmp_path / "s.jsonl", 5)
    spec = SweepSpec.of(model="unused", prompts=str(prompts), k=1, repeats=3)
    cells = plan(spec, load_sets([str(prompts)]))
    by_id = {(c.prompt.id, c.repetition): c.seed for c in cells}
    assert len(set(by_id.values())) == 5 * 3
    reordered = tmp_path / "r" / "s.jsonl"
    reordered.parent.mkdir()
    reordered.write_text("".join(reversed(prompts.read_text().splitlines(keepends=True))))
    again = plan(SweepSpec.of(model="unused", prompts=str(reordered), k=1, repeats=3), load_sets([str(reordered)]))
    assert {(c.prompt.id, c.repetition): c.seed for c in again} == by_id
    assert all(0 <= s < 2**31 for s in by_id.values())


def test_an_option_the_user_typed_wins_over_prompt_lines():
    """`sweep --max-tokens 64 --prompts stdlib`: stdlib's lines carry their own max_tokens, but the user's wins;
    without the option, the lines' own apply. The spec (manifest) says which rule was used."""
    prompts = load_sets(["stdlib"])
    assert any(p.max_tokens and p.max_tokens != 64 for p in prompts)
    typed = spec_from_values({"model": ("unused",), "prompts": ("stdlib",), "max_tokens": 64}, max_tokens_wins=True)
    assert {c.max_tokens for c in plan(typed, prompts)} == {64}
    assert typed.to_dict()["max_tokens_wins"] is True
    default = spec_from_values({"model": ("unused",), "prompts": ("stdlib",)})
    assert {c.max_tokens for c in plan(default, prompts)} == {p.max_tokens or 128 for p in prompts}
    assert "max_tokens_wins" not in default.to_dict()


def test_a_typed_max_tokens_reaches_every_run(cli, tmp_path, tiny):
    prompts = tmp_path / "own.jsonl"
    prompts.write_text(json.dumps({"id": "p0", "category": "code", "prompt": "def f(x):", "max_tokens": 12}) + "\n")
    base = ["sweep", "-m", tiny, "--k", "1", "--temp", "0", "--repeats", "1", "--prompts", prompts, "--no-report",
            "--quiet", "--ignore-eos"]
    assert cli(*base, "-o", tmp_path / "typed", "--max-tokens", "6").exit_code == 0
    assert cli(*base, "-o", tmp_path / "line").exit_code == 0
    typed, line = read_table(tmp_path / "typed", "runs"), read_table(tmp_path / "line", "runs")
    assert set(typed["max_tokens"]) == {6} and set(typed["generated_tokens"]) == {6}
    assert set(line["max_tokens"]) == {12} and set(line["generated_tokens"]) == {12}
    manifest = json.loads((tmp_path / "typed" / "manifest.json").read_text())
    assert manifest["spec"]["max_tokens_wins"] is True


def test_help_states_the_deadline_and_the_worst_case(cli):
    text = " ".join(cli("sweep", "--help").output.split())
    assert "30 s + 1 s per requested token: 158 s at the default 128" in text
    assert "unhealthy for the rest of the sweep" in text and "one deadline per endpoint" in text


def test_messages_name_what_is_missing_or_wrong(tmp_path, tiny):
    import mlx.core as mx

    from mtpbench.backends.http import RequestFailed, _count
    from mtpbench.model.checkpoint import load

    with pytest.raises(RequestFailed, match=r"not a count in 0\.\.16: got str '12'"):
        _count("12", "completion_tokens", 16)
    ck = _copy(tiny, tmp_path / "missing")
    weights = mx.load(str(ck / "model.safetensors"))
    gone = sorted(k for k in weights if ".layers.0." in k and not k.startswith("mtp"))
    mx.save_safetensors(str(ck / "model.safetensors"), {k: v for k, v in weights.items() if k not in gone},
                        metadata={"format": "mlx"})
    with pytest.raises(UserError) as err:
        load(ck)
    msg = str(err.value)
    assert "Missing" in msg and "parameters: )" not in msg and "layers.0." in msg, msg


def test_a_part_the_user_moved_away_reruns_its_cell(cli, tmp_path, done_sweep, tiny):
    """Issue 32: a tokens part moved away by hand (as an old message told) left a cell 'done' with no token rows;
    a cell missing any of its parts runs again."""
    out = _copy(done_sweep, tmp_path / "res")
    victim = sorted((out / "tokens").glob("part-*.parquet"))[0]
    rows = pq.read_table(victim).num_rows
    victim.rename(tmp_path / victim.name)
    res = cli(*_quick(tiny, out, done_sweep.parent / "two.jsonl")[:-1])
    assert res.exit_code == 0 and "resumed: 1 of 2 cells were already done" in res.stdout, res.stderr
    assert pq.read_table(victim).num_rows == rows > 0
