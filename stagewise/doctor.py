"""Every check worth making before a long run, each problem on one line with its fix.

    findings = diagnose(cfg, Launch(processes=8, machines=2, machine_rank=0, main_ip="10.0.0.1"))
    for f in findings: print(f.line())    # "FAIL memory: the peak is 91.2 GiB per device ... -> ..."

`stagewise doctor CONFIG` prints them; `launch` and `slurm` refuse to start when one fails. Unlike
preflight (which stops at a config's first error), every check runs, so one call lists everything.
``selftest`` runs all-reduce, barrier and broadcast between 2 processes on the run's backend.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from stagewise.config import RunConfig
from stagewise.errors import StagewiseError

GIB = 1024**3


@dataclass(frozen=True)
class Finding:
    check: str
    ok: bool
    message: str  # what was checked, or the problem and its fix ("... -> fix")
    skipped: bool = False
    warn: bool = False  # worth a look, but runs can be right to do it (ok stays True: nothing is refused)

    def line(self) -> str:
        status = "skip" if self.skipped else "warn" if self.warn else ("ok  " if self.ok else "FAIL")
        return f"{status} {self.check}: {self.message}"


@dataclass
class Launch:
    """How the run is to be started (launch / slurm flags)."""

    processes: int = 1  # per machine
    machines: int = 1
    machine_rank: int = 0
    main_ip: str = "127.0.0.1"
    main_port: int = 29500
    device_memory: float | None = None  # bytes per device; None: the visible GPU's, if any
    prompt_tokens: int | None = None

    @property
    def world(self) -> int:
        return self.processes * self.machines


@dataclass
class Context:
    cfg: RunConfig
    launch: Launch
    cache: dict = field(default_factory=dict)

    def domains(self) -> tuple[list, list[str]]:
        """(the domains that could be built, one problem line per domain that could not)."""
        if "domains" not in self.cache:
            import stagewise.builtins  # noqa: F401  (the built-in domains, as preflight registers them)
            from stagewise.continual.preflight import import_plugins
            from stagewise.domains.base import build_domain

            import_plugins(self.cfg)
            built, problems = [], []
            for i, spec in enumerate(self.cfg.domains):
                try:
                    built.append(build_domain(spec, self.cfg.seed, on_error=self.cfg.data.on_error,
                                              where=f"domains.{i}"))
                except StagewiseError as e:
                    problems.append(str(e).splitlines()[0])
            self.cache["domains"] = (built, problems)
        return self.cache["domains"]

    def prompt_tokens(self) -> tuple[int | None, str]:
        if "prompt" not in self.cache:
            if self.launch.prompt_tokens:
                self.cache["prompt"] = (self.launch.prompt_tokens, "given")
            else:
                from stagewise.planning.prompts import measure_prompts

                self.cache["prompt"] = measure_prompts(self.cfg, self.domains()[0])
        return self.cache["prompt"]

    def shape(self):
        if "shape" not in self.cache:
            from stagewise.planning.shapes import model_shape, read_model_config

            config = read_model_config(self.cfg.model.name_or_path, self.cfg.model.trust_remote_code)
            lora = self.cfg.model.lora
            self.cache["shape"] = (config, model_shape(config, self.cfg.model.name_or_path, lora.r if lora else 0,
                                                       tuple(lora.target_modules) if lora else ()))
        return self.cache["shape"]

    def device_memory(self) -> float | None:
        if self.launch.device_memory:
            return self.launch.device_memory
        import torch

        if self.cfg.dist.cpu is not True and torch.cuda.is_available():
            return float(torch.cuda.get_device_properties(0).total_memory)
        return None


# --- the checks --------------------------------------------------------------------------------

def check_shapes(ctx: Context) -> list[Finding]:
    """Names, strategy, and every stage's batch / group / process divisibility for the world size."""
    from stagewise.continual.preflight import check_config

    try:
        check_config(ctx.cfg, ctx.launch.world)
    except StagewiseError as e:
        return [Finding("config", False, str(e).splitlines()[0])]
    return [Finding("config", True, f"names, strategy and batch shapes check for {ctx.launch.world} process(es)")]


