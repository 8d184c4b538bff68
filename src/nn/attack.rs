//! Adversarial inputs for the reference networks: projected gradient ascent on the loss
//! (PGD, Madry et al. 2018) in an L-inf or L2 ball, FGSM as its one-step case, and a
//! [`Classification`] task evaluated or trained on attacked inputs ([`Robust`]).

use ndarray::{Array2, ArrayView2, Axis, Zip};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::{Error, Result, check_finite, check_nonnegative};
use crate::model::StateDict;
use crate::objective::{Objective, StochasticGradient};
use crate::tensor::{Scalar, Tensor};

use super::eval::{Classification, Evaluation};
use super::layers::convert_batch;
use super::{Mode, Network, per_sample_loss_and_input_gradient};

/// The ball a perturbation lives in.
///
/// ```
/// use modelfusion::nn::Norm;
/// assert_ne!(Norm::LInf, Norm::L2);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Norm {
    /// `max_j |delta_j| <= eps`; steps follow the sign of the gradient.
    LInf,
    /// `sqrt(sum_j delta_j^2) <= eps` per sample; steps follow the normalised gradient.
    L2,
}

/// Projected gradient ascent on the cross-entropy with respect to the inputs (Madry et
/// al. 2018), per sample in a ball of radius `eps` around the clean input.
///
/// Each step moves the adversarial input by `step_size` along the sign of the input
/// gradient ([`Norm::LInf`]) or along the gradient divided by its L2 norm
/// ([`Norm::L2`]; a zero gradient does not move), projects the perturbation back onto the
/// ball, then clips the input to the data range when one is set
/// ([`with_range`](Pgd::with_range); clipping a clean input that lies in the range never
/// leaves the ball). An optional random start ([`with_random_start`](Pgd::with_random_start))
/// first draws the perturbation uniformly in the ball from ChaCha8 seeded with
/// [`with_seed`](Pgd::with_seed) (L-inf: each coordinate uniform in `[-eps, eps]`; L2:
/// a Gaussian direction with radius `eps * u^(1/d)`).
///
/// The result is, per sample, the iterate with the **largest** loss among the clean
/// input, the random start and every step (as AutoAttack keeps its best point), so the
/// attacked loss is never below the clean one in evaluation mode. [`Pgd::fgsm`] is the
/// one-step case (Goodfellow et al. 2015): step size `eps`, no random start.
///
/// The network runs in [`Mode::Eval`] (running statistics) unless changed with
/// [`with_mode`](Pgd::with_mode); with [`Mode::Train`] a sample's loss depends on its
/// whole batch, so the per-sample choice of the best iterate is then approximate.
///
/// ```
/// use modelfusion::nn::{data, Mlp, Network, Norm, Pgd};
/// use modelfusion::StateDictF32;
///
/// let d = data::digits()?.head(32);
/// let net = Mlp::new(&[64, 16, 10])?;
/// let p: StateDictF32 = net.init(0);
/// let pgd = Pgd::new(Norm::LInf, 0.1, 0.025, 10)?
///     .with_random_start(true)
///     .with_seed(3)
///     .with_range(0.0, 1.0)?;
/// let adv = pgd.perturb(&net, &p, d.x().view(), d.y())?;
/// assert!(adv.loss >= adv.clean_loss);
/// let moved = (&adv.x - d.x()).iter().fold(0f32, |m, v| m.max(v.abs()));
/// assert!(moved <= 0.1 + 1e-6);
/// assert!(Pgd::new(Norm::L2, -1.0, 0.1, 5).is_err());
/// assert!(Pgd::new(Norm::L2, 1.0, 0.1, 0).is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Pgd {
    norm: Norm,
    eps: f64,
    step_size: f64,
    steps: usize,
    random_start: bool,
    seed: u64,
    range: Option<(f64, f64)>,
    mode: Mode,
}

/// What [`Pgd::perturb`] returns.
///
/// ```
/// use modelfusion::nn::{Mlp, Network, Pgd};
/// let net = Mlp::new(&[2, 2])?;
/// let p = net.init::<ndarray::ArrayD<f64>>(0);
/// let adv = Pgd::fgsm(0.5)?.perturb(&net, &p, ndarray::array![[0.0, 1.0]].view(), &[1])?;
/// assert_eq!(adv.x.dim(), (1, 2));
/// assert!(adv.loss >= adv.clean_loss);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Perturbed<S> {
    /// The adversarial batch, `(samples, features)`.
    pub x: Array2<S>,
    /// Mean cross-entropy of the clean batch.
    pub clean_loss: f64,
    /// Mean cross-entropy of the adversarial batch (of the best iterate of every sample).
    pub loss: f64,
}

