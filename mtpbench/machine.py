"""The machine's state around a measurement, and whether it was quiet enough to trust (after pyperf's metadata).

A tok/s figure taken on a loaded or throttled machine measures the machine, not the decoder: peers' users lose half
their speed to heat soak. `snapshot()` reads what the OS exposes without root (psutil for load, frequencies and
temperatures; the cpufreq governor from /sys on Linux; `pmset` thermal pressure and low-power mode on macOS) in a
few milliseconds, and says in `notes` what this platform cannot report. `busy_reasons` and `drift_warning` turn
states and ABBA block rates into one-line warnings; the runs table keeps the states (`row_fields`) so a report can
judge them later (`states_from_row`).

Pure Python (psutil, imported lazily): the report and doctor use this where mlx is not installed.
"""

from __future__ import annotations

import math
import os
import platform
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

GOVERNOR = Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
HOT_C = 90.0  # most desktop and server CPUs start throttling in the 90s (Celsius)
SLOW_FREQUENCY = 0.5  # a current frequency under half the maximum: throttled or power-saving
MIN_DRIFT = 0.05  # first and last ABBA blocks closer than 5% are never called a drift (single-run noise)
PMSET_TIMEOUT_S = 1.0

# The runs-table columns a cell's states fill (types in sweep/store.py RUNS); None where not reported.
COLUMNS = ("load_start", "load_end", "cores", "cores_usable", "governor", "cpu_freq_mhz", "cpu_freq_max_mhz",
           "temp_c", "thermal_pressure", "low_power_mode")


@dataclass(frozen=True)
class MachineState:
    """One reading of the machine. None: the platform does not report it (`notes` says which and why)."""

    load_1m: float | None
    cores: int  # logical CPUs
    cores_usable: int  # the CPUs this process may run on (affinity), <= cores
    governor: str | None = None  # Linux cpufreq scaling governor (performance, powersave, schedutil...)
    cpu_freq_mhz: float | None = None  # current frequency (mean over CPUs)
    cpu_freq_max_mhz: float | None = None
    temp_c: float | None = None  # the hottest sensor
    thermal_pressure: str | None = None  # macOS: "nominal" or what pmset reports instead (a warning, a limit)
    low_power_mode: bool | None = None  # macOS Low Power Mode
    notes: tuple[str, ...] = ()


def _load() -> tuple[float | None, str | None]:
    try:
        import psutil

        return float(psutil.getloadavg()[0]), None
    except (ImportError, OSError, AttributeError) as e:
        return None, f"no load average ({type(e).__name__})"


def cores() -> tuple[int, int]:
    """(logical CPUs, the CPUs this process may run on)."""
    cores = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    return cores, usable


def _frequency() -> tuple[float | None, float | None, str | None]:
    try:
        import psutil

        f = psutil.cpu_freq()
    except (ImportError, OSError, AttributeError, NotImplementedError, RuntimeError):
        f = None
    if f is None or not f.current:
        return None, None, "no CPU frequency (not exposed here: a VM, a container or Apple silicon)"
    top = float(f.max) if f.max and f.max >= f.current * 0.5 else None
    return float(f.current), top, None if top else "no maximum CPU frequency (cannot tell throttling)"


def _temperature() -> tuple[float | None, str | None]:
    try:
        import psutil

        sensors = psutil.sensors_temperatures() if hasattr(psutil, "sensors_temperatures") else {}
    except (ImportError, OSError, RuntimeError):
        sensors = {}
    temps = [t.current for entries in sensors.values() for t in entries if t.current and 0 < t.current < 150]
    if not temps:
        why = "macOS has no sensor API without root" if sys.platform == "darwin" else "no sensors visible"
        return None, f"no temperatures ({why})"
    return float(max(temps)), None


def _governor() -> tuple[str | None, str | None]:
    if not sys.platform.startswith("linux"):
        return None, None
    try:
        return GOVERNOR.read_text().strip() or None, None
    except OSError:
        return None, "no cpufreq governor (/sys cpufreq absent: a VM or container)"


