//! Differentiable re-basin (Peña, Medeiros, Ortiz & Raposo 2023): soft permutations
//! from the Sinkhorn operator over learnable logits, trained end to end, hardened to
//! permutations at the end.

use std::collections::BTreeMap;

use ndarray::{Array1, Array2, ArrayD, Axis};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::ste::{check_steps, checked_gradient, report_step};
use super::{
    AlignStats, Aligner, Alignment, check_pair, map_axis, max_assignment_as, refuse_heads,
};
use crate::error::{Error, Result, check_positive};
use crate::model::{Model, StateDict, StateDictF64};
use crate::objective::Gradient;
use crate::optim::{ModelOptimizer, Optimizer};
use crate::perm::{PermutationSet, PermutationSpec};
use crate::progress::{Observer, Silent};
use crate::tensor::{Scalar, Tensor};

/// What differentiable re-basin minimises over the soft-aligned model `P(B)`: a loss of
/// `(reference, aligned)` and its gradient with respect to `aligned`.
///
/// Implemented by [`MidpointLoss`] (a task loss at `(A + P(B)) / 2`) and
/// [`WeightDistance`] (the data-free `||A - P(B)||^2`); implement it for another
/// criterion.
///
/// ```
/// use modelfusion::align::{RebasinLoss, WeightDistance};
/// use modelfusion::{Model, StateDict};
/// let a = StateDict::from_pairs([("w", ndarray::arr1(&[1.0f64, 2.0]).into_dyn())])?;
/// let b = StateDict::from_pairs([("w", ndarray::arr1(&[2.0f64, 0.0]).into_dyn())])?;
/// let spec = modelfusion::perm::PermutationSpec::default(); // no groups: every parameter counts
/// let (loss, grad) = WeightDistance.loss_and_gradient(&a, &b, &spec)?;
/// assert_eq!(loss, 5.0);
/// assert_eq!(grad.get("w").unwrap()[[1]], -4.0);
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub trait RebasinLoss<M: Model> {
    /// The loss at `aligned` (B under the current soft permutations) and its gradient
    /// with respect to `aligned` (same names and shapes).
    fn loss_and_gradient(
        &self,
        reference: &M,
        aligned: &M,
        spec: &PermutationSpec,
    ) -> Result<(f64, M)>;
}

/// The task loss at the midpoint `(A + P(B)) / 2`; its gradient with respect to `P(B)`
/// is half the objective's gradient there.
///
/// ```
/// use modelfusion::align::{MidpointLoss, RebasinLoss};
/// use modelfusion::{Model, Objective, StateDict, StateDictF64};
/// // f(m) = |m|^2 / 2, gradient m
/// struct Half;
/// impl Objective<StateDictF64> for Half {
///     fn loss(&self, m: &StateDictF64) -> modelfusion::Result<f64> { Ok(m.norm().powi(2) / 2.0) }
/// }
/// impl modelfusion::Gradient<StateDictF64> for Half {
///     fn loss_and_gradient(&self, m: &StateDictF64) -> modelfusion::Result<(f64, StateDictF64)> {
///         Ok((self.loss(m)?, m.clone()))
///     }
/// }
/// let a = StateDict::from_pairs([("w", ndarray::arr1(&[1.0, 3.0]).into_dyn())])?;
/// let b = StateDict::from_pairs([("w", ndarray::arr1(&[3.0, 1.0]).into_dyn())])?;
/// let (loss, g) = MidpointLoss(Half).loss_and_gradient(&a, &b, &Default::default())?;
/// assert!((loss - 4.0).abs() < 1e-12); // midpoint (2, 2)
/// assert_eq!(g.get("w").unwrap()[[0]], 1.0);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct MidpointLoss<G>(pub G);

impl<M: Model, G: Gradient<M>> RebasinLoss<M> for MidpointLoss<G> {
    fn loss_and_gradient(
        &self,
        reference: &M,
        aligned: &M,
        _: &PermutationSpec,
    ) -> Result<(f64, M)> {
        let midpoint = reference.lerp(aligned, 0.5)?;
        let (loss, grad) = checked_gradient(&self.0, &midpoint, "the midpoint")?;
        Ok((loss, grad.scale(0.5)?))
    }
}

/// The data-free criterion `sum ||A - P(B)||^2` over every parameter that is not
/// passive ([`PermutationSpec::is_passive`]), weight matching's distance made smooth.
/// See [`RebasinLoss`] for an example.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WeightDistance;

