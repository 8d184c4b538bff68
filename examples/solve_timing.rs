//! Times modelfusion's solvers on matrices stored as `.npy` files and prints one JSON
//! object per run (used by `benches/compare/solve_compare.py`).
//!
//! ```text
//! cargo run --release --example solve_timing -- lap COST.npy MAXIMIZE(0|1) REPS
//! cargo run --release --example solve_timing -- lap_batch COSTS.npy MAXIMIZE(0|1) REPS THREADS
//! cargo run --release --example solve_timing -- sinkhorn A.npy B.npy M.npy REG TOL MAX_ITER THREADS REPS
//! ```
//! `.npy` files must be little-endian `<f8` or `<f4`, C order, 1-D or 2-D (3-D for
//! `lap_batch`: one cost matrix per entry of the first axis).

use std::time::Instant;

use modelfusion::solve::{Sinkhorn, linear_sum_assignment, linear_sum_assignment_batch};
use ndarray::{Array1, Array2, Array3};

enum Npy {
    F32(Vec<usize>, Vec<f32>),
    F64(Vec<usize>, Vec<f64>),
}

fn read_npy(path: &str) -> Npy {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{path}: not an .npy file");
    let (hlen, start) = if bytes[6] == 1 {
        (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10)
    } else {
        (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        )
    };
    let header = std::str::from_utf8(&bytes[start..start + hlen]).expect("ascii header");
    assert!(
        header.contains("'fortran_order': False"),
        "{path}: need C order"
    );
    let shape_txt = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .expect("shape");
    let shape: Vec<usize> = shape_txt
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().expect("dim"))
        .collect();
    let data = &bytes[start + hlen..];
    if header.contains("'<f8'") {
        let v = data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        Npy::F64(shape, v)
    } else if header.contains("'<f4'") {
        let v = data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        Npy::F32(shape, v)
    } else {
        panic!("{path}: dtype must be <f8 or <f4: {header}")
    }
}

fn to_f64(n: Npy) -> (Vec<usize>, Vec<f64>) {
    match n {
        Npy::F64(s, v) => (s, v),
        Npy::F32(s, v) => (s, v.into_iter().map(f64::from).collect()),
    }
}

fn median(mut t: Vec<f64>) -> f64 {
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    t[t.len() / 2]
}

/// CPU time of this process in seconds (Linux `/proc`, 10 ms ticks); `NaN` elsewhere.
fn cpu_time() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    let f: Vec<&str> = s
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let tick = |k: usize| {
        f.get(k)
            .and_then(|x| x.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (tick(11) + tick(12)) / 100.0
}

fn time_lap<F: modelfusion::Scalar>(m: Array2<F>, maximize: bool, reps: usize) {
    let mut times = Vec::new();
    let mut cost = 0.0;
    let c0 = cpu_time();
    for _ in 0..reps {
        let t0 = Instant::now();
        let a = linear_sum_assignment(m.view(), maximize).expect("solvable");
        times.push(t0.elapsed().as_secs_f64());
        cost = a.cost.to_f64_lossless();
    }
    let cpu = (cpu_time() - c0) / reps as f64;
    println!(
        "{{\"solver\": \"modelfusion\", \"dtype\": \"{}\", \"time_s\": {}, \"cpu_s\": {cpu}, \"cost\": {}}}",
        F::NAME,
        median(times),
        cost
    );
}

fn time_lap_batch<F: modelfusion::Scalar>(
    m: Array3<F>,
    maximize: bool,
    reps: usize,
    threads: usize,
) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let views: Vec<_> = m.outer_iter().collect();
    let mut times = Vec::new();
    let mut cost = 0.0;
    let c0 = cpu_time();
    for _ in 0..reps {
        let t0 = Instant::now();
        let all = pool
            .install(|| linear_sum_assignment_batch(&views, maximize))
            .expect("solvable");
        times.push(t0.elapsed().as_secs_f64());
        cost = all.iter().map(|a| a.cost.to_f64_lossless()).sum();
    }
    let cpu = (cpu_time() - c0) / reps as f64;
    println!(
        "{{\"solver\": \"modelfusion\", \"dtype\": \"{}\", \"threads\": {threads}, \"time_s\": {}, \"cpu_s\": {cpu}, \"cost\": {}}}",
        F::NAME,
        median(times),
        cost
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("lap") => {
            let maximize = args[2] == "1";
            let reps: usize = args[3].parse().expect("reps");
            match read_npy(&args[1]) {
                Npy::F64(s, v) => time_lap(
                    Array2::from_shape_vec((s[0], s[1]), v).unwrap(),
                    maximize,
                    reps,
                ),
                Npy::F32(s, v) => time_lap(
                    Array2::from_shape_vec((s[0], s[1]), v).unwrap(),
                    maximize,
                    reps,
                ),
            }
        }
        Some("lap_batch") => {
            let maximize = args[2] == "1";
            let reps: usize = args[3].parse().expect("reps");
            let threads: usize = args[4].parse().expect("threads");
            match read_npy(&args[1]) {
                Npy::F64(s, v) => time_lap_batch(
                    Array3::from_shape_vec((s[0], s[1], s[2]), v).unwrap(),
                    maximize,
                    reps,
                    threads,
                ),
                Npy::F32(s, v) => time_lap_batch(
                    Array3::from_shape_vec((s[0], s[1], s[2]), v).unwrap(),
                    maximize,
                    reps,
                    threads,
                ),
            }
        }
        Some("sinkhorn") => {
            let (_, a) = to_f64(read_npy(&args[1]));
            let (_, b) = to_f64(read_npy(&args[2]));
            let (s, m) = to_f64(read_npy(&args[3]));
            let reg: f64 = args[4].parse().expect("reg");
            let tol: f64 = args[5].parse().expect("tol");
            let max_iter: usize = args[6].parse().expect("max_iter");
            let threads: usize = args[7].parse().expect("threads");
            let reps: usize = args[8].parse().expect("reps");
            let m = Array2::from_shape_vec((s[0], s[1]), m).unwrap();
            let (a, b) = (Array1::from(a), Array1::from(b));
            let solver = Sinkhorn::builder()
                .with_reg(reg)
                .with_tol(tol)
                .with_max_iter(max_iter)
                .build()
                .expect("valid parameters");
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut times = Vec::new();
            let mut last = None;
            for _ in 0..reps {
                let t0 = Instant::now();
                let r = pool
                    .install(|| solver.solve(a.view(), b.view(), m.view()))
                    .expect("sinkhorn");
                times.push(t0.elapsed().as_secs_f64());
                last = Some(r);
            }
            let r = last.unwrap();
            println!(
                "{{\"solver\": \"modelfusion\", \"threads\": {threads}, \"time_s\": {}, \"cost\": {}, \"iterations\": {}, \"error\": {}, \"converged\": {}}}",
                median(times),
                r.cost,
                r.iterations,
                r.error,
                r.converged
            );
        }
        _ => eprintln!("usage: see the header of examples/solve_timing.rs"),
    }
}