def _pmset(*args: str) -> str:
    try:
        return subprocess.run(["pmset", "-g", *args], capture_output=True, text=True,
                              timeout=PMSET_TIMEOUT_S).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def parse_pmset_therm(text: str) -> str | None:
    """`pmset -g therm` -> "nominal", "thermal warning level N" / "performance warning level N" (a level other than
    0 was recorded) or "speed limit N%" (Intel Macs under thermal limits); None when pmset gave nothing."""
    if not text.strip():
        return None
    limit = re.search(r"CPU_Speed_Limit\s*=\s*(\d+)", text)
    if limit and int(limit.group(1)) < 100:
        return f"speed limit {int(limit.group(1))}%"
    for line in text.splitlines():
        m = re.search(r"(thermal|performance) warning level\D*(\d+)", line, re.IGNORECASE)
        if m and not line.strip().startswith("Note: No") and int(m.group(2)) > 0:
            return f"{m.group(1).lower()} warning level {m.group(2)}"
    return "nominal"


def parse_pmset_low_power(text: str) -> bool | None:
    m = re.search(r"\blowpowermode\s+(\d)", text)
    return bool(int(m.group(1))) if m else None


def snapshot() -> MachineState:
    """The machine now (a few ms; no root). Where a reading is unavailable its field is None and a note says why."""
    notes: list[str] = []
    load, note = _load()
    notes += [note] if note else []
    n_cores, usable = cores()
    cur, top, note = _frequency()
    notes += [note] if note else []
    temp, note = _temperature()
    notes += [note] if note else []
    governor, note = _governor()
    notes += [note] if note else []
    pressure = low_power = None
    if sys.platform == "darwin":
        pressure = parse_pmset_therm(_pmset("therm"))
        low_power = parse_pmset_low_power(_pmset())
        notes += [] if pressure else ["no thermal pressure (pmset -g therm gave nothing)"]
    else:
        notes.append(f"no thermal pressure level on {platform.system() or sys.platform} (temperatures instead)")
    return MachineState(load, n_cores, usable, governor, cur, top, temp, pressure, low_power, tuple(notes))


def busy_reasons(start: MachineState, end: MachineState | None = None) -> list[str]:
    """Why a measurement between `start` and `end` may not be trusted (empty: the machine looked quiet): load above
    the logical core count, thermal pressure, low-power mode, a frequency under half its maximum, a hot sensor."""
    out: list[str] = []
    states = [s for s in (start, end) if s is not None]
    loads = [s.load_1m for s in states if s.load_1m is not None]
    if loads and max(loads) > start.cores:
        out.append(f"load {max(loads):.1f} above {start.cores} cores")
    pressures = [s.thermal_pressure for s in states if s.thermal_pressure and s.thermal_pressure != "nominal"]
    if pressures:
        out.append(f"thermal pressure ({pressures[-1]})")
    if any(s.low_power_mode for s in states):
        out.append("low-power mode on")
    slow = [s for s in states if s.cpu_freq_mhz and s.cpu_freq_max_mhz
            and s.cpu_freq_mhz < SLOW_FREQUENCY * s.cpu_freq_max_mhz]
    if slow:
        s = slow[-1]
        out.append(f"CPU at {s.cpu_freq_mhz:.0f} of {s.cpu_freq_max_mhz:.0f} MHz (throttled or power-saving)")
    temps = [s.temp_c for s in states if s.temp_c is not None]
    if temps and max(temps) >= HOT_C:
        out.append(f"CPU at {max(temps):.0f} C")
    return out


