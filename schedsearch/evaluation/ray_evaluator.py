"""Score schedules on a Ray cluster: an `ActorPool` of workers, each holding the model, the calibration set and the
objective models once; candidates go to workers as they free up and results stream back to the driver (which alone
writes the store). A worker that dies mid-candidate is replaced and the candidate retried up to `max_retries` times;
a candidate that still fails comes back as status "failed" with its error, never dropped.

Workers run the same `LocalEvaluator` code (same seeds, same noise), so a study gives the same records either way.
Schedules travel as JSON strings and results as plain dicts; `Evaluation` objects are rebuilt on the driver.

With `share_prefixes`, a batch's static cache plans of one solver plan are sorted by their rows and cut into one
contiguous run per worker: each worker evaluates its run as a prefix tree (`runtime/prefix_tree.py`) and keeps its
states for its later runs, so neighbouring plans, which share the longest prefixes, share them on one worker.
If a worker dies, each candidate of its run is retried as a task of its own, so a candidate that kills its worker
cannot take its neighbours' retries with it.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

from schedsearch.errors import SchedsearchError
from schedsearch.spaces.schedule import Schedule

__all__ = ["RayEvaluator", "SleepEvaluator", "WorkerDied", "evaluation_to_dict", "start_local_ray"]


def start_local_ray(num_cpus: int, num_gpus: int | None = None, include_dashboard: bool = False,
                    log_to_driver: bool = True) -> None:
    """Start a single-node Ray bound to 127.0.0.1 (GCS, raylet, workers), dashboard off unless asked.

    Ray resolves "127.0.0.1" to the machine's reachable address unless its cluster mode is off
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, what it does on laptops); the variable is set for the processes Ray starts.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # read at import; ray may be imported already
    ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=include_dashboard, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1", configure_logging=False, log_to_driver=log_to_driver)


class WorkerDied(SchedsearchError, RuntimeError):
    """A candidate whose worker died on every attempt."""


def evaluation_to_dict(evaluation: Any) -> dict[str, Any]:
    """The plain-dict form a worker returns (no Schedule object crosses the wire)."""
    return {
        "metrics": {k: float(v) for k, v in evaluation.metrics.items()},
        "status": evaluation.status,
        "error": evaluation.error,
        "wall_time_s": float(evaluation.wall_time_s),
        "device": evaluation.device,
        "samples": int(getattr(evaluation, "samples", 0)),
        "forward_passes": int(getattr(evaluation, "forward_passes", 0)),
    }


class _LocalFactory:
    """Builds a worker's `LocalEvaluator` from names (picklable; runs inside the actor)."""

    def __init__(self, model_name: str, calibration_spec: Any, cache_dir: str, objectives: Sequence[str],
                 samples: int | None, batch_size: int, options: dict[str, Any] | None, share_prefixes: bool = False,
                 prefix_memory_bytes: int | None = None, model_kwargs: Mapping[str, Any] | None = None) -> None:
        self.model_name, self.spec, self.cache_dir = model_name, calibration_spec, cache_dir
        self.objectives, self.samples, self.batch_size, self.options = list(objectives), samples, batch_size, options
        self.share_prefixes, self.prefix_memory_bytes = share_prefixes, prefix_memory_bytes
        self.model_kwargs = dict(model_kwargs or {})  # size and second guidance scale: the driver's model

    def __call__(self) -> Any:
        from schedsearch.calibration.calibration_set import CalibrationSet
        from schedsearch.evaluation.local import LocalEvaluator
        from schedsearch.runtime.models import load_model

        calibration = CalibrationSet.open(self.spec, self.cache_dir)
        if not calibration.is_built:
            raise FileNotFoundError(f"calibration set {calibration.hash} is not built at {calibration.root}; the "
                                    "driver builds it before starting workers (is cache_dir shared with the workers?)")
        model = load_model(self.model_name, **self.model_kwargs)
        return LocalEvaluator(model, calibration, self.objectives, samples=self.samples, batch_size=self.batch_size,
                              cost_cache_dir=self.cache_dir, options=self.options,
                              share_prefixes=self.share_prefixes, prefix_memory_bytes=self.prefix_memory_bytes)