impl<M: Model> RebasinLoss<M> for WeightDistance {
    fn loss_and_gradient(
        &self,
        reference: &M,
        aligned: &M,
        spec: &PermutationSpec,
    ) -> Result<(f64, M)> {
        let mut loss = 0.0;
        let grad = aligned.zip_map(reference, |name, p, a| {
            if spec.is_passive(name) {
                return Ok(p.map(|_| Scalar::from_f64_lossy(0.0)));
            }
            let d = p.zip_map(a, |x, y| x - y)?;
            loss += d.norm_sq();
            Ok(d.map(|x| x + x))
        })?;
        Ok((loss, grad))
    }
}

/// Differentiable (Sinkhorn) re-basin: one matrix of logits `S_g` per permutation group,
/// soft permutations `P_g = sinkhorn(S_g / tau)`, trained so that the soft-aligned `B`
/// minimises a [`RebasinLoss`]; the result is hardened to a permutation per group (the
/// assignment maximising `sum_i S_g[i, perm[i]]`, by the crate's LAP).
///
/// `P(B)` multiplies every axis of B that a group permutes by that group's soft
/// permutation (a weight of an MLP layer becomes `P_out W P_in^T`, its bias `P_out b`).
/// The gradient flows back through those products (`dL/dP = G_(axis) X_(axis)^T` for
/// each factor, `X` the tensor before it, `G` the gradient after it) and then through
/// the unrolled log-domain Sinkhorn iterations (each row or column normalisation
/// `Z' = Z - lse(Z)` has the adjoint `dZ = dZ' - exp(Z') * sum(dZ')` along the lane).
/// Logits start as seeded uniform noise in `[-0.01, 0.01]`; each step is one
/// optimiser step (Adam, learning rate 0.1, by default) on all logits.
/// [`AlignStats::objective`] holds the loss of every step.
///
/// Forward, the operator is the crate's
/// [`sinkhorn_operator`](crate::solve::sinkhorn_operator) (the same values; tested);
/// it is replayed here in log form because the backward pass needs its iterates.
/// Groups with repeat factors (a flatten) and attention groups are refused.
///
/// ```
/// use modelfusion::align::{Aligner, SinkhornRebasin};
/// use modelfusion::perm::{specs::{Architecture, MlpShapes}, PermutationSet};
/// use modelfusion::Model;
///
/// let arch = MlpShapes::new(&[6, 8, 3])?;
/// let spec = arch.spec();
/// let a = arch.random_model(0);
/// let planted = PermutationSet::random(&spec, &a, 1)?;
/// let b = spec.apply(&planted, &a)?;
/// // data-free: minimise ||A - P(B)||^2
/// let al = SinkhornRebasin::weight_distance(0).with_steps(300)?.align(&a, &b, &spec)?;
/// assert_eq!(al.permutations().unwrap(), planted.inverse());
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct SinkhornRebasin<L> {
    loss: L,
    seed: u64,
    steps: usize,
    optimizer: Optimizer,
    tau: f64,
    n_iter: usize,
}

impl SinkhornRebasin<WeightDistance> {
    /// The data-free variant: minimises [`WeightDistance`].
    ///
    /// ```
    /// use modelfusion::align::SinkhornRebasin;
    /// assert_eq!(SinkhornRebasin::weight_distance(4).seed(), 4);
    /// ```
    pub fn weight_distance(seed: u64) -> Self {
        SinkhornRebasin::new(WeightDistance, seed)
    }
}

impl<G> SinkhornRebasin<MidpointLoss<G>> {
    /// Minimises `objective` at the midpoint `(A + P(B)) / 2` ([`MidpointLoss`]).
    ///
    /// ```
    /// use modelfusion::align::SinkhornRebasin;
    /// assert_eq!(SinkhornRebasin::midpoint((), 0).steps(), 200);
    /// ```
    pub fn midpoint(objective: G, seed: u64) -> Self {
        SinkhornRebasin::new(MidpointLoss(objective), seed)
    }
}

