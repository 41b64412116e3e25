"""Resident memory a worker adds for the teacher: shared ObjectRef (zero-copy) against copies.

A resnet32x4 teacher (10 classes, ~7.4M parameters, ~30 MB fp32; random weights: only the size
matters) is ``ray.put`` once through ``pipeline.train.teachers.put``. Then 2 and 4 Ray actors on this node
each build it in one of three ways and touch every weight (``p.sum()`` over all tensors, so each page is
mapped), and report how their memory grew, read from ``/proc/self/status`` (RssAnon, RssFile, RssShmem)
and ``/proc/self/smaps_rollup`` (USS = Private_Clean + Private_Dirty, PSS):

- ``shared``: ``teacher_store.build(spec, ray.get(ref)["arrays"])`` -- the project's path: the model is
  built on the CPU, then its tensors are replaced by views of the object store's buffer
  (``load_state_dict(assign=True)``), freeing the freshly initialised weights;
- ``copy_from_ref``: ``ray.get(ref)`` then ``load_state_dict`` into a fresh model (a copy);
- ``torch_load``: ``checkpoint.load(path)`` of the teacher file then ``load_state_dict`` (what each worker
  would do without the object store).

A fresh actor also reports what the first model build on the ``meta`` device costs a process (an earlier
``build`` used it; the first use imports ~800 modules: sympy, torch._dynamo, ...).

The object store's own accounting (bytes used, number of objects) is read from the raylet before and after
the workers fetch the teacher, and the teacher's line of ``ray memory``'s summary is kept.

    python bench/teacher_memory.py [--workers 2 4]
"""

from __future__ import annotations

import argparse
import gc
import os

import common

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch  # noqa: E402

from pipeline.train import teachers as teacher_store  # noqa: E402
from pipeline.train import checkpoint
from stkd import models  # noqa: E402

MODES = ("shared", "copy_from_ref", "torch_load")


def gcs_address() -> str:
    """This session's cluster (other Ray instances may run on the same machine)."""
    import ray

    return ray.get_runtime_context().gcs_address


def store_stats() -> dict:
    from ray._private import internal_api

    reply = internal_api.get_memory_info_reply(internal_api.get_state_from_address(gcs_address()))
    s = reply.store_stats
    return {"object_store_bytes_used": int(s.object_store_bytes_used), "num_local_objects": int(s.num_local_objects),
            "object_store_bytes_primary_copy": int(s.object_store_bytes_primary_copy),
            "object_store_bytes_fallback": int(s.object_store_bytes_fallback)}


def ref_lines(ref) -> list[str]:
    """The lines of ``ray memory``'s summary that mention the teacher's object."""
    from ray._private import internal_api

    try:
        text = internal_api.memory_summary(gcs_address(), line_wrap=False, units="MB")
    except Exception as e:  # noqa: BLE001 - the summary is a courtesy; the numbers come from store_stats
        return [f"memory_summary failed: {type(e).__name__}: {e}"]
    return [" ".join(line.split()) for line in text.splitlines() if ref.hex() in line]