class _Worker:
    """The actor body: one evaluator built once, then `evaluate_many([(tag, schedule_json), ...]) -> [dict]` per
    task (one candidate, or a run of plans that share prefixes)."""

    def __init__(self, factory: Callable[[], Any], threads: int, crash_on: Mapping[str, int] | None = None,
                 crash_dir: str | None = None) -> None:
        if threads > 0:
            try:
                import torch

                torch.set_num_threads(threads)
            except ImportError:
                pass
        self.evaluator = factory()
        self.crash_on, self.crash_dir = dict(crash_on or {}), crash_dir

    def describe(self) -> dict[str, Any]:
        objectives = [{"name": o.name, "direction": o.direction} for o in self.evaluator.objectives]
        return {"calibration_hash": self.evaluator.calibration_hash, "objectives": objectives, "pid": os.getpid()}

    def evaluate_many(self, items: Sequence[tuple[int, str]]) -> list[dict[str, Any]]:
        """The task's candidates through the evaluator's `evaluate` (a prefix tree where it shares prefixes); a
        candidate the worker cannot even read becomes a failed record, not a lost task."""
        start = time.perf_counter()
        out, readable = [], []
        for tag, text in items:
            try:
                schedule = Schedule.from_json(text)
            except Exception as exc:
                out.append(_failed(tag, exc, start))
                continue
            readable.append((tag, schedule))
        for _, schedule in readable:
            self._maybe_crash(schedule.key)
        tags: dict[str, list[int]] = {}
        for tag, schedule in readable:
            tags.setdefault(schedule.key, []).append(tag)
        try:
            for evaluation in self.evaluator.evaluate([schedule for _, schedule in readable]):
                out.append({**evaluation_to_dict(evaluation), "tag": tags[evaluation.schedule.key].pop(0)})
        except Exception as exc:  # the evaluator itself broke: every candidate not yet returned fails with it
            out += [_failed(tag, exc, start) for left in tags.values() for tag in left]
        return out

    def _maybe_crash(self, key: str) -> None:
        """Fault injection for tests: exit hard the first `crash_on[key]` times this key is evaluated (any worker)."""
        times = self.crash_on.get(key, 0)
        if not times or self.crash_dir is None:
            return
        done = len(list(Path(self.crash_dir).glob(f"{key}.*")))
        if done < times:
            Path(self.crash_dir, f"{key}.{done}.{os.getpid()}").touch()
            os._exit(17)


def _failed(tag: int, exc: BaseException, start: float) -> dict[str, Any]:
    return {"metrics": {}, "status": "failed", "error": f"{type(exc).__name__}: {exc}",
            "wall_time_s": time.perf_counter() - start, "device": "", "samples": 0, "tag": tag}


class SleepEvaluator:
    """A fake model for tests and scaling benchmarks: `evaluate_one` sleeps `delay_s` (no CPU) and returns metrics
    derived from the schedule key; keys in `fail` come back as failed (like a NaN output). No torch."""

    def __init__(self, delay_s: float = 0.0, fail: Sequence[str] = (), calibration_hash: str = "fake-n0") -> None:
        self.delay_s, self.fail, self.calibration_hash = delay_s, set(fail), calibration_hash
        self.objectives = [_Objective("score", "max"), _Objective("nfe", "min")]

    def evaluate_one(self, schedule: Schedule) -> Any:
        from types import SimpleNamespace

        start = time.perf_counter()
        if self.delay_s:
            time.sleep(self.delay_s)
        failed = schedule.key in self.fail
        metrics = {} if failed else {"score": int(schedule.key[:8], 16) / 16**8, "nfe": float(schedule.solver.nfe)}
        error = f"NonFiniteOutputError: schedule {schedule.key} produced NaN/inf images" if failed else ""
        return SimpleNamespace(schedule=schedule, metrics=metrics, status="failed" if failed else "ok", error=error,
                               wall_time_s=time.perf_counter() - start, device="fake", samples=0)

    def evaluate(self, schedules: Iterable[Schedule]) -> Iterator[Any]:
        for schedule in schedules:
            yield self.evaluate_one(schedule)