def _sd(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def drift_warning(first_block_rates: Sequence[float], last_block_rates: Sequence[float]) -> str | None:
    """Heat soak: the same runs (paired by position: same prompt and mode) in the first and the last ABBA block of
    a cell. Each pair's relative change last/first - 1; a warning when their mean moves by more than their spread
    (standard deviation) and by more than MIN_DRIFT. None when quiet or when there is nothing to pair."""
    pairs = [(a, b) for a, b in zip(first_block_rates, last_block_rates)
             if a is not None and b is not None and math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0]
    if not pairs:
        return None
    changes = [b / a - 1 for a, b in pairs]
    mean, spread = sum(changes) / len(changes), _sd(changes)
    if abs(mean) <= max(spread, MIN_DRIFT):
        return None
    way = "slower" if mean < 0 else "faster"
    return (f"the last ABBA block ran {abs(mean):.0%} {way} than the first (spread {spread:.0%}, {len(pairs)} "
            f"paired runs): heat soak or a change in load")


def row_fields(start: MachineState, end: MachineState) -> dict[str, Any]:
    """A cell's states as runs-table columns: load at both ends, the rest the worse of the two (the lower
    frequency, the hotter sensor, the pressure and low-power mode where either saw them)."""
    def worst(a: Any, b: Any, pick) -> Any:
        got = [x for x in (a, b) if x is not None]
        return pick(got) if got else None

    pressure = end.thermal_pressure if end.thermal_pressure not in (None, "nominal") else \
        start.thermal_pressure if start.thermal_pressure not in (None, "nominal") else \
        end.thermal_pressure or start.thermal_pressure
    return {"load_start": start.load_1m, "load_end": end.load_1m, "cores": end.cores, "cores_usable": end.cores_usable,
            "governor": end.governor or start.governor,
            "cpu_freq_mhz": worst(start.cpu_freq_mhz, end.cpu_freq_mhz, min),
            "cpu_freq_max_mhz": worst(start.cpu_freq_max_mhz, end.cpu_freq_max_mhz, max),
            "temp_c": worst(start.temp_c, end.temp_c, max), "thermal_pressure": pressure,
            "low_power_mode": worst(start.low_power_mode, end.low_power_mode, any)}


def _value(row: Mapping[str, Any], key: str) -> Any:
    v = row.get(key)
    try:
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else v
    except TypeError:
        return v


def states_from_row(row: Mapping[str, Any]) -> tuple[MachineState, MachineState] | None:
    """A runs-table row's (start, end) states, for `busy_reasons`; None for rows written before they were kept."""
    if _value(row, "cores") is None:
        return None
    cores = int(row["cores"])
    usable = int(_value(row, "cores_usable") or cores)
    low = _value(row, "low_power_mode")
    common = dict(cores=cores, cores_usable=usable, governor=_value(row, "governor"))
    start = MachineState(_value(row, "load_start"), **common)
    end = replace(start, load_1m=_value(row, "load_end"), cpu_freq_mhz=_value(row, "cpu_freq_mhz"),
                  cpu_freq_max_mhz=_value(row, "cpu_freq_max_mhz"), temp_c=_value(row, "temp_c"),
                  thermal_pressure=_value(row, "thermal_pressure"), low_power_mode=None if low is None else bool(low))
    return start, end


def cpu_model() -> str:
    """The CPU's name (Linux /proc/cpuinfo, macOS sysctl), else what `platform` knows."""
    if sys.platform.startswith("linux"):
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
    elif sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                 timeout=PMSET_TIMEOUT_S).stdout.strip()
            if out:
                return out
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The CPU's instruction-set flags (Linux /proc/cpuinfo `flags`, sorted; empty elsewhere): what decides whether
    a library built for one CPU runs on this one (AVX-512...)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return ""


def describe(state: MachineState) -> list[str]:
    """One line per reading, for `mtpbench doctor` (what `pyperf system show` prints)."""
    def opt(v: Any, fmt: str) -> str:
        return "not reported" if v is None else fmt.format(v)

    return [f"load (1 min): {opt(state.load_1m, '{:.2f}')} on {state.cores} logical cores "
            f"({state.cores_usable} usable by this process)",
            f"CPU frequency: {opt(state.cpu_freq_mhz, '{:.0f} MHz')} (max {opt(state.cpu_freq_max_mhz, '{:.0f} MHz')}),"
            f" governor {state.governor or 'not reported'}",
            f"temperature (hottest sensor): {opt(state.temp_c, '{:.0f} C')}",
            f"thermal pressure: {state.thermal_pressure or 'not reported'}; low-power mode: "
            f"{opt(state.low_power_mode, '{}')}",
            *(f"note: {n}" for n in state.notes)]