impl<L> SinkhornRebasin<L> {
    /// Differentiable re-basin minimising `loss`, logits initialised from `seed`: 200
    /// steps of Adam with learning rate 0.1, temperature `tau = 1`, 20 Sinkhorn
    /// iterations.
    ///
    /// ```
    /// use modelfusion::align::{SinkhornRebasin, WeightDistance};
    /// let s = SinkhornRebasin::new(WeightDistance, 0);
    /// assert_eq!((s.tau(), s.n_iter(), s.optimizer().lr()), (1.0, 20, 0.1));
    /// ```
    pub fn new(loss: L, seed: u64) -> Self {
        SinkhornRebasin {
            loss,
            seed,
            steps: 200,
            optimizer: Optimizer::Adam {
                lr: 0.1,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            tau: 1.0,
            n_iter: 20,
        }
    }

    /// Trains the logits for `steps` steps (at least 1).
    ///
    /// ```
    /// use modelfusion::align::SinkhornRebasin;
    /// assert!(SinkhornRebasin::weight_distance(0).with_steps(0).is_err());
    /// ```
    pub fn with_steps(mut self, steps: usize) -> Result<Self> {
        self.steps = check_steps(steps)?;
        Ok(self)
    }

    /// Updates the logits with `optimizer` (checked).
    ///
    /// ```
    /// use modelfusion::align::SinkhornRebasin;
    /// use modelfusion::optim::Optimizer;
    /// let bad = Optimizer::Adam { lr: -0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8 };
    /// assert!(SinkhornRebasin::weight_distance(0).with_optimizer(bad).is_err());
    /// ```
    pub fn with_optimizer(mut self, optimizer: Optimizer) -> Result<Self> {
        optimizer.validate()?;
        self.optimizer = optimizer;
        Ok(self)
    }

    /// Adam with learning rate `lr` (finite, `> 0`) and the usual defaults.
    ///
    /// ```
    /// use modelfusion::align::SinkhornRebasin;
    /// assert!(SinkhornRebasin::weight_distance(0).with_learning_rate(0.0).is_err());
    /// ```
    pub fn with_learning_rate(self, lr: f64) -> Result<Self> {
        self.with_optimizer(Optimizer::adam(lr)?)
    }

    /// The Sinkhorn temperature (finite, `> 0`; smaller is closer to a permutation).
    ///
    /// ```
    /// use modelfusion::align::SinkhornRebasin;
    /// assert_eq!(SinkhornRebasin::weight_distance(0).with_tau(0.5)?.tau(), 0.5);
    /// assert!(SinkhornRebasin::weight_distance(0).with_tau(0.0).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_tau(mut self, tau: f64) -> Result<Self> {
        check_positive("tau", tau)?;
        self.tau = tau;
        Ok(self)
    }

    /// Sinkhorn iterations (row and column normalisations) per step, at least 1.
    ///
    /// ```
    /// use modelfusion::align::SinkhornRebasin;
    /// assert!(SinkhornRebasin::weight_distance(0).with_n_iter(0).is_err());
    /// ```
    pub fn with_n_iter(mut self, n_iter: usize) -> Result<Self> {
        if n_iter == 0 {
            return Err(Error::invalid("n_iter", "must be at least 1, got 0"));
        }
        self.n_iter = n_iter;
        Ok(self)
    }

    /// Training steps.
    ///
    /// ```
    /// assert_eq!(modelfusion::align::SinkhornRebasin::weight_distance(0).steps(), 200);
    /// ```
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// The seed of the logits' initial noise.
    ///
    /// ```
    /// assert_eq!(modelfusion::align::SinkhornRebasin::weight_distance(2).seed(), 2);
    /// ```
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The logits' optimiser.
    ///
    /// ```
    /// assert_eq!(modelfusion::align::SinkhornRebasin::weight_distance(0).optimizer().lr(), 0.1);
    /// ```
    pub fn optimizer(&self) -> &Optimizer {
        &self.optimizer
    }

    /// The temperature.
    ///
    /// ```
    /// assert_eq!(modelfusion::align::SinkhornRebasin::weight_distance(0).tau(), 1.0);
    /// ```
    pub fn tau(&self) -> f64 {
        self.tau
    }

    /// Sinkhorn iterations per step.
    ///
    /// ```
    /// assert_eq!(modelfusion::align::SinkhornRebasin::weight_distance(0).n_iter(), 20);
    /// ```
    pub fn n_iter(&self) -> usize {
        self.n_iter
    }
}

/// The `(row, column)` log-normalisers of every Sinkhorn iteration.
type Tape = Vec<(Array1<f64>, Array1<f64>)>;