class _Objective(str):
    """An objective's name (a str, so it can rebuild the objective anywhere) with its direction."""

    direction: str

    def __new__(cls, name: str, direction: str) -> _Objective:
        obj = super().__new__(cls, name)
        obj.direction = direction
        return obj

    @property
    def name(self) -> str:
        return str(self)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Objective, (str(self), self.direction))


class RayEvaluator:
    """`evaluate(schedules)` on a pool of Ray actors; results are yielded as they finish (any order).

    address: "auto" or "ray://host:port" / "host:port" to join a cluster; None starts a local Ray (bound to
    127.0.0.1, dashboard off unless `include_dashboard`) or uses the one already initialised in this process.
    workers: actors in the pool (default: one per GPU if the cluster has GPUs, else one per CPU).
    num_gpus_per_worker: default 1 where the cluster has GPUs, else 0 (CPU actors with `threads_per_worker`).
    evaluator_factory: a picklable `() -> evaluator` run in each actor instead of building a `LocalEvaluator`
    (fakes, benchmarks); the evaluator needs `evaluate(schedules)`, `calibration_hash` and `objectives`.
    model_kwargs: `load_model` keywords the workers load the model with (size, a second guidance scale).
    share_prefixes / prefix_memory_bytes: each worker's `LocalEvaluator` shares prefixes, and a batch's plans go to
    the workers as contiguous runs in prefix order (module docstring).
    crash_on: testing only — schedule key -> how many times a worker evaluating it exits hard.
    """

    def __init__(
        self,
        model_name: str,
        calibration_spec: Any,
        cache_dir: str | Path | None,
        objectives: Sequence[str],
        *,
        samples: int | None = None,
        batch_size: int = 64,
        workers: int | None = None,
        address: str | None = None,
        num_gpus_per_worker: float | None = None,
        num_cpus_per_worker: float = 1.0,
        threads_per_worker: int | None = None,
        max_retries: int = 2,
        evaluator_factory: Callable[[], Any] | None = None,
        objective_options: dict[str, Any] | None = None,
        include_dashboard: bool = False,
        crash_on: Mapping[str, int] | None = None,
        share_prefixes: bool = False,
        prefix_memory_bytes: int | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        import ray
        from ray.util import ActorPool

        if workers is not None and workers < 1:
            raise ValueError(f"workers: {workers}; give at least 1")
        if max_retries < 0:
            raise ValueError(f"max_retries: {max_retries}; give 0 or more")
        self.max_retries = max_retries
        self._owns_ray = False
        if not ray.is_initialized():
            if address is None:
                cpus = os.cpu_count() or 1
                need = (workers or cpus) * num_cpus_per_worker
                start_local_ray(max(cpus, int(need + 0.999)), include_dashboard=include_dashboard)
            else:
                ray.init(address=address)
            self._owns_ray = True
        resources = ray.cluster_resources()
        gpus = float(resources.get("GPU", 0))
        if num_gpus_per_worker is None:
            num_gpus_per_worker = 1.0 if gpus >= 1 else 0.0
        if workers is None:
            workers = int(gpus // num_gpus_per_worker) if num_gpus_per_worker else int(
                resources.get("CPU", 1) // max(num_cpus_per_worker, 1e-9))
            workers = max(workers, 1)
        if threads_per_worker is None:
            threads_per_worker = max(1, int(num_cpus_per_worker))  # 1 torch thread per CPU the actor reserves
        self.workers = workers
        if evaluator_factory is None:
            cache = str(cache_dir) if cache_dir is not None else None
            if cache is None:
                from schedsearch.calibration.calibration_set import default_cache_dir

                cache = str(default_cache_dir())
            _ensure_built(model_name, calibration_spec, cache, batch_size, model_kwargs or {})
            evaluator_factory = _LocalFactory(model_name, calibration_spec, cache, objectives, samples, batch_size,
                                              objective_options, share_prefixes, prefix_memory_bytes, model_kwargs)
        self.share_prefixes = share_prefixes
        # Ray sets OMP_NUM_THREADS to the actor's num_cpus; the actor also caps torch's intra-op threads.
        self._actor_cls = ray.remote(_Worker).options(  # type: ignore[attr-defined]
            num_cpus=num_cpus_per_worker, num_gpus=num_gpus_per_worker, max_restarts=0, max_task_retries=0,
        )
        self._crash_dir = tempfile.mkdtemp(prefix="schedsearch-crash-") if crash_on else None
        self._worker_args = (evaluator_factory, threads_per_worker, dict(crash_on or {}), self._crash_dir)
        # The first worker alone first: it computes shared caches (e.g. FID reference statistics) once, and tells
        # the driver the calibration hash and objectives; then the rest start in parallel.
        first = self._spawn()
        self._actors = [first]
        try:
            info = ray.get(first.describe.remote())
        except ray.exceptions.RayError as exc:  # e.g. an objective's weights missing on the workers
            self.close()
            raise RuntimeError(f"the first Ray worker failed to start: {exc}") from exc
        self._calibration_hash: str = info["calibration_hash"]
        self.objectives = [_Objective(o["name"], o["direction"]) for o in info["objectives"]]
        self._actors = [first] + [self._spawn() for _ in range(workers - 1)]
        self._pool = ActorPool(list(self._actors))
        self._on_actor: dict[str, tuple[list[int], Any]] = {}  # actor id -> (tags, actor) in flight
        self._next_tag = 0
        self.replaced = 0  # workers replaced after dying
        self.device = f"ray x{workers}"

    @property
    def calibration_hash(self) -> str:
        return self._calibration_hash

    def _spawn(self) -> Any:
        return self._actor_cls.remote(*self._worker_args)

    def _submit(self, items: list[tuple[int, str]]) -> None:
        """One task: candidates (tag, schedule JSON) for whichever worker frees up first."""
        def call(actor: Any, value: list[tuple[int, str]]) -> Any:
            self._on_actor[actor._actor_id.hex()] = ([tag for tag, _ in value], actor)
            return actor.evaluate_many.remote(value)

        self._pool.submit(call, items)

    def _tasks(self, tagged: list[tuple[int, Schedule]]) -> list[list[int]]:
        """The batch's tags as tasks: one per candidate, except that with `share_prefixes` the plans of each
        prefix-sharing group are sorted by their rows and cut into one contiguous run per worker."""
        if not self.share_prefixes:
            return [[tag] for tag, _ in tagged]
        from schedsearch.runtime.prefix_tree import prefix_groups

        tasks = []
        for key, members in prefix_groups([schedule for _, schedule in tagged]):
            if key is not None:
                members = sorted(members, key=lambda i: tagged[i][1].cache.recompute)
            runs = min(self.workers, len(members))
            bounds = [round(i * len(members) / runs) for i in range(runs + 1)]
            tasks += [[tagged[i][0] for i in members[lo:hi]] for lo, hi in pairwise(bounds)]
        return tasks

    def evaluate(self, schedules: Iterable[Schedule]) -> Iterator[Any]:
        """Submit the whole batch, yield `Evaluation`s as workers finish them; dead workers are replaced."""
        import ray

        from schedsearch.evaluation.local import Evaluation

        self._drain()
        pending: dict[int, tuple[Schedule, str, int]] = {}  # tag -> (schedule, json, attempt)
        tagged = []
        for schedule in schedules:
            tag, self._next_tag = self._next_tag, self._next_tag + 1
            pending[tag] = (schedule, schedule.to_json(indent=None), 1)
            tagged.append((tag, schedule))
        for task in self._tasks(tagged):
            self._submit([(tag, pending[tag][1]) for tag in task])
        lost_error = ""
        while pending:
            if not self._pool.has_next():  # nothing in flight: what is still pending was lost with a task error
                for tag in list(pending):
                    yield from self._retry_or_fail(pending, tag, lost_error or "the result was lost")
                lost_error = ""
                continue
            try:
                results = self._pool.get_next_unordered()
            except ray.exceptions.RayActorError as exc:
                if exc.actor_init_failed:
                    raise RuntimeError(f"a Ray worker failed to start: {exc}") from exc
                entry = self._on_actor.pop(exc.actor_id, None) if exc.actor_id else None
                self._replace(entry[1] if entry else None)
                for tag in entry[0] if entry is not None else ():
                    yield from self._retry_or_fail(pending, tag, f"worker died: {exc}")
                continue
            except ray.exceptions.RayError as exc:  # the task lost, the worker kept: retried once the pool drains
                lost_error = f"{type(exc).__name__}: {exc}"
                continue
            for out in results:
                tag = int(out.pop("tag"))
                if tag not in pending:  # a result of an abandoned batch
                    continue
                schedule = pending.pop(tag)[0]
                yield Evaluation(schedule, out["metrics"], out["status"], out["error"], out["wall_time_s"],
                                 out["device"], out["samples"], out.get("forward_passes", 0))

    def _retry_or_fail(self, pending: dict[int, tuple[Schedule, str, int]], tag: int, message: str) -> Iterator[Any]:
        from schedsearch.evaluation.local import Evaluation

        if tag not in pending:
            return
        schedule, text, attempt = pending[tag]
        if attempt <= self.max_retries:
            pending[tag] = (schedule, text, attempt + 1)
            self._submit([(tag, text)])
            return
        del pending[tag]
        yield Evaluation(schedule, {}, "failed", f"{WorkerDied.__name__}: {message} (after {attempt} attempt(s))",
                         0.0, self.device, 0)

    def _replace(self, dead: Any) -> None:
        import ray

        if dead is not None:
            self._actors = [a for a in self._actors if a is not dead]
            ray.kill(dead, no_restart=True)
        actor = self._spawn()
        self._actors.append(actor)
        self._pool.push(actor)
        self.replaced += 1

    def _drain(self) -> None:
        """Wait out the results of an abandoned `evaluate` generator (their tags are ignored)."""
        import ray

        while self._pool.has_next():
            try:
                self._pool.get_next_unordered()
            except ray.exceptions.RayActorError as exc:
                entry = self._on_actor.pop(exc.actor_id, None) if exc.actor_id else None
                self._replace(entry[1] if entry else None)
            except ray.exceptions.RayError:
                pass

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (tests kill one)."""
        import ray

        return [ray.get(a.describe.remote())["pid"] for a in self._actors]

    def close(self) -> None:
        """Stop the workers; shut Ray down if this evaluator started it."""
        import ray

        for actor in getattr(self, "_actors", []):
            ray.kill(actor, no_restart=True)
        self._actors = []
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False

    def __enter__(self) -> RayEvaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ensure_built(model_name: str, spec: Any, cache_dir: str, batch_size: int,
                  model_kwargs: Mapping[str, Any]) -> None:
    """The driver builds the calibration set before workers start, so workers only read it."""
    from schedsearch.calibration.calibration_set import CalibrationSet

    calibration = CalibrationSet.open(spec, cache_dir)
    if not calibration.is_built:
        from schedsearch.runtime.models import load_model

        calibration.build(load_model(model_name, **model_kwargs), batch_size=batch_size, progress=False)