def make_worker_class():
    import ray

    @ray.remote(num_cpus=0.25)
    class Worker:
        def __init__(self) -> None:
            torch.set_num_threads(1)
            # Warm the allocator and the torch runtime so the baseline includes them.
            warm = models.create("resnet8", 10)
            with torch.inference_mode():
                warm(torch.zeros(2, 3, 32, 32))
            del warm
            gc.collect()
            self.teacher = None

        def meta_first_use(self) -> dict:
            """What the first model build on the meta device adds to this process (KiB)."""
            before = common.rss_kib()
            with torch.device("meta"):
                models.create("resnet8", 10)
            gc.collect()
            after = common.rss_kib()
            return {k: after[k] - before.get(k, 0) for k in after}

        def pid(self) -> int:
            return os.getpid()

        def measure(self, mode: str, refs: list, path: str) -> dict:
            gc.collect()
            before = common.rss_kib()
            if mode == "shared":
                shared = ray.get(refs[0])
                model = teacher_store.build(shared["spec"], shared["arrays"])
            elif mode == "copy_from_ref":
                shared = ray.get(refs[0])
                model = checkpoint.build_model(shared["spec"])
                model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in shared["arrays"].items()})
                del shared
            elif mode == "torch_load":
                state = checkpoint.load(path)
                model = checkpoint.build_model(state["model"])
                model.load_state_dict(state["student"])
                del state
            else:
                raise ValueError(mode)
            with torch.no_grad():
                touched = float(sum(t.float().sum() for t in model.state_dict().values()))
            gc.collect()
            after = common.rss_kib()
            self.teacher = model  # keep it alive while the others measure
            shares = sum(t.untyped_storage().nbytes() for t in model.state_dict().values())
            return {"pid": os.getpid(), "before_kib": before, "after_kib": after,
                    "delta_kib": {k: after[k] - before.get(k, 0) for k in after}, "teacher_bytes": shares,
                    "checksum": touched}

    return Worker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--model", default="resnet32x4")
    args = parser.parse_args()

    import ray

    torch.manual_seed(0)
    teacher = models.create(args.model, 10)
    state = {"model": checkpoint.model_spec(args.model, 10, 3), "student": teacher.state_dict()}
    size = sum(t.numel() * t.element_size() for t in teacher.state_dict().values())
    params = sum(p.numel() for p in teacher.parameters())
    path = checkpoint.save(state, common.WORK / f"teacher_{args.model}")
    print(f"{args.model}: {params / 1e6:.2f}M parameters, state dict {size / 2**20:.1f} MiB, file {path}", flush=True)

    ray.init(logging_level="WARNING", include_dashboard=False, num_cpus=2)
    results: dict = {"teacher": {"model": args.model, "parameters": params, "state_dict_bytes": size}}
    try:
        empty = store_stats()
        ref = teacher_store.put(state)
        after_put = store_stats()
        print(f"object store: {empty} -> after put {after_put}", flush=True)
        Worker = make_worker_class()
        runs: dict = {}
        for n in args.workers:
            for mode in MODES:
                workers = [Worker.remote() for _ in range(n)]
                ray.get([w.pid.remote() for w in workers])
                reports = ray.get([w.measure.remote(mode, [ref], str(path)) for w in workers])
                stats = store_stats()
                lines = ref_lines(ref) if mode == "shared" else []
                mib = lambda key: [r["delta_kib"].get(key, 0) / 1024 for r in reports]  # noqa: E731
                entry = {
                    "per_worker_delta_mib": {k: mib(k) for k in ("RssAnon", "RssFile", "RssShmem", "VmRSS", "USS",
                                                                  "Pss")},
                    "object_store_after": stats, "reports": reports,
                }
                if lines:
                    entry["ray_memory_lines"] = lines
                runs[f"{n}x{mode}"] = entry
                d = entry["per_worker_delta_mib"]
                print(f"{n} workers, {mode}: per worker +RssAnon {d['RssAnon']} +RssShmem {d['RssShmem']} "
                      f"+RssFile {d['RssFile']} +USS {d['USS']} MiB; store {stats}", flush=True)
                for w in workers:
                    ray.kill(w)
                del workers
        results["runs"] = runs
        probe = Worker.remote()
        meta = ray.get(probe.meta_first_use.remote())
        ray.kill(probe)
        results["meta_device_first_use_delta_mib"] = {k: v / 1024 for k, v in meta.items()}
        print(f"first meta-device build in a fresh worker: +RssAnon {meta.get('RssAnon', 0) / 1024:.1f} MiB, "
              f"+USS {meta.get('USS', 0) / 1024:.1f} MiB", flush=True)
        results["object_store"] = {"empty": empty, "after_put": after_put,
                                   "teacher_object_bytes": after_put["object_store_bytes_used"]
                                   - empty["object_store_bytes_used"]}
    finally:
        ray.shutdown()

    common.write_result("teacher_memory", {
        "description": "resident memory each Ray actor adds when it builds a resnet32x4 teacher (10 classes) and "
                       "touches every weight: shared = pipeline.train.teachers.build over ray.get(ref)['arrays'] "
                       "(built on the CPU, weights then assigned as zero-copy views of the object store); "
                       "copy_from_ref and torch_load copy the weights. "
                       "Deltas in MiB from /proc/self/status and /proc/self/smaps_rollup (USS = private pages).",
        "settings": {"workers": args.workers, "modes": list(MODES), "actor_num_cpus": 0.25},
        "results": results,
    })


if __name__ == "__main__":
    main()