/// Per parameter, the tensors before each soft-permutation factor.
type FactorInputs = BTreeMap<String, Vec<ArrayD<f64>>>;

/// One group's soft permutation `p = exp(z)` with its tape.
struct SoftGroup {
    p: Array2<f64>,
    z: Array2<f64>,
    tape: Tape,
}

/// The soft permutations of every group with what their backward pass needs.
struct SoftPerms {
    groups: BTreeMap<String, SoftGroup>,
}

/// The Sinkhorn operator in log form, with its tape: returns the final log-plan `Z`
/// and the `(row, column)` log-normalisers subtracted at each iteration.
fn sinkhorn_forward(logits: &Array2<f64>, tau: f64, n_iter: usize) -> (Array2<f64>, Tape) {
    let mut z = logits / tau;
    let mut tape = Vec::with_capacity(n_iter);
    for _ in 0..n_iter {
        let r = logsumexp(&z, Axis(1));
        z -= &r.view().insert_axis(Axis(1));
        let c = logsumexp(&z, Axis(0));
        z -= &c.view().insert_axis(Axis(0));
        tape.push((r, c));
    }
    (z, tape)
}

/// The gradient with respect to the logits of a loss whose gradient with respect to
/// `P = exp(z)` is `grad` (`z`, `tape` from [`sinkhorn_forward`]).
fn sinkhorn_backward(z: &Array2<f64>, tape: &Tape, grad: &Array2<f64>, tau: f64) -> Array2<f64> {
    let mut z = z.clone();
    let mut dz = grad * &z.mapv(f64::exp);
    for (r, c) in tape.iter().rev() {
        // column step: z = z_r - c
        let s = dz.sum_axis(Axis(0));
        dz -= &(z.mapv(f64::exp) * s.view().insert_axis(Axis(0)));
        z += &c.view().insert_axis(Axis(0));
        // row step: z_r = z_prev - r
        let s = dz.sum_axis(Axis(1));
        dz -= &(z.mapv(f64::exp) * s.view().insert_axis(Axis(1)));
        z += &r.view().insert_axis(Axis(1));
    }
    dz / tau
}

/// `log sum exp` of every lane along `axis` (a vector over the other axis).
fn logsumexp(z: &Array2<f64>, axis: Axis) -> Array1<f64> {
    z.lanes(axis)
        .into_iter()
        .map(|lane| {
            let m = lane.fold(f64::NEG_INFINITY, |m, &x| m.max(x));
            m + lane.iter().map(|&x| (x - m).exp()).sum::<f64>().ln()
        })
        .collect()
}

impl SoftPerms {
    fn new(logits: &StateDictF64, tau: f64, n_iter: usize) -> Result<Self> {
        let mut groups = BTreeMap::new();
        for (g, s) in logits.iter() {
            let s = s
                .view()
                .into_dimensionality::<ndarray::Ix2>()
                .map_err(|e| {
                    Error::invalid(
                        "logits",
                        format!("group `{g}` logits are not a matrix: {e}"),
                    )
                })?;
            let (z, tape) = sinkhorn_forward(&s.to_owned(), tau, n_iter);
            groups.insert(
                g.to_string(),
                SoftGroup {
                    p: z.mapv(f64::exp),
                    z,
                    tape,
                },
            );
        }
        Ok(SoftPerms { groups })
    }

    fn p(&self, g: &str) -> Result<&Array2<f64>> {
        self.groups.get(g).map(|x| &x.p).ok_or_else(|| Error::Spec {
            reason: format!("no logits for group `{g}`"),
        })
    }

    /// `model` with every permuted axis multiplied by its group's soft permutation,
    /// and, per parameter, the tensors before each factor (for the backward pass).
    fn apply<M: Model>(&self, spec: &PermutationSpec, model: &M) -> Result<(M, FactorInputs)> {
        let mut inputs = BTreeMap::new();
        let out = model.try_map(|name, t| {
            let axes: Vec<(usize, &str)> = spec.param_axes(name).collect();
            if axes.is_empty() {
                return Ok(t.clone());
            }
            let mut x: ArrayD<f64> = t.view().mapv(Scalar::to_f64_lossless);
            let mut before = Vec::with_capacity(axes.len());
            for (axis, g) in axes {
                let next = map_axis(&x, axis, self.p(g)?)?;
                before.push(std::mem::replace(&mut x, next));
            }
            inputs.insert(name.to_string(), before);
            Ok(M::Tensor::from_array(x.mapv(Scalar::from_f64_lossy)))
        })?;
        Ok((out, inputs))
    }

