//! Shared by the REPAIR tests: the statistics every reset point should have.
#![allow(dead_code)]

use modelfusion::align::Moments;
use modelfusion::{Activations, Model};
use std::collections::BTreeMap;

use ndarray::Array1;

/// Per-channel mean and standard deviation of feature `key` of `model` over the data.
pub fn point_stats<M: Model, A: Activations<M>>(
    src: &A,
    model: &M,
    key: &str,
) -> (Array1<f64>, Array1<f64>) {
    let mut m: Option<Moments> = None;
    for b in 0..src.num_batches() {
        let f = src.activations(model, b).unwrap();
        let x = &f[key];
        m.get_or_insert_with(|| Moments::new(x.ncols()))
            .update(x.view())
            .unwrap();
    }
    let m = m.unwrap();
    (m.mean().clone(), m.variance().mapv(f64::sqrt))
}

/// Asserts that every reset point (the layer output, or the stream key of a stream
/// write) of `fixed` has the interpolation of the endpoints' statistics at `t`, to `tol`
/// relative to the target standard deviation; channels `unreachable` lists keep the
/// mean and have at least the target variance (it was out of reach from below).
/// Returns the smallest std ratio the plain interpolation `mid` had (variance collapse:
/// below 1).
pub fn assert_points_reset<M: Model, A: Activations<M>>(
    src: &A,
    points: &[(String, Option<String>)],
    unreachable: &BTreeMap<String, Vec<usize>>,
    (a, b, mid, fixed): (&M, &M, &M, &M),
    t: f64,
    tol: f64,
) -> f64 {
    let mut worst: f64 = f64::INFINITY;
    for (layer, stream) in points {
        let key = stream.as_deref().unwrap_or(layer);
        let (ma, sa) = point_stats(src, a, key);
        let (mb, sb) = point_stats(src, b, key);
        let (tm, ts) = (&ma * (1.0 - t) + &mb * t, &sa * (1.0 - t) + &sb * t);
        let (fm, fs) = point_stats(src, fixed, key);
        let (_, ms) = point_stats(src, mid, key);
        let missed = unreachable.get(layer).cloned().unwrap_or_default();
        for c in 0..tm.len() {
            let scale = ts[c].max(1e-3);
            assert!(
                (fm[c] - tm[c]).abs() < tol * scale,
                "{key}[{c}]: mean {} vs target {}",
                fm[c],
                tm[c]
            );
            if missed.contains(&c) {
                assert!(
                    fs[c] > ts[c] * (1.0 - tol),
                    "{key}[{c}]: std {} below the target {}",
                    fs[c],
                    ts[c]
                );
            } else {
                assert!(
                    (fs[c] - ts[c]).abs() < tol * scale,
                    "{key}[{c}]: std {} vs target {}",
                    fs[c],
                    ts[c]
                );
            }
            worst = worst.min(ms[c] / ts[c]);
        }
    }
    worst
}
