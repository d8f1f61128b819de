"""The planner's tables as text: per stage and phase, and the recommendation per device count.

    print(format_plans(plans, device_memory=80 * GIB))
    print(format_recommendation(choices, device_memory=80 * GIB))
"""

from __future__ import annotations

from stagewise.planning.plan import GIB, RESERVED, Choice, StagePlan


def gib(b: float) -> str:
    return f"{b / GIB:.2f}"


def format_plans(plans: list[StagePlan], device_memory: float | None = None) -> str:
    lines = []
    for plan in plans:
        strategy = plan.strategy + (f" + offload {plan.offload}" if plan.offload != "none" else "")
        lines.append(f"stage {plan.index + 1} {plan.name} ({plan.kind}): {strategy} on {plan.world} process(es); "
                     f"micro-batch {plan.rows} rows = {plan.tokens} tokens per forward, {plan.micro_batches} per step"
                     f"{', gradient checkpointing' if plan.checkpointing else ''}")
        width = max(len(name) for ph in plan.phases for name in ph.device) + 2
        for phase in plan.phases:
            lines.append(f"  {phase.name:<8} {'GiB/device':>10}")
            for name, b in sorted(phase.device.items(), key=lambda kv: -kv[1]):
                lines.append(f"    {name:<{width}} {gib(b):>8}")
            lines.append(f"    {'total':<{width}} {gib(phase.total):>8}")
            for name, b in phase.host.items():
                lines.append(f"    {'host: ' + name:<{width}} {gib(b):>8}")
        peak = plan.peak
        verdict = ""
        if device_memory:
            room = device_memory - RESERVED - peak.total
            verdict = (f"; fits {gib(device_memory)} GiB with {gib(room)} GiB to spare" if room >= 0 else
                       f"; does NOT fit {gib(device_memory)} GiB: {gib(-room)} GiB short "
                       f"({gib(RESERVED)} GiB kept for the CUDA context and NCCL)")
        lines.append(f"  peak {gib(peak.total)} GiB/device ({peak.name}){verdict}; "
                     f"communication {plan.comm_bytes / 1e9:.2f} GB sent per process per step")
        lines += [f"  note: {n}" for n in plan.notes]
        lines.append("")
    return "\n".join(lines)


def format_recommendation(choices: list[Choice], device_memory: float) -> str:
    lines = [f"devices of {gib(device_memory)} GiB: strategies that fit, fastest first (peak GiB/device)"]
    for n in sorted({c.devices for c in choices}):
        row = [c for c in choices if c.devices == n]
        ok = [c for c in row if c.fits]
        label = lambda c: c.strategy + ("+" + c.offload.replace("optimizer_and_params", "opt+params")  # noqa: E731
                                        .replace("optimizer", "opt") if c.offload != "none" else "")
        if ok:
            lines.append(f"  {n:>2}: " + ", ".join(f"{label(c)} {gib(c.peak)}" for c in ok))
        else:
            best = min(row, key=lambda c: c.peak)
            lines.append(f"  {n:>2}: nothing fits (least: {label(best)} {gib(best.peak)})")
    return "\n".join(lines)


def parse_memory(text: str) -> float:
    """'80GB' (10^9 bytes), '80GiB' (2^30), '512MiB', or a bare number of GiB -> bytes."""
    import re

    from stagewise.errors import ConfigError

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"--device-memory {text!r}: expected a size such as 80GB, 80GiB or 141GB")
    value, unit = float(m.group(1)), (m.group(2) or "GiB")
    power = "KMGT".index(unit[0].upper()) + 1
    return value * (1024**power if "i" in unit.lower() else 1000**power)