def check_precision(ctx: Context) -> list[Finding]:
    import torch

    from stagewise.machine import cpu_bf16, cpu_flags, cpu_has_bf16
    from stagewise.parallel.runtime import on_cpu

    mp = ctx.cfg.dist.mixed_precision
    if mp == "auto":
        from stagewise.parallel.runtime import resolve_precision

        return [Finding("precision", True, resolve_precision(ctx.cfg.dist)[1].removeprefix("dist.mixed_precision="))]
    if on_cpu(ctx.cfg.dist):
        if mp == "fp16":
            return [Finding("precision", False, "dist.mixed_precision=fp16 on CPU: no loss scaling there -> "
                                                "dist.mixed_precision=bf16 (or no)")]
        if mp == "bf16" and not cpu_has_bf16(cpu_flags()):
            # slow, not wrong (a run may want bf16's numbers on a CPU): a warning, the launch goes on
            return [Finding("precision", True, "bf16 on a CPU without AMX / AVX-512 BF16 is emulated (far slower "
                                               "than fp32) -> dist.mixed_precision=auto (or no)", warn=True)]
        return [Finding("precision", True, f"{mp} on CPU (bf16 in hardware: {cpu_bf16(cpu_flags())})")]
    if mp == "bf16" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(0)
        return [Finding("precision", False, f"{name} has no bf16 -> dist.mixed_precision=fp16")]
    return [Finding("precision", True, f"{mp} on {torch.cuda.get_device_name(0)}")]


def check_memory(ctx: Context) -> list[Finding]:
    from stagewise.planning.plan import RESERVED, plan_run
    from stagewise.planning.prompts import environment_names

    memory = ctx.device_memory()
    if memory is None:
        return [Finding("memory", True, "no device memory known (CPU run, or pass --device-memory)", skipped=True)]
    config, shape = ctx.shape()
    prompt, _ = ctx.prompt_tokens()
    plans = plan_run(ctx.cfg, shape, config, world=ctx.launch.world, prompt_tokens=prompt or 1024,
                     environments=environment_names(ctx.domains()[0]), device_memory=memory)
    worst = max(plans, key=lambda p: p.peak.total)
    peak, room = worst.peak.total, memory - RESERVED - worst.peak.total
    if room < 0:
        return [Finding("memory", False, f"stage {worst.index + 1} ({worst.name}) needs {peak / GIB:.1f} GiB "
                                         f"per device in its {worst.peak.name} phase, {-room / GIB:.1f} GiB more than "
                                         f"{memory / GIB:.1f} GiB allows -> stagewise plan CONFIG --recommend "
                                         f"(a sharding strategy, offload, gradient checkpointing or smaller "
                                         f"micro-batches)")]
    return [Finding("memory", True, f"peak {peak / GIB:.1f} GiB per device (stage {worst.index + 1}, "
                                    f"{worst.peak.name}) of {memory / GIB:.1f} GiB")]


def check_rendezvous(ctx: Context) -> list[Finding]:
    launch = ctx.launch
    if launch.machines == 1:
        return [Finding("rendezvous", True, "one machine (local rendezvous)")]
    out = []
    if launch.main_ip in ("127.0.0.1", "localhost", "0.0.0.0"):
        # right for "machines" on one host (a loopback test of a multi-node launch), wrong across hosts
        out.append(Finding("rendezvous", True, f"{launch.machines} machines but --main-process-ip {launch.main_ip}: "
                                               "machines on other hosts cannot reach it -> the main machine's "
                                               "address", warn=True))
    else:
        try:
            socket.getaddrinfo(launch.main_ip, launch.main_port)
        except OSError as e:
            out.append(Finding("rendezvous", False, f"--main-process-ip {launch.main_ip} does not resolve ({e}) -> "
                                                    "an address every machine can reach"))
    if not 1024 <= launch.main_port <= 65535:
        out.append(Finding("rendezvous", False, f"--main-process-port {launch.main_port} -> a port in 1024-65535"))
    elif launch.machine_rank == 0:
        with socket.socket() as s:
            try:
                s.bind(("", launch.main_port))
            except OSError:
                out.append(Finding("rendezvous", False, f"port {launch.main_port} is in use on this (main) machine -> "
                                                        "another --main-process-port"))
    if launch.machine_rank >= launch.machines:
        out.append(Finding("rendezvous", False, f"--machine-rank {launch.machine_rank} with {launch.machines} machines "
                                                f"-> 0 .. {launch.machines - 1}"))
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        if var in os.environ:
            out.append(Finding("rendezvous", False, f"{var}={os.environ[var]} is set in this shell and overrides the "
                                                    f"launcher's -> unset {var}"))
    return out or [Finding("rendezvous", True, f"{launch.machines} machines via {launch.main_ip}:{launch.main_port}")]


