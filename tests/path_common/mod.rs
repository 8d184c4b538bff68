//! Helpers shared by the path and barrier tests (declared by the `nn` test group).
#![allow(dead_code)]

use modelfusion::{Gradient, Model, Objective, Result, StateDict, StateDictF64, Tensor};
use ndarray::{ArrayD, IxDyn};

/// A model with a vector `w` of the given values and a 2x2 matrix `m`.
pub fn model(w: &[f64], m: [f64; 4]) -> StateDictF64 {
    StateDict::from_pairs([
        (
            "w",
            ArrayD::from_shape_vec(IxDyn(&[w.len()]), w.to_vec()).unwrap(),
        ),
        (
            "m",
            ArrayD::from_shape_vec(IxDyn(&[2, 2]), m.to_vec()).unwrap(),
        ),
    ])
    .unwrap()
}

/// A model with only a vector `w`.
pub fn vector(w: &[f64]) -> StateDictF64 {
    StateDict::from_pairs([("w", ndarray::arr1(w).into_dyn())]).unwrap()
}

/// Every element of every tensor, in order.
pub fn flat<M: Model>(m: &M) -> Vec<f64>
where
    <M::Tensor as Tensor>::Elem: Into<f64>,
{
    m.names()
        .flat_map(|n| {
            m.get(n)
                .unwrap()
                .view()
                .iter()
                .map(|&x| x.into())
                .collect::<Vec<f64>>()
        })
        .collect()
}

/// Bit-for-bit equality of two f64 models (distinguishes -0.0 from 0.0).
pub fn bits_equal(a: &StateDictF64, b: &StateDictF64) -> bool {
    a.names().eq(b.names())
        && flat(a)
            .iter()
            .zip(flat(b).iter())
            .all(|(x, y)| x.to_bits() == y.to_bits())
}

/// A ring-shaped valley centred at `(0, c)` through `(-1, 0)` and `(1, 0)`, over the
/// first two entries of `w`, plus a quadratic `0.5 * |m|^2 * s` on the matrix `m` (when
/// present) and the other entries of `w`:
/// `L = (|w01 - (0, c)|^2 - (1 + c^2))^2 + 0.5 s |rest|^2`.
pub struct Ring {
    pub c: f64,
    pub s: f64,
}

impl Ring {
    fn parts(&self, m: &StateDictF64) -> Result<(f64, StateDictF64)> {
        let w = m.require("w", "the model")?;
        let (x, y) = (w[[0]], w[[1]] - self.c);
        let r = x * x + y * y - (1.0 + self.c * self.c);
        let mut loss = r * r;
        let mut grad = m.scale(self.s)?;
        loss += 0.5 * self.s * (m.norm().powi(2) - w[[0]].powi(2) - w[[1]].powi(2));
        let gw = grad.get_mut("w").unwrap();
        gw[[0]] = 4.0 * r * x;
        gw[[1]] = 4.0 * r * y;
        Ok((loss, grad))
    }
}

impl Objective<StateDictF64> for Ring {
    fn loss(&self, m: &StateDictF64) -> Result<f64> {
        Ok(self.parts(m)?.0)
    }
}

impl Gradient<StateDictF64> for Ring {
    fn loss_and_gradient(&self, m: &StateDictF64) -> Result<(f64, StateDictF64)> {
        self.parts(m)
    }
}