impl Pgd {
    /// `steps` steps of size `step_size` in the `norm` ball of radius `eps`: no random
    /// start, seed 0, no clipping, evaluation mode. Errors unless `eps` and `step_size`
    /// are finite and `>= 0` and `steps >= 1`.
    ///
    /// ```
    /// use modelfusion::nn::{Norm, Pgd};
    /// let pgd = Pgd::new(Norm::L2, 1.0, 0.25, 10)?;
    /// assert_eq!((pgd.norm(), pgd.eps(), pgd.step_size(), pgd.steps()), (Norm::L2, 1.0, 0.25, 10));
    /// let e = Pgd::new(Norm::LInf, f64::NAN, 0.1, 3).unwrap_err().to_string();
    /// assert!(e.contains("eps"), "{e}");
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn new(norm: Norm, eps: f64, step_size: f64, steps: usize) -> Result<Self> {
        check_nonnegative("eps", eps)?;
        check_nonnegative("step_size", step_size)?;
        if steps == 0 {
            return Err(Error::invalid("steps", "must be at least 1, got 0"));
        }
        Ok(Pgd {
            norm,
            eps,
            step_size,
            steps,
            random_start: false,
            seed: 0,
            range: None,
            mode: Mode::Eval,
        })
    }

    /// The fast gradient sign method: one L-inf step of size `eps`, no random start.
    ///
    /// ```
    /// use modelfusion::nn::{Norm, Pgd};
    /// assert_eq!(Pgd::fgsm(0.1)?, Pgd::new(Norm::LInf, 0.1, 0.1, 1)?);
    /// assert!(Pgd::fgsm(-0.1).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn fgsm(eps: f64) -> Result<Self> {
        Pgd::new(Norm::LInf, eps, eps, 1)
    }

    /// Whether the attack starts from a random point of the ball (seeded, see
    /// [`with_seed`](Pgd::with_seed)) rather than from the clean input.
    ///
    /// ```
    /// use modelfusion::nn::Pgd;
    /// assert!(Pgd::fgsm(0.1)?.with_random_start(true).random_start());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_random_start(mut self, random_start: bool) -> Self {
        self.random_start = random_start;
        self
    }

    /// The seed of the random start. [`perturb_stream`](Pgd::perturb_stream) draws from
    /// stream `stream` of this seed, so different batches or steps get different starts.
    ///
    /// ```
    /// use modelfusion::nn::Pgd;
    /// assert_eq!(Pgd::fgsm(0.1)?.with_seed(9).seed(), 9);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Clips every adversarial input to `[lo, hi]` (e.g. `[0, 1]` for the crate's data
    /// sets); clean inputs outside it are then refused. Errors unless both are finite and
    /// `lo < hi`.
    ///
    /// ```
    /// use modelfusion::nn::Pgd;
    /// assert_eq!(Pgd::fgsm(0.1)?.with_range(0.0, 1.0)?.range(), Some((0.0, 1.0)));
    /// assert!(Pgd::fgsm(0.1)?.with_range(1.0, 0.0).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_range(mut self, lo: f64, hi: f64) -> Result<Self> {
        check_finite("range (lower end)", lo)?;
        check_finite("range (upper end)", hi)?;
        if lo >= hi {
            return Err(Error::invalid(
                "range",
                format!("the lower end must be below the upper one, got [{lo}, {hi}]"),
            ));
        }
        self.range = Some((lo, hi));
        Ok(self)
    }

    /// How the attacked network normalises ([`Mode::Eval`] by default).
    ///
    /// ```
    /// use modelfusion::nn::{Mode, Pgd};
    /// assert_eq!(Pgd::fgsm(0.1)?.with_mode(Mode::Train).mode(), Mode::Train);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// The ball's norm.
    pub fn norm(&self) -> Norm {
        self.norm
    }
    /// The ball's radius.
    pub fn eps(&self) -> f64 {
        self.eps
    }
    /// The step size.
    pub fn step_size(&self) -> f64 {
        self.step_size
    }
    /// The number of steps.
    pub fn steps(&self) -> usize {
        self.steps
    }
    /// Whether the attack starts at a random point of the ball.
    pub fn random_start(&self) -> bool {
        self.random_start
    }
    /// The seed of the random start.
    pub fn seed(&self) -> u64 {
        self.seed
    }
    /// The data range inputs are clipped to, if any.
    pub fn range(&self) -> Option<(f64, f64)> {
        self.range
    }
    /// How the attacked network normalises.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Attacks the labelled batch `x` `(samples, input_dim)` of `net` at `params`
    /// (stream 0 of the seed). Errors when `params` or `x` does not fit the network,
    /// `x` holds a non-finite value or one outside the data range, a label is out of
    /// range or the network gives no input gradient.
    ///
    /// ```
    /// use modelfusion::nn::{Mlp, Network, Pgd};
    /// let net = Mlp::new(&[3, 2])?;
    /// let p = net.init::<ndarray::ArrayD<f32>>(0);
    /// let wrong = ndarray::Array2::<f32>::zeros((2, 4));
    /// let e = Pgd::fgsm(0.1)?.perturb(&net, &p, wrong.view(), &[0, 1]).unwrap_err().to_string();
    /// assert!(e.contains("[2, 3]") && e.contains("[2, 4]"), "{e}");
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn perturb<N: Network, T: Tensor>(
        &self,
        net: &N,
        params: &StateDict<T>,
        x: ArrayView2<T::Elem>,
        labels: &[usize],
    ) -> Result<Perturbed<T::Elem>> {
        self.perturb_stream(net, params, x, labels, 0)
    }

    /// [`perturb`](Pgd::perturb) with the random start drawn from stream `stream` of the
    /// seed (e.g. the batch index or the training step).
    ///
    /// ```
    /// use modelfusion::nn::{Mlp, Network, Norm, Pgd};
    /// let net = Mlp::new(&[3, 2])?;
    /// let p = net.init::<ndarray::ArrayD<f64>>(0);
    /// let x = ndarray::Array2::from_elem((4, 3), 0.5);
    /// let pgd = Pgd::new(Norm::L2, 0.3, 0.1, 5)?.with_random_start(true);
    /// let a = pgd.perturb_stream(&net, &p, x.view(), &[0, 1, 0, 1], 1)?;
    /// let b = pgd.perturb_stream(&net, &p, x.view(), &[0, 1, 0, 1], 2)?;
    /// assert_ne!(a.x, b.x);
    /// assert_eq!(a, pgd.perturb_stream(&net, &p, x.view(), &[0, 1, 0, 1], 1)?);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn perturb_stream<N: Network, T: Tensor>(
        &self,
        net: &N,
        params: &StateDict<T>,
        x: ArrayView2<T::Elem>,
        labels: &[usize],
        stream: u64,
    ) -> Result<Perturbed<T::Elem>> {
        net.check_params(params)?;
        net.check_input(x)?;
        self.check_batch(x)?;
        let eval = |z: ArrayView2<T::Elem>| {
            per_sample_loss_and_input_gradient(net, params, z, labels, self.mode)
        };
        let (clean, mut grad) = eval(x)?;
        let mut best = x.to_owned();
        let mut best_loss = clean.clone();
        let mut adv = x.to_owned();
        let mut keep_best = |adv: &Array2<T::Elem>, losses: &[f64]| {
            for (i, &l) in losses.iter().enumerate() {
                if l > best_loss[i] {
                    best_loss[i] = l;
                    best.row_mut(i).assign(&adv.row(i));
                }
            }
        };
        if self.random_start && self.eps > 0.0 {
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
            rng.set_stream(stream);
            adv = &adv + &self.random_delta::<T::Elem>(x.dim(), &mut rng);
            self.clip(&mut adv);
            let (losses, g) = eval(adv.view())?;
            keep_best(&adv, &losses);
            grad = g;
        }
        for _ in 0..self.steps {
            adv = &adv + &self.direction(grad.view());
            let mut delta = &adv - &x;
            self.project(&mut delta);
            adv = &x + &delta;
            self.clip(&mut adv);
            let (losses, g) = eval(adv.view())?;
            keep_best(&adv, &losses);
            grad = g;
        }
        let n = x.nrows() as f64;
        Ok(Perturbed {
            x: best,
            clean_loss: clean.iter().sum::<f64>() / n,
            loss: best_loss.iter().sum::<f64>() / n,
        })
    }

    /// Errors on a non-finite input or one outside the data range.
    fn check_batch<S: Scalar>(&self, x: ArrayView2<S>) -> Result<()> {
        for ((i, j), &v) in x.indexed_iter() {
            let v = v.to_f64_lossless();
            if !v.is_finite() {
                return Err(Error::NonFinite {
                    what: format!("input value of sample {i}, feature {j} (got {v})"),
                });
            }
            if let Some((lo, hi)) = self.range
                && !(lo..=hi).contains(&v)
            {
                return Err(Error::invalid(
                    "x",
                    format!(
                        "input value {v} of sample {i}, feature {j} lies outside the data range [{lo}, {hi}]"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// A uniform draw from the ball, one row per sample.
    fn random_delta<S: Scalar>(&self, dim: (usize, usize), rng: &mut ChaCha8Rng) -> Array2<S> {
        let eps = self.eps;
        let delta = match self.norm {
            Norm::LInf => {
                Array2::from_shape_simple_fn(dim, || (rng.random::<f64>() * 2.0 - 1.0) * eps)
            }
            Norm::L2 => {
                let mut z: Array2<f64> =
                    Array2::from_shape_simple_fn(dim, || StandardNormal.sample(&mut *rng));
                for mut row in z.axis_iter_mut(Axis(0)) {
                    let norm = row.dot(&row).sqrt();
                    let radius = eps * rng.random::<f64>().powf(1.0 / dim.1 as f64);
                    if norm > 0.0 {
                        row *= radius / norm;
                    }
                }
                z
            }
        };
        delta.mapv(S::from_f64_lossy)
    }

    /// The step `step_size * sign(g)` (L-inf) or `step_size * g / |g|` per row (L2).
    fn direction<S: Scalar>(&self, grad: ArrayView2<S>) -> Array2<S> {
        let alpha = S::from_f64_lossy(self.step_size);
        match self.norm {
            Norm::LInf => grad.mapv(|g| {
                if g > S::zero() {
                    alpha
                } else if g < S::zero() {
                    -alpha
                } else {
                    S::zero()
                }
            }),
            Norm::L2 => {
                let mut step = grad.to_owned();
                for mut row in step.axis_iter_mut(Axis(0)) {
                    let norm = row.dot(&row).sqrt();
                    if norm > S::zero() {
                        row.mapv_inplace(|g| g * alpha / norm);
                    }
                }
                step
            }
        }
    }

    /// Projects every row of `delta` onto the ball.
    fn project<S: Scalar>(&self, delta: &mut Array2<S>) {
        let eps = S::from_f64_lossy(self.eps);
        match self.norm {
            Norm::LInf => delta.mapv_inplace(|d| clamp(d, -eps, eps)),
            Norm::L2 => {
                for mut row in delta.axis_iter_mut(Axis(0)) {
                    let norm = row.dot(&row).sqrt();
                    if norm > eps {
                        row.mapv_inplace(|d| d * eps / norm);
                    }
                }
            }
        }
    }

    /// Clips to the data range, if one is set.
    fn clip<S: Scalar>(&self, x: &mut Array2<S>) {
        if let Some((lo, hi)) = self.range {
            let (lo, hi) = (S::from_f64_lossy(lo), S::from_f64_lossy(hi));
            Zip::from(x).for_each(|v| *v = clamp(*v, lo, hi));
        }
    }
}

fn clamp<S: Scalar>(v: S, lo: S, hi: S) -> S {
    if v < lo {
        lo
    } else if v > hi {
        hi
    } else {
        v
    }
}

impl<'a, N: Network> Classification<'a, N> {
    /// The same task on inputs attacked by `attack` against the model being evaluated:
    /// robust loss and accuracy, the robust error rate as an [`Objective`], and
    /// adversarial minibatches as a [`StochasticGradient`] (robust mode connectivity,
    /// adversarial curve fitting).
    ///
    /// ```
    /// use modelfusion::nn::{data, Classification, Mlp, Network, Pgd};
    /// use modelfusion::StateDictF32;
    /// let d = data::digits()?.head(64);
    /// let net = Mlp::new(&[64, 10])?;
    /// let p: StateDictF32 = net.init(0);
    /// let task = Classification::new(&net, &d, 32)?;
    /// let robust = task.robust(Pgd::fgsm(0.1)?.with_range(0.0, 1.0)?);
    /// assert!(robust.evaluate(&p)?.loss >= task.evaluate(&p)?.loss);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn robust(&self, attack: Pgd) -> Robust<'a, N> {
        Robust {
            task: self.clone(),
            attack,
        }
    }
}

/// A [`Classification`] task on adversarial inputs: every batch is attacked by a [`Pgd`]
/// against the very model evaluated (after the task's statistics reset, if it has one),
/// batch `b` of an evaluation with stream `b`, minibatch step `s` with stream `s`. Build
/// it with [`Classification::robust`].
///
/// Implements [`Objective`] (the mean robust cross-entropy) and [`StochasticGradient`]:
/// at step `s` the loss and gradient of minibatch `s % num_batches` at its attacked
/// inputs, the inner maximisation of adversarial training (the gradient at the attacked
/// inputs is the gradient of the robust loss, by Danskin's theorem). Passed to
/// [`path::fit_curve_stochastic`](crate::path::fit_curve_stochastic) it is the robust
/// mode connectivity objective `E_t max_{|delta| <= eps} L(phi(t), x + delta)` (Wang et
/// al. 2023).
///
/// ```
/// use modelfusion::nn::{data, Classification, Mlp, Network, Pgd};
/// use modelfusion::{Model, Objective, StateDictF32, StochasticGradient};
/// let d = data::digits()?.head(64);
/// let net = Mlp::new(&[64, 10])?;
/// let p: StateDictF32 = net.init(0);
/// let mut robust = Classification::new(&net, &d, 32)?.robust(Pgd::fgsm(0.1)?);
/// let (loss, grad) = robust.loss_and_gradient_at(&p, 1)?;
/// assert!(loss > 0.0 && grad.num_tensors() == 2);
/// assert!((0.0..=1.0).contains(&robust.error_rate().loss(&p)?));
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Robust<'a, N> {
    task: Classification<'a, N>,
    attack: Pgd,
}

impl<'a, N: Network> Robust<'a, N> {
    /// The clean task.
    ///
    /// ```
    /// use modelfusion::nn::{data, Classification, Mlp, Pgd};
    /// let (d, net) = (data::digits()?.head(8), Mlp::new(&[64, 10])?);
    /// let robust = Classification::new(&net, &d, 4)?.robust(Pgd::fgsm(0.1)?);
    /// assert_eq!(robust.task().batch_size(), 4);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn task(&self) -> &Classification<'a, N> {
        &self.task
    }

    /// The attack.
    ///
    /// ```
    /// use modelfusion::nn::{data, Classification, Mlp, Pgd};
    /// let (d, net) = (data::digits()?.head(8), Mlp::new(&[64, 10])?);
    /// let robust = Classification::new(&net, &d, 4)?.robust(Pgd::fgsm(0.1)?);
    /// assert_eq!(robust.attack().eps(), 0.1);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn attack(&self) -> &Pgd {
        &self.attack
    }

    /// Robust loss and accuracy of `params` over the whole data set: every batch
    /// attacked, then evaluated in the task's mode.
    ///
    /// ```
    /// use modelfusion::nn::{data, Classification, Mlp, Network, Pgd};
    /// let (d, net) = (data::digits()?.head(20), Mlp::new(&[64, 10])?);
    /// let robust = Classification::new(&net, &d, 8)?.robust(Pgd::fgsm(0.0)?);
    /// let p = net.init::<ndarray::ArrayD<f64>>(1);
    /// // A ball of radius 0 is the clean task.
    /// assert_eq!(robust.evaluate(&p)?, robust.task().evaluate(&p)?);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn evaluate<T: Tensor>(&self, params: &StateDict<T>) -> Result<Evaluation> {
        let (net, data, size) = (self.task.net(), self.task.data(), self.task.batch_size());
        self.task.evaluate_by(params, |p, b| {
            let (x, y) = data.batch(b, size)?;
            let x = convert_batch::<T::Elem>(x);
            let adv = self.attack.perturb_stream(net, p, x.view(), y, b as u64)?;
            Ok(net.forward(p, adv.x.view(), self.task.mode())?.0)
        })
    }

    /// Robust accuracy.
    ///
    /// ```
    /// use modelfusion::nn::{data, Classification, Mlp, Network, Pgd};
    /// let (d, net) = (data::digits()?.head(20), Mlp::new(&[64, 10])?);
    /// let task = Classification::new(&net, &d, 8)?;
    /// let p = net.init::<ndarray::ArrayD<f32>>(1);
    /// assert!(task.robust(Pgd::fgsm(0.3)?).accuracy(&p)? <= task.accuracy(&p)? + 0.1);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn accuracy<T: Tensor>(&self, params: &StateDict<T>) -> Result<f64> {
        Ok(self.evaluate(params)?.accuracy)
    }

    /// `1 - robust accuracy` as an [`Objective`] (robust error barriers, robust soups).
    ///
    /// ```
    /// use modelfusion::nn::{data, Classification, Mlp, Network, Pgd};
    /// use modelfusion::Objective;
    /// let (d, net) = (data::digits()?.head(20), Mlp::new(&[64, 10])?);
    /// let robust = Classification::new(&net, &d, 8)?.robust(Pgd::fgsm(0.1)?);
    /// let p = net.init::<ndarray::ArrayD<f32>>(1);
    /// assert_eq!(robust.error_rate().loss(&p)?, 1.0 - robust.accuracy(&p)?);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn error_rate(&self) -> RobustErrorRate<'a, N> {
        RobustErrorRate(self.clone())
    }

    /// The mean loss and gradient of minibatch `step % num_batches` at its inputs
    /// attacked against `params` (stream `step`).
    ///
    /// ```
    /// use modelfusion::nn::{data, Classification, Mlp, Network, Pgd};
    /// let (d, net) = (data::digits()?.head(20), Mlp::new(&[64, 10])?);
    /// let task = Classification::new(&net, &d, 8)?;
    /// let p = net.init::<ndarray::ArrayD<f32>>(1);
    /// let (robust, _) = task.robust(Pgd::fgsm(0.2)?).minibatch_loss_and_gradient(&p, 0)?;
    /// assert!(robust >= task.minibatch_loss_and_gradient(&p, 0)?.0);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn minibatch_loss_and_gradient<T: Tensor>(
        &self,
        params: &StateDict<T>,
        step: usize,
    ) -> Result<(f64, StateDict<T>)> {
        let params = &*self.task.prepare(params)?;
        let b = step % self.task.num_batches().max(1);
        let (x, y) = self.task.data().batch(b, self.task.batch_size())?;
        let x = convert_batch::<T::Elem>(x);
        let net = self.task.net();
        let adv = self
            .attack
            .perturb_stream(net, params, x.view(), y, step as u64)?;
        let out = net.batch_loss_and_gradient(params, adv.x.view(), y, self.task.mode())?;
        Ok((self.task.finite(out.loss)?, out.gradient))
    }
}