    /// The gradient with respect to every group's logits from the gradient `grad`
    /// with respect to the soft-aligned model.
    fn backward<M: Model>(
        &self,
        spec: &PermutationSpec,
        grad: &M,
        inputs: &FactorInputs,
        tau: f64,
    ) -> Result<StateDictF64> {
        let mut dp: BTreeMap<&str, Array2<f64>> = self
            .groups
            .iter()
            .map(|(g, s)| (g.as_str(), Array2::zeros(s.p.dim())))
            .collect();
        for (name, before) in inputs {
            let t = grad.require(name, "the loss gradient")?;
            let mut gx: ArrayD<f64> = t.view().mapv(Scalar::to_f64_lossless);
            let axes: Vec<(usize, &str)> = spec.param_axes(name).collect();
            for ((axis, g), x) in axes.iter().zip(before).rev() {
                let p = self.p(g)?;
                let acc = dp.get_mut(g).ok_or_else(|| Error::Spec {
                    reason: format!("no logits for group `{g}`"),
                })?;
                *acc += &gx.unfold(*axis)?.dot(&x.unfold(*axis)?.t());
                gx = map_axis(&gx, *axis, &p.t().to_owned())?;
            }
        }
        let pairs = self
            .groups
            .iter()
            .map(|(g, s)| {
                let d = sinkhorn_backward(&s.z, &s.tape, &dp[g.as_str()], tau);
                (g.clone(), d.into_dyn())
            })
            .collect::<Vec<_>>();
        StateDict::from_pairs(pairs)
    }
}

impl<L> SinkhornRebasin<L> {
    /// The loss at `logits` and its gradient with respect to them.
    fn loss_and_gradient<M: Model>(
        &self,
        reference: &M,
        other: &M,
        spec: &PermutationSpec,
        logits: &StateDictF64,
    ) -> Result<(f64, StateDictF64)>
    where
        L: RebasinLoss<M>,
    {
        let soft = SoftPerms::new(logits, self.tau, self.n_iter)?;
        let (aligned, inputs) = soft.apply(spec, other)?;
        let (loss, grad) = self.loss.loss_and_gradient(reference, &aligned, spec)?;
        if !loss.is_finite() {
            return Err(Error::Objective(format!(
                "the differentiable re-basin loss is {loss}, not finite"
            )));
        }
        aligned
            .check_compatible(&grad)
            .map_err(|e| Error::Objective(format!("the loss gradient does not fit: {e}")))?;
        Ok((loss, soft.backward(spec, &grad, &inputs, self.tau)?))
    }
}

/// Checks what [`SinkhornRebasin`] cannot handle and returns the group sizes.
fn check_plain(spec: &PermutationSpec) -> Result<()> {
    refuse_heads(spec, "SinkhornRebasin")?;
    match spec
        .groups()
        .find(|(_, axes)| axes.iter().any(|(p, a)| spec.rule(p, *a).repeat > 1))
    {
        Some((g, _)) => Err(Error::Unsupported {
            what: format!("SinkhornRebasin on group `{g}`"),
            reason: "its axes are flattened (repeat factors above 1); soft permutations act on plain axes only".into(),
        }),
        None => Ok(()),
    }
}

impl<M: Model, L: RebasinLoss<M>> Aligner<M> for SinkhornRebasin<L> {
    fn align(&self, reference: &M, other: &M, spec: &PermutationSpec) -> Result<Alignment> {
        self.align_observed(reference, other, spec, &mut Silent)
    }