def check_timeout(ctx: Context) -> list[Finding]:
    timeout = ctx.cfg.dist.timeout_s
    if ctx.launch.world > 1 and timeout < 300:
        return [Finding("timeout", True, f"dist.timeout_s={timeout}: ranks wait at a barrier while the main process "
                                         f"writes a checkpoint or evaluates; a slow one then kills the run -> "
                                         f"dist.timeout_s=1800", warn=True)]
    return [Finding("timeout", True, f"collective timeout {timeout} s")]


def check_data(ctx: Context) -> list[Finding]:
    built, problems = ctx.domains()
    if problems:
        return [Finding("data", False, p) for p in problems]
    return [Finding("data", True, f"{len(built)} domain(s) read")]


def _existing_parent(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def check_output(ctx: Context) -> list[Finding]:
    out = Path(ctx.cfg.output_dir)
    parent = _existing_parent(out)
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".stagewise-doctor-"):
            pass
    except OSError as e:
        return [Finding("output", False, f"output_dir {out}: cannot write in {parent} ({e.strerror}) -> "
                                         f"output_dir=<a writable directory>")]
    return [Finding("output", True, f"{out} writable")]


def checkpoint_bytes(ctx: Context) -> float:
    """One checkpoint: fp32 weights and AdamW's two moments (trainable parameters), the exported model."""
    _, shape = ctx.shape()
    return 4.0 * shape.params + 8.0 * shape.trainable + 2.0 * shape.params


def check_disk(ctx: Context) -> list[Finding]:
    keep = ctx.cfg.checkpoint.keep_last
    try:
        need = checkpoint_bytes(ctx) * (keep + 1)  # the one being written beside keep_last older ones
    except StagewiseError as e:
        return [Finding("disk", True, f"checkpoint size unknown ({str(e).splitlines()[0]})", skipped=True)]
    free = shutil.disk_usage(_existing_parent(Path(ctx.cfg.output_dir))).free
    if free < need:
        return [Finding("disk", False, f"{free / GIB:.1f} GiB free under {ctx.cfg.output_dir}, checkpoint.keep_last="
                                       f"{keep} needs ~{need / GIB:.1f} GiB -> free space, another output_dir or "
                                       f"a lower checkpoint.keep_last")]
    return [Finding("disk", True, f"{free / GIB:.1f} GiB free, ~{need / GIB:.1f} GiB needed for {keep}+1 checkpoints")]


def check_vllm(ctx: Context) -> list[Finding]:
    wants = ctx.cfg.rollout.engine == "vllm" or ctx.cfg.eval_engine == "vllm" or any(
        st.rollout.get("engine") == "vllm" for st in ctx.cfg.stages)
    if not wants:
        return [Finding("vllm", True, "not used")]
    if importlib.util.find_spec("vllm") is None:
        return [Finding("vllm", False, "rollout.engine=vllm but vllm is not installed -> pip install vllm "
                                       "(or rollout.engine=local)")]
    return [Finding("vllm", True, "installed")]