impl<N: Network, T: Tensor> Objective<StateDict<T>> for Robust<'_, N> {
    fn loss(&self, model: &StateDict<T>) -> Result<f64> {
        Ok(self.evaluate(model)?.loss)
    }
}

impl<N: Network, T: Tensor> StochasticGradient<StateDict<T>> for Robust<'_, N> {
    fn loss_and_gradient_at(
        &mut self,
        model: &StateDict<T>,
        step: usize,
    ) -> Result<(f64, StateDict<T>)> {
        self.minibatch_loss_and_gradient(model, step)
    }
}

/// `1 - robust accuracy` of a [`Robust`] task, as an [`Objective`]. Build it with
/// [`Robust::error_rate`].
///
/// ```
/// use modelfusion::nn::{data, Classification, Mlp, Network, Pgd};
/// use modelfusion::Objective;
/// let (d, net) = (data::digits()?.head(20), Mlp::new(&[64, 10])?);
/// let err = Classification::new(&net, &d, 8)?.robust(Pgd::fgsm(0.1)?).error_rate();
/// assert!((0.0..=1.0).contains(&err.loss(&net.init::<ndarray::ArrayD<f32>>(0))?));
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct RobustErrorRate<'a, N>(Robust<'a, N>);

impl<N: Network, T: Tensor> Objective<StateDict<T>> for RobustErrorRate<'_, N> {
    fn loss(&self, model: &StateDict<T>) -> Result<f64> {
        Ok(1.0 - self.0.evaluate(model)?.accuracy)
    }
}