    /// Reports every step ([`Progress::Step`](crate::progress::Progress::Step) with
    /// `t = 0.5` and the loss); a stop returns [`Error::Cancelled`].
    ///
    /// ```
    /// use modelfusion::align::{Aligner, SinkhornRebasin};
    /// use modelfusion::perm::specs::{Architecture, MlpShapes};
    /// use modelfusion::progress::{from_fn, Progress};
    /// let arch = MlpShapes::new(&[3, 4, 2])?;
    /// let (a, b) = (arch.random_model(0), arch.random_model(1));
    /// let mut losses = Vec::new();
    /// let al = SinkhornRebasin::weight_distance(0).with_steps(5)?.align_observed(&a, &b, &arch.spec(), &mut from_fn(|p| {
    ///     if let Progress::Step { loss, .. } = *p { losses.push(loss) }
    /// }))?;
    /// assert_eq!(losses, al.stats().objective);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    fn align_observed(
        &self,
        reference: &M,
        other: &M,
        spec: &PermutationSpec,
        observer: &mut dyn Observer,
    ) -> Result<Alignment> {
        let sizes = check_pair(reference, other, spec)?;
        check_plain(spec)?;
        check_steps(self.steps)?;
        check_positive("tau", self.tau)?;
        self.optimizer.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let mut logits = StateDict::from_pairs(sizes.iter().map(|(g, &n)| {
            let s = Array2::from_shape_fn((n, n), |_| 0.02 * rng.random::<f64>() - 0.01);
            (g.clone(), s.into_dyn())
        }))?;
        let mut optimizer = ModelOptimizer::new(self.optimizer);
        let mut history = Vec::with_capacity(self.steps);
        for step in 0..self.steps {
            let (loss, grad) = self.loss_and_gradient(reference, other, spec, &logits)?;
            optimizer.step(&mut logits, &grad, 1.0)?;
            logits.check_finite("the re-basin logits (lower the learning rate)")?;
            history.push(loss);
            report_step(observer, "differentiable re-basin", step, self.steps, loss)?;
        }
        let mut perms = PermutationSet::new();
        for (g, s) in logits.iter() {
            let s = s
                .view()
                .into_dimensionality::<ndarray::Ix2>()
                .map_err(|e| Error::invalid("logits", format!("group `{g}`: {e}")))?;
            perms.insert(g, max_assignment_as::<f64>(&s.to_owned())?);
        }
        let stats = AlignStats {
            objective: history,
            sweeps: self.steps,
            ..AlignStats::default()
        };
        Ok(Alignment::from_permutations(perms, stats).with_spec(spec))
    }
}

