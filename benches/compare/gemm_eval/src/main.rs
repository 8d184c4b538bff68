//! `C = A B^T` for row-major `A`, `B` of `n x k` f32 (the shape of a weight-matching cost
//! term: `n` units, `k` = the rest of the unfolded tensor), best of 5, in GFLOP/s, for
//! matrixmultiply (through ndarray, what modelfusion uses), gemm, faer and the system
//! OpenBLAS (cblas), each on one thread and on `threads` (default 2).
//!
//! Usage: `gemm_eval N K [THREADS]`.

use std::time::Instant;

#[link(name = "openblas")]
unsafe extern "C" {
    fn cblas_sgemm(
        order: i32,
        ta: i32,
        tb: i32,
        m: i32,
        n: i32,
        k: i32,
        alpha: f32,
        a: *const f32,
        lda: i32,
        b: *const f32,
        ldb: i32,
        beta: f32,
        c: *mut f32,
        ldc: i32,
    );
    fn openblas_set_num_threads(n: i32);
}

fn best(mut f: impl FnMut()) -> f64 {
    (0..5)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| {
            s.parse()
                .unwrap_or_else(|_| panic!("usage: gemm_eval N K [THREADS], got `{s}`"))
        })
        .collect();
    let (n, k) = match args[..] {
        [n, k, ..] => (n, k),
        _ => panic!("usage: gemm_eval N K [THREADS]"),
    };
    let threads = args.get(2).copied().unwrap_or(2);
    let a: Vec<f32> = (0..n * k)
        .map(|i| (i * 7919 % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let b: Vec<f32> = (0..n * k)
        .map(|i| (i * 104729 % 997) as f32 / 997.0 - 0.5)
        .collect();
    let gflops = |t: f64| 2.0 * (n * n * k) as f64 / t / 1e9;
    let mut c = vec![0f32; n * n];

    let a2 = ndarray::ArrayView2::from_shape((n, k), &a).expect("n * k elements");
    let b2 = ndarray::ArrayView2::from_shape((n, k), &b).expect("n * k elements");
    let t = best(|| {
        std::hint::black_box(a2.dot(&b2.t()));
    });
    println!(
        "n {n} k {k}: matrixmultiply 0.3 (1 thread) {:.1} GFLOP/s",
        gflops(t)
    );
    for (name, par) in [
        ("gemm 0.19 (1 thread)", gemm::Parallelism::None),
        ("gemm 0.19 (rayon)", gemm::Parallelism::Rayon(threads)),
    ] {
        // SAFETY: `c` is n x n, `a` and `b` are n x k, strides as given.
        let t = best(|| unsafe {
            gemm::gemm(
                n,
                n,
                k,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                k as isize,
                b.as_ptr(),
                k as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            );
        });
        println!("n {n} k {k}: {name} {:.1} GFLOP/s", gflops(t));
    }
    let fa = faer::MatRef::from_row_major_slice(&a, n, k);
    let fb = faer::MatRef::from_row_major_slice(&b, n, k);
    for (name, par) in [
        ("faer 0.24 (1 thread)", faer::Par::Seq),
        ("faer 0.24 (rayon)", faer::Par::rayon(threads)),
    ] {
        let mut fc = faer::Mat::<f32>::zeros(n, n);
        let t = best(|| {
            faer::linalg::matmul::matmul(
                fc.as_mut(),
                faer::Accum::Replace,
                fa,
                fb.transpose(),
                1.0,
                par,
            );
        });
        println!("n {n} k {k}: {name} {:.1} GFLOP/s", gflops(t));
    }
    for th in [1, threads] {
        // SAFETY: plain FFI calls on buffers of the sizes given.
        unsafe { openblas_set_num_threads(th as i32) };
        let t = best(|| unsafe {
            cblas_sgemm(
                101,
                111,
                112,
                n as i32,
                n as i32,
                k as i32,
                1.0,
                a.as_ptr(),
                k as i32,
                b.as_ptr(),
                k as i32,
                0.0,
                c.as_mut_ptr(),
                n as i32,
            );
        });
        println!(
            "n {n} k {k}: OpenBLAS ({th} threads) {:.1} GFLOP/s",
            gflops(t)
        );
    }
}