def check_context(ctx: Context) -> list[Finding]:
    prompt, note = ctx.prompt_tokens()
    if prompt is None:
        return [Finding("context", True, note, skipped=True)]
    from stagewise.planning.prompts import environment_names

    config, shape = ctx.shape()
    limit = shape.max_positions
    environments = environment_names(ctx.domains()[0])
    out = []
    for i, st in enumerate(ctx.cfg.stages):
        if st.kind not in ("grpo", "rft"):
            continue
        rollout = ctx.cfg.stage_part(i, "rollout")
        env = any(d in environments for d in st.domains)
        more = rollout.max_episode_tokens if env else rollout.max_new_tokens
        if limit and prompt + more > limit:
            out.append(Finding("context", False, f"stage {i + 1}: the longest prompt ({prompt} tokens) + "
                                                 f"{more} generated exceed the model's {limit} positions -> "
                                                 f"lower rollout.max_new_tokens / max_episode_tokens"))
    return out or [Finding("context", True, f"longest prompt {prompt} tokens, model context {limit}")]


CHECKS: list[Callable[[Context], list[Finding]]] = [
    check_shapes, check_precision, check_data, check_output, check_vllm, check_rendezvous, check_timeout,
    check_context, check_memory, check_disk]


def diagnose(cfg: RunConfig, launch: Launch, skip: tuple[str, ...] = ()) -> list[Finding]:
    """Every check (but those named in skip); one that cannot run (a model config not here) is
    reported as skipped, not raised."""
    ctx = Context(cfg, launch)
    findings: list[Finding] = []
    for check in CHECKS:
        name = check.__name__.removeprefix("check_")
        if name in skip:
            continue
        try:
            findings += check(ctx)
        except StagewiseError as e:
            findings.append(Finding(name, True, f"could not check: {str(e).splitlines()[0]}", skipped=True))
    return findings


# --- the collective self-test ------------------------------------------------------------------

def _selftest_worker(rank: int, world: int, port: int, backend: str, queue) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    times = {}
    t0 = time.perf_counter()
    dist.init_process_group(backend, rank=rank, world_size=world)
    times["init"] = time.perf_counter() - t0
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    x = torch.full((1 << 20,), float(rank + 1), device=device)  # 4 MB
    ok = True
    for name, op in (("all_reduce", lambda: dist.all_reduce(x)), ("barrier", dist.barrier),
                     ("broadcast", lambda: dist.broadcast(x, src=0))):
        t = time.perf_counter()
        op()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times[name] = time.perf_counter() - t
        if name == "all_reduce":
            ok = ok and float(x[0]) == world * (world + 1) / 2
    dist.destroy_process_group()
    queue.put((rank, ok, times))


def selftest(backend: str | None = None, world: int = 2, timeout: float = 120.0) -> list[Finding]:
    import torch
    import torch.multiprocessing as mp

    backend = backend or ("nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world else "gloo")
    from stagewise.parallel.runtime import _free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_selftest_worker, args=(r, world, port, backend, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    deadline = time.time() + timeout
    try:
        while len(results) < world and time.time() < deadline:
            try:
                rank, ok, times = queue.get(timeout=1.0)
                results[rank] = (ok, times)
            except Exception:  # noqa: BLE001  (queue.Empty: keep waiting while the workers live)
                if not any(p.is_alive() for p in procs) and queue.empty():
                    break
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    if len(results) < world:
        return [Finding("selftest", False, f"{backend}: {world - len(results)} of {world} processes did not finish "
                                           f"within {timeout:.0f} s -> NCCL_DEBUG=INFO, "
                                           f"TORCH_DISTRIBUTED_DEBUG=DETAIL "
                                           f"and the interface (NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME)")]
    ok = all(r[0] for r in results.values())
    slowest = {k: max(r[1][k] for r in results.values()) for k in results[0][1]}
    timing = ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in slowest.items())
    if not ok:
        return [Finding("selftest", False, f"{backend}: all-reduce gave a wrong sum ({timing})")]
    return [Finding("selftest", True, f"{backend}, {world} processes: {timing}")]
