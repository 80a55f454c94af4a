"""`mtpbench doctor` on a tiny checkpoint: one verdict line per check, exit 0 exactly when all hold, and a broken
instrument (MTP diverging from AR) fails it. Never asserts a timing: the timing checks may pass or fail here."""

from __future__ import annotations

from dataclasses import replace

NAMES = ("BLAS", "greedy AR = mlx_lm.stream_generate", "greedy MTP K=3 = AR", "counter invariants",
         "prefill/decode split", "cost model", "machine quiet")


def _verdicts(output: str) -> dict[str, str]:
    lines = [ln for ln in output.splitlines() if ln.startswith(("PASS", "FAIL"))]
    return {ln[6:].split(":", 1)[0]: ln[:4] for ln in lines}


def test_doctor_prints_one_verdict_per_check(cli, tiny_agree):
    res = cli("doctor", "--model", tiny_agree)
    verdicts = _verdicts(res.output)
    assert tuple(verdicts) == NAMES, res.output
    for name in ("BLAS", "greedy AR = mlx_lm.stream_generate", "greedy MTP K=3 = AR", "counter invariants"):
        assert verdicts[name] == "PASS", res.output  # deterministic checks: they hold on any machine
    assert res.exit_code == (0 if set(verdicts.values()) == {"PASS"} else 1)
    assert "checks hold" in res.output.splitlines()[-1]


def test_a_broken_decoder_fails_the_doctor(cli, tiny_agree, monkeypatch):
    import mtpbench.perf.doctor as doctor

    real = doctor.generate_mtp

    def off_by_one(*args, **kwargs):
        r = real(*args, **kwargs)
        return replace(r, tokens=[r.tokens[0], (r.tokens[1] + 1) % 300, *r.tokens[2:]])

    monkeypatch.setattr(doctor, "generate_mtp", off_by_one)
    res = cli("doctor", "--model", tiny_agree)
    verdicts = _verdicts(res.output)
    assert verdicts["greedy MTP K=3 = AR"] == "FAIL" and res.exit_code == 1, res.output
    assert "diverges at token 1" in res.output