/// The golden-file reader of the integration tests.
#[cfg(test)]
#[path = "../../tests/common/golden.rs"]
mod golden;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::solve::sinkhorn_operator;

    fn scores(n: usize, seed: u64) -> Array2<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Array2::from_shape_fn((n, n), |_| 4.0 * rng.random::<f64>() - 2.0)
    }

    #[test]
    fn forward_is_the_crate_operator() {
        for (n, tau, it) in [(5, 1.0, 20), (7, 0.3, 5), (3, 2.0, 1)] {
            let s = scores(n, n as u64);
            let (z, _) = sinkhorn_forward(&s, tau, it);
            let want = sinkhorn_operator(s.view(), tau, it).unwrap();
            let diff = (&z.mapv(f64::exp) - &want)
                .mapv(f64::abs)
                .fold(0.0, |m: f64, &x| m.max(x));
            assert!(diff < 1e-12, "n {n} tau {tau} iters {it}: {diff:e}");
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (n, tau, it) = (4, 0.7, 6);
        let s = scores(n, 3);
        let w = scores(n, 4); // loss <W, P>
        let loss = |s: &Array2<f64>| (sinkhorn_forward(s, tau, it).0.mapv(f64::exp) * &w).sum();
        let (z, tape) = sinkhorn_forward(&s, tau, it);
        let g = sinkhorn_backward(&z, &tape, &w, tau);
        let h = 1e-6;
        for i in 0..n {
            for j in 0..n {
                let (mut up, mut down) = (s.clone(), s.clone());
                up[[i, j]] += h;
                down[[i, j]] -= h;
                let fd = (loss(&up) - loss(&down)) / (2.0 * h);
                assert!(
                    (fd - g[[i, j]]).abs() < 1e-7,
                    "[{i}, {j}]: {fd} vs {}",
                    g[[i, j]]
                );
            }
        }
    }

    fn golden() -> BTreeMap<String, ArrayD<f64>> {
        super::golden::golden_table(include_str!("../../tests/golden/align/ste.txt"))
    }

    fn golden_model(g: &BTreeMap<String, ArrayD<f64>>, prefix: &str) -> StateDictF64 {
        StateDict::from_pairs(
            [
                "layers.0.weight",
                "layers.0.bias",
                "layers.1.weight",
                "layers.1.bias",
            ]
            .map(|n| (n, g[&format!("{prefix}.{n}")].clone())),
        )
        .unwrap()
    }

    fn max_diff(a: &ArrayD<f64>, b: &ArrayD<f64>) -> f64 {
        (a - b).mapv(f64::abs).fold(0.0, |m: f64, &x| m.max(x))
    }

    /// Loss and logits gradient against JAX autodiff through the same unrolled
    /// iterations (tests/golden/align/ste_golden.py).
    #[cfg(feature = "nn")]
    #[test]
    fn loss_and_gradient_match_jax() {
        use crate::nn::{Classification, Dataset, Mlp};
        let g = golden();
        let (a, b) = (golden_model(&g, "a"), golden_model(&g, "b"));
        let spec = crate::perm::specs::mlp(1);
        let logits = StateDict::from_pairs([("hidden.0", g["sinkhorn.logits"].clone())]).unwrap();
        let soft = SoftPerms::new(&logits, 0.5, 8).unwrap();
        let p = soft.p("hidden.0").unwrap().clone().into_dyn();
        assert!(max_diff(&p, &g["sinkhorn.p"]) < 1e-12);
        let x = g["x"]
            .clone()
            .into_dimensionality()
            .unwrap()
            .mapv(|v: f64| v as f32);
        let y = g["y"].iter().map(|&v| v as usize).collect();
        let data = Dataset::new(x, y, 3).unwrap();
        let net = Mlp::new(&[5, 7, 3]).unwrap();
        let task = Classification::new(&net, &data, 16).unwrap();
        let distance = SinkhornRebasin::weight_distance(0)
            .with_tau(0.5)
            .unwrap()
            .with_n_iter(8)
            .unwrap();
        let midpoint = SinkhornRebasin::midpoint(task.clone(), 0)
            .with_tau(0.5)
            .unwrap()
            .with_n_iter(8)
            .unwrap();
        for (name, (loss, grad)) in [
            (
                "distance",
                distance.loss_and_gradient(&a, &b, &spec, &logits).unwrap(),
            ),
            (
                "midpoint",
                midpoint.loss_and_gradient(&a, &b, &spec, &logits).unwrap(),
            ),
        ] {
            let want = g[&format!("sinkhorn.{name}.loss")][[0]];
            assert!(
                (loss - want).abs() < 1e-10 * want.abs().max(1.0),
                "{name}: {loss} vs {want}"
            );
            let d = max_diff(
                grad.get("hidden.0").unwrap(),
                &g[&format!("sinkhorn.{name}.grad")],
            );
            assert!(d < 1e-9, "{name}: gradient off by {d:e}");
        }
    }

    /// The chain rule through `P_out W P_in^T` on two groups, against finite
    /// differences of the whole loss.
    #[test]
    fn two_group_gradient_matches_finite_differences() {
        use crate::perm::specs::{Architecture, MlpShapes};
        let arch = MlpShapes::new(&[3, 4, 5, 2]).unwrap();
        let spec = arch.spec();
        let to64 = |m: &crate::model::StateDictF32| -> StateDictF64 {
            StateDict::from_pairs(m.iter().map(|(n, t)| (n, t.mapv(f64::from)))).unwrap()
        };
        let (a, b) = (to64(&arch.random_model(0)), to64(&arch.random_model(1)));
        let logits = StateDict::from_pairs([
            ("hidden.0", scores(4, 5).into_dyn()),
            ("hidden.1", scores(5, 6).into_dyn()),
        ])
        .unwrap();
        let rebasin = SinkhornRebasin::weight_distance(0)
            .with_tau(0.8)
            .unwrap()
            .with_n_iter(5)
            .unwrap();
        let (_, grad) = rebasin.loss_and_gradient(&a, &b, &spec, &logits).unwrap();
        let h = 1e-6;
        for (g, s) in logits.iter() {
            for idx in ndarray::indices(s.shape()) {
                let shifted = |delta: f64| {
                    let mut l = logits.clone();
                    l.get_mut(g).unwrap()[&idx] += delta;
                    rebasin.loss_and_gradient(&a, &b, &spec, &l).unwrap().0
                };
                let fd = (shifted(h) - shifted(-h)) / (2.0 * h);
                let an = grad.get(g).unwrap()[&idx];
                assert!(
                    (fd - an).abs() < 1e-6 * fd.abs().max(1.0),
                    "{g} {idx:?}: {fd} vs {an}"
                );
            }
        }
    }
}
