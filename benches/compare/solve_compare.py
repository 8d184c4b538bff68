"""Compare modelfusion::solve with scipy, lap, lapjv and POT on the same matrices.

Usage (from the crate root, with the project venv):
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 \
        MKL_NUM_THREADS=1 venv/bin/python benches/compare/solve_compare.py [--quick] [--no-sinkhorn] [--no-lap]
        [--lap-large] [--lap-batch]

--lap-large: n = 8192 and 16384 (LLM MLP widths), f32 matrices (uniform [0, 1) and a
weight-matching similarity), one call each; scipy and lap.lapjv (f64 only) only at
8192, lapjv's f32 build at both. --lap-batch: batches of per-head problems
(attention heads), modelfusion's `linear_sum_assignment_batch` on 1 and 2 threads
(wall seconds) against a Python loop over the heads. Those two update
benches/compare/solve_compare_llm.json instead.

Matrices are generated here (seeded numpy), written as .npy to a temporary directory and
timed in-process for the Python peers and through `cargo run --release --example
solve_timing` for modelfusion. LAP times are CPU seconds per call (process CPU time
over several calls: robust on a shared machine), Sinkhorn times are wall seconds.
Prints Markdown tables and writes benches/compare/solve_compare.json.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
QUICK = "--quick" in sys.argv


def cargo_example(args):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    cmd = ["cargo", "run", "--quiet", "--release", "--example", "solve_timing", "--"] + args
    out = subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cpu_per_call(fn, reps):
    res = None
    c0 = time.process_time()
    for _ in range(reps):
        res = fn()
    return (time.process_time() - c0) / reps, res


def reps_for(n):
    return 400 if n <= 256 else 20 if n <= 1024 else 4 if n <= 2048 else 2


def lap_peers(c, maximize, reps):
    from scipy.optimize import linear_sum_assignment

    out = {}
    t, (r, cc) = cpu_per_call(lambda: linear_sum_assignment(c, maximize=maximize), reps)
    out["scipy"] = (t, float(c[r, cc].sum()))
    src = -c if maximize else c
    try:
        import lap

        t, (_, x, _) = cpu_per_call(lambda: lap.lapjv(src, extend_cost=src.shape[0] != src.shape[1]), reps)
        rows = np.arange(len(x))
        ok = x >= 0
        out["lap.lapjv"] = (t, float(c[rows[ok], x[ok]].sum()))
    except Exception as e:  # noqa: BLE001
        print("lap.lapjv failed:", e, file=sys.stderr)
    if src.shape[0] == src.shape[1]:
        try:
            import lapjv

            for name, arr in (("lapjv f32", src.astype(np.float32)), ("lapjv f64", src.astype(np.float64))):
                t, res = cpu_per_call(lambda arr=arr: lapjv.lapjv(arr), reps)
                x = res[0]
                out[name] = (t, float(c[np.arange(len(x)), x].sum()))
        except Exception as e:  # noqa: BLE001
            print("lapjv failed:", e, file=sys.stderr)
    return out


def run_lap(tmp):
    rng = np.random.default_rng(12345)
    sizes = [256, 1024] if QUICK else [256, 1024, 2048, 4096]
    cases = []
    for n in sizes:
        cases.append((f"uniform [0,1) {n}", rng.random((n, n)), False))
        cases.append((f"integer [0,100) {n}", rng.integers(0, 100, (n, n)).astype(np.float64), False))
        a, b = rng.standard_normal((n, 512)), rng.standard_normal((n, 512))
        cases.append((f"weight matching A B^T max {n}", a @ b.T, True))
    cases.append(("uniform 1024 x 2048", rng.random((1024, 2048)), False))
    rows = []
    for name, c, maximize in cases:
        n = c.shape[0]
        reps = reps_for(n)
        peers = lap_peers(c, maximize, reps)
        p64 = os.path.join(tmp, "c64.npy")
        p32 = os.path.join(tmp, "c32.npy")
        np.save(p64, c)
        np.save(p32, c.astype(np.float32))
        ours64 = cargo_example(["lap", p64, "1" if maximize else "0", str(reps)])
        ours32 = cargo_example(["lap", p32, "1" if maximize else "0", str(reps)])
        best = min(v[0] for v in peers.values())
        ref = peers["scipy"][1]
        row = {
            "case": name,
            "peers": {k: v[0] for k, v in peers.items()},
            "peer_totals": {k: v[1] for k, v in peers.items()},
            "ours_f64": ours64["cpu_s"],
            "ours_f32": ours32["cpu_s"],
            "ours_f64_total": ours64["cost"],
            "ours_f32_total": ours32["cost"],
            "best_peer": best,
            "speedup_f64_vs_best": best / ours64["cpu_s"],
            "speedup_f64_vs_scipy": peers["scipy"][0] / ours64["cpu_s"],
            "speedup_f32_vs_best": best / ours32["cpu_s"],
            "f64_total_rel_err_vs_scipy": abs(ours64["cost"] - ref) / max(1.0, abs(ref)),
        }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


def run_lap_large(tmp):
    """One call per solver on n = 8192 and 16384 f32 problems (CPU seconds)."""
    import lapjv
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(2024)
    rows = []
    for n in (8192, 16384):
        uniform = rng.random((n, n), dtype=np.float32)
        a = rng.standard_normal((n, 512), dtype=np.float32)
        b = rng.standard_normal((n, 512), dtype=np.float32)
        for name, c, maximize in ((f"uniform [0,1) f32 {n}", uniform, False),
                                  (f"weight matching A B^T max f32 {n}", a @ b.T, True)):
            row = {"case": name, "n": n}
            src = -c if maximize else c
            t, res = cpu_per_call(lambda: lapjv.lapjv(src), 1)
            row["lapjv f32"] = t
            row["lapjv f32 total"] = float(c[np.arange(n), res[0]].astype(np.float64).sum())
            if n <= 8192:
                c64 = c.astype(np.float64)
                t, (r, cc) = cpu_per_call(lambda: linear_sum_assignment(c64, maximize=maximize), 1)
                row["scipy"] = t
                row["scipy total"] = float(c64[r, cc].sum())
                try:
                    import lap

                    s64 = -c64 if maximize else c64
                    t, (_, x, _) = cpu_per_call(lambda: lap.lapjv(s64), 1)
                    row["lap.lapjv"] = t
                except Exception as e:  # noqa: BLE001
                    print("lap.lapjv failed:", e, file=sys.stderr)
                del c64
            path = os.path.join(tmp, "c32.npy")
            np.save(path, c)
            ours = cargo_example(["lap", path, "1" if maximize else "0", "1"])
            row["ours f32"] = ours["cpu_s"]
            row["ours f32 wall"] = ours["time_s"]
            row["ours f32 total"] = ours["cost"]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    return rows


def run_lap_batch(tmp):
    """Batches of per-head weight-matching problems: wall seconds for the whole batch."""
    import lapjv
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(77)
    rows = []
    for heads, d, reps in ((32, 128, 20), (64, 128, 10), (32, 64, 40), (256, 64, 5)):
        a = rng.standard_normal((heads, d, 512), dtype=np.float32)
        b = rng.standard_normal((heads, d, 512), dtype=np.float32)
        c = np.einsum("hik,hjk->hij", a, b)
        row = {"case": f"{heads} heads x {d}", "heads": heads, "d": d}

        def loop(f):
            t0 = time.perf_counter()
            for _ in range(reps):
                for h in range(heads):
                    f(c[h])
            return (time.perf_counter() - t0) / reps

        row["scipy loop"] = loop(lambda m: linear_sum_assignment(m.astype(np.float64), maximize=True))
        row["lapjv f32 loop"] = loop(lambda m: lapjv.lapjv(-m))
        path = os.path.join(tmp, "heads.npy")
        np.save(path, c)
        for threads in (1, 2):
            r = cargo_example(["lap_batch", path, "1", str(reps), str(threads)])
            row[f"ours t{threads}"] = r["time_s"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


def sk_problem(n, seed):
    import ot

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 64))
    y = rng.standard_normal((n, 64)) + 0.5
    M = ot.dist(x, y)
    M /= M.max()
    return np.ones(n) / n, np.ones(n) / n, M


def run_sinkhorn(tmp):
    import ot

    cases = [(1024, 0.05), (1024, 0.01)] if QUICK else [(1024, 0.05), (1024, 0.01), (2048, 0.01), (4096, 0.05), (4096, 0.01)]
    rows = []
    for n, reg in cases:
        a, b, M = sk_problem(n, n)
        paths = [os.path.join(tmp, f"{k}.npy") for k in "abM"]
        for p, arr in zip(paths, (a, b, M)):
            np.save(p, arr)
        row = {"n": n, "reg": reg}
        t0 = time.perf_counter()
        P, log = ot.sinkhorn(a, b, M, reg, stopThr=1e-9, numItermax=100000, log=True)
        row["pot_sinkhorn"] = time.perf_counter() - t0
        row["pot_sinkhorn_iters"] = int(log["niter"])
        row["pot_sinkhorn_cost"] = float((P * M).sum())
        row["pot_sinkhorn_l1"] = float(np.abs(P.sum(1) - a).sum() + np.abs(P.sum(0) - b).sum())
        # POT's log-domain solver takes minutes at n = 4096, reg = 0.01 (155.6 s here,
        # shared/REFERENCES.md): run it where it takes under about a minute
        if not (n >= 4096 and reg < 0.05):
            t0 = time.perf_counter()
            P, log = ot.sinkhorn(a, b, M, reg, method="sinkhorn_log", stopThr=1e-9, numItermax=100000, log=True)
            row["pot_sinkhorn_log"] = time.perf_counter() - t0
            row["pot_sinkhorn_log_iters"] = int(log["niter"])
        for threads in (1, 2):
            r = cargo_example(["sinkhorn", *paths, str(reg), "1e-9", "100000", str(threads), "3" if n <= 2048 else "1"])
            row[f"ours_t{threads}"] = r["time_s"]
            row["ours_iters"] = r["iterations"]
            row["ours_cost"] = r["cost"]
            row["ours_l1"] = r["error"]
            row["ours_converged"] = r["converged"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


def main():
    subprocess.run(["cargo", "build", "--quiet", "--release", "--example", "solve_timing"], cwd=ROOT, check=True)
    out = {"machine": os.uname().nodename, "cpu_count": os.cpu_count()}
    if "--lap-large" in sys.argv or "--lap-batch" in sys.argv:
        return llm_sizes(out)
    with tempfile.TemporaryDirectory() as tmp:
        if "--no-lap" not in sys.argv:
            out["lap"] = run_lap(tmp)
        if "--no-sinkhorn" not in sys.argv:
            out["sinkhorn"] = run_sinkhorn(tmp)
    with open(os.path.join(HERE, "solve_compare.json"), "w") as f:
        json.dump(out, f, indent=1)

    if "lap" in out:
        print("\n| cost matrix | scipy | lap.lapjv | lapjv f32 | lapjv f64 | ours f64 | ours f32 | best peer / ours f64 | scipy / ours f64 | best peer / ours f32 |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in out["lap"]:
            p = r["peers"]
            g = lambda k: f"{p[k]:.4f}" if k in p else "-"  # noqa: E731
            print(
                f"| {r['case']} | {g('scipy')} | {g('lap.lapjv')} | {g('lapjv f32')} | {g('lapjv f64')} | "
                f"{r['ours_f64']:.4f} | {r['ours_f32']:.4f} | {r['speedup_f64_vs_best']:.2f} | "
                f"{r['speedup_f64_vs_scipy']:.2f} | {r['speedup_f32_vs_best']:.2f} |"
            )
    if "sinkhorn" in out:
        print("\n| n | reg | POT sinkhorn (iters) | POT sinkhorn_log (iters) | ours 1 thread (iters) | ours 2 threads | sinkhorn / ours | sinkhorn_log / ours | 1t / 2t | cost rel. diff |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in out["sinkhorn"]:
            log_t = r.get("pot_sinkhorn_log")
            logs = f"{log_t:.3f} ({r['pot_sinkhorn_log_iters']})" if log_t else "not run"
            ratio_log = f"{log_t / r['ours_t1']:.1f}" if log_t else "-"
            print(
                f"| {r['n']} | {r['reg']} | {r['pot_sinkhorn']:.3f} ({r['pot_sinkhorn_iters']}) | {logs} | "
                f"{r['ours_t1']:.3f} ({r['ours_iters']}) | {r['ours_t2']:.3f} | {r['pot_sinkhorn'] / r['ours_t1']:.2f} | "
                f"{ratio_log} | {r['ours_t1'] / r['ours_t2']:.2f} | "
                f"{abs(r['ours_cost'] - r['pot_sinkhorn_cost']) / r['pot_sinkhorn_cost']:.1e} |"
            )


def llm_sizes(out):
    path = os.path.join(HERE, "solve_compare_llm.json")
    if os.path.exists(path):  # keep the other part of an earlier run
        with open(path) as f:
            out = {**json.load(f), **out}
    with tempfile.TemporaryDirectory() as tmp:
        if "--lap-large" in sys.argv:
            out["lap_large"] = run_lap_large(tmp)
        if "--lap-batch" in sys.argv:
            out["lap_batch"] = run_lap_batch(tmp)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    if "lap_large" in out:
        print("\n| cost matrix | scipy (f64) | lap.lapjv (f64) | lapjv f32 | ours f32 | lapjv f32 / ours | total rel. diff. to lapjv |")
        print("|---|---|---|---|---|---|---|")
        for r in out["lap_large"]:
            g = lambda k: f"{r[k]:.2f}" if k in r else "not run"  # noqa: E731
            rel = abs(r["ours f32 total"] - r["lapjv f32 total"]) / abs(r["lapjv f32 total"])
            print(f"| {r['case']} | {g('scipy')} | {g('lap.lapjv')} | {g('lapjv f32')} | {g('ours f32')} | "
                  f"{r['lapjv f32'] / r['ours f32']:.2f} | {rel:.1e} |")
    if "lap_batch" in out:
        print("\n| batch | scipy loop | lapjv f32 loop | ours 1 thread | ours 2 threads | lapjv loop / ours (faster) |")
        print("|---|---|---|---|---|---|")
        for r in out["lap_batch"]:
            print(f"| {r['case']} | {r['scipy loop'] * 1e3:.1f} ms | {r['lapjv f32 loop'] * 1e3:.1f} ms | "
                  f"{r['ours t1'] * 1e3:.1f} ms | {r['ours t2'] * 1e3:.1f} ms | "
                  f"{r['lapjv f32 loop'] / min(r['ours t1'], r['ours t2']):.2f} |")


if __name__ == "__main__":
    main()
