//! Minibatch training: SGD with momentum (optionally Nesterov) and Adam, both with
//! optional L2 weight decay, a constant or cosine learning-rate schedule, seeded
//! shuffling.

use ndarray::{Array1, ArrayD, Zip};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::model::{Model, StateDict};
use crate::tensor::{Scalar, Tensor};

use super::data::Dataset;
use super::layers::{convert_batch, gather_rows};
use super::{Mode, Network};

/// The optimiser and its hyperparameters. Build it with [`sgd`](OptimizerConfig::sgd),
/// [`nesterov`](OptimizerConfig::nesterov) or [`adam`](OptimizerConfig::adam), which
/// validate; [`TrainConfig::new`] validates again.
///
/// ```
/// use modelfusion::nn::OptimizerConfig;
/// assert!(OptimizerConfig::sgd(0.1, 0.9).is_ok());
/// assert!(OptimizerConfig::sgd(0.0, 0.9).is_err());
/// assert!(OptimizerConfig::adam(1e-3).is_ok());
/// assert!(OptimizerConfig::adam_with(1e-3, 1.0, 0.999, 1e-8).is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptimizerConfig {
    /// Stochastic gradient descent with heavy-ball momentum (PyTorch's form:
    /// `buf = momentum * buf + g; p -= lr * buf`, or with Nesterov
    /// `p -= lr * (g + momentum * buf)`).
    Sgd {
        /// Learning rate, `> 0`.
        lr: f64,
        /// Momentum in `[0, 1)`.
        momentum: f64,
        /// Nesterov momentum (needs `momentum > 0`).
        nesterov: bool,
    },
    /// Adam (Kingma & Ba) with bias correction.
    Adam {
        /// Learning rate, `> 0`.
        lr: f64,
        /// First-moment decay in `[0, 1)`.
        beta1: f64,
        /// Second-moment decay in `[0, 1)`.
        beta2: f64,
        /// Added to the denominator, `> 0`.
        eps: f64,
    },
}

impl OptimizerConfig {
    /// SGD with heavy-ball momentum (`momentum = 0` is plain SGD).
    ///
    /// ```
    /// assert!(modelfusion::nn::OptimizerConfig::sgd(0.1, 1.0).is_err());
    /// ```
    pub fn sgd(lr: f64, momentum: f64) -> Result<Self> {
        let c = OptimizerConfig::Sgd {
            lr,
            momentum,
            nesterov: false,
        };
        c.validate()?;
        Ok(c)
    }

    /// SGD with Nesterov momentum (`momentum > 0`).
    ///
    /// ```
    /// use modelfusion::nn::OptimizerConfig;
    /// assert!(OptimizerConfig::nesterov(0.1, 0.9).is_ok());
    /// assert!(OptimizerConfig::nesterov(0.1, 0.0).is_err());
    /// ```
    pub fn nesterov(lr: f64, momentum: f64) -> Result<Self> {
        let c = OptimizerConfig::Sgd {
            lr,
            momentum,
            nesterov: true,
        };
        c.validate()?;
        Ok(c)
    }

    /// Adam with the usual defaults `beta1 = 0.9`, `beta2 = 0.999`, `eps = 1e-8`.
    ///
    /// ```
    /// assert!(modelfusion::nn::OptimizerConfig::adam(f64::NAN).is_err());
    /// ```
    pub fn adam(lr: f64) -> Result<Self> {
        Self::adam_with(lr, 0.9, 0.999, 1e-8)
    }

    /// Adam with every hyperparameter given.
    ///
    /// ```
    /// assert!(modelfusion::nn::OptimizerConfig::adam_with(1e-3, 0.9, 0.99, 0.0).is_err());
    /// ```
    pub fn adam_with(lr: f64, beta1: f64, beta2: f64, eps: f64) -> Result<Self> {
        let c = OptimizerConfig::Adam {
            lr,
            beta1,
            beta2,
            eps,
        };
        c.validate()?;
        Ok(c)
    }

    /// The (initial) learning rate.
    ///
    /// ```
    /// assert_eq!(modelfusion::nn::OptimizerConfig::adam(0.01)?.lr(), 0.01);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn lr(&self) -> f64 {
        match *self {
            OptimizerConfig::Sgd { lr, .. } | OptimizerConfig::Adam { lr, .. } => lr,
        }
    }

    /// Errors naming the first hyperparameter out of range.
    ///
    /// ```
    /// use modelfusion::nn::OptimizerConfig;
    /// let bad = OptimizerConfig::Sgd { lr: -1.0, momentum: 0.0, nesterov: false };
    /// assert!(bad.validate().unwrap_err().to_string().contains("lr"));
    /// ```
    pub fn validate(&self) -> Result<()> {
        let lr = self.lr();
        if !(lr.is_finite() && lr > 0.0) {
            return Err(Error::invalid(
                "lr",
                format!("must be finite and > 0, got {lr}"),
            ));
        }
        let unit = |name: &str, v: f64| {
            if (0.0..1.0).contains(&v) {
                Ok(())
            } else {
                Err(Error::invalid(name, format!("must be in [0, 1), got {v}")))
            }
        };
        match *self {
            OptimizerConfig::Sgd {
                momentum, nesterov, ..
            } => {
                unit("momentum", momentum)?;
                if nesterov && momentum == 0.0 {
                    return Err(Error::invalid(
                        "momentum",
                        "Nesterov momentum needs momentum > 0",
                    ));
                }
            }
            OptimizerConfig::Adam {
                beta1, beta2, eps, ..
            } => {
                unit("beta1", beta1)?;
                unit("beta2", beta2)?;
                if !(eps.is_finite() && eps > 0.0) {
                    return Err(Error::invalid(
                        "eps",
                        format!("must be finite and > 0, got {eps}"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// How the learning rate changes over training.
///
/// ```
/// use modelfusion::nn::LrSchedule;
/// assert_eq!(LrSchedule::default(), LrSchedule::Constant);
/// assert_eq!(LrSchedule::Cosine.factor(0, 10), 1.0);
/// assert!(LrSchedule::Cosine.factor(9, 10) < 0.05);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LrSchedule {
    /// The learning rate stays fixed.
    #[default]
    Constant,
    /// Cosine annealing from the learning rate to 0 over all steps:
    /// `lr * (1 + cos(pi * step / total)) / 2`.
    Cosine,
}

impl LrSchedule {
    /// The multiplier of the learning rate at `step` (0-based) of `total`.
    ///
    /// ```
    /// assert_eq!(modelfusion::nn::LrSchedule::Constant.factor(5, 10), 1.0);
    /// ```
    pub fn factor(&self, step: usize, total: usize) -> f64 {
        match self {
            LrSchedule::Constant => 1.0,
            LrSchedule::Cosine => {
                let t = step as f64 / total.max(1) as f64;
                0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

/// A validated training configuration: optimiser, epochs, batch size, seed (for the
/// shuffling), weight decay (L2, added to the gradient of every parameter but buffers)
/// and learning-rate schedule.
///
/// ```
/// use modelfusion::nn::{LrSchedule, OptimizerConfig, TrainConfig};
/// let c = TrainConfig::new(OptimizerConfig::sgd(0.05, 0.9)?, 10, 64, 0)?
///     .with_weight_decay(5e-4)?
///     .with_schedule(LrSchedule::Cosine);
/// assert_eq!((c.epochs(), c.batch_size(), c.weight_decay()), (10, 64, 5e-4));
/// assert!(TrainConfig::new(OptimizerConfig::adam(1e-3)?, 0, 64, 0).is_err());
/// assert!(TrainConfig::new(OptimizerConfig::adam(1e-3)?, 1, 0, 0).is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    optimizer: OptimizerConfig,
    epochs: usize,
    batch_size: usize,
    seed: u64,
    weight_decay: f64,
    schedule: LrSchedule,
}

impl TrainConfig {
    /// A configuration with no weight decay and a constant learning rate. Errors on an
    /// invalid optimiser, zero epochs or a zero batch size.
    ///
    /// ```
    /// use modelfusion::nn::{OptimizerConfig, TrainConfig};
    /// let c = TrainConfig::new(OptimizerConfig::adam(1e-3)?, 5, 32, 9)?;
    /// assert_eq!(c.seed(), 9);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn new(
        optimizer: OptimizerConfig,
        epochs: usize,
        batch_size: usize,
        seed: u64,
    ) -> Result<Self> {
        optimizer.validate()?;
        if epochs == 0 {
            return Err(Error::invalid("epochs", "must be positive, got 0"));
        }
        super::data::check_batch_size(batch_size)?;
        Ok(TrainConfig {
            optimizer,
            epochs,
            batch_size,
            seed,
            weight_decay: 0.0,
            schedule: LrSchedule::Constant,
        })
    }

    /// Sets the L2 weight decay; errors unless it is finite and `>= 0`.
    ///
    /// ```
    /// use modelfusion::nn::{OptimizerConfig, TrainConfig};
    /// let c = TrainConfig::new(OptimizerConfig::adam(1e-3)?, 5, 32, 9)?;
    /// assert!(c.with_weight_decay(-1.0).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_weight_decay(mut self, weight_decay: f64) -> Result<Self> {
        if !(weight_decay.is_finite() && weight_decay >= 0.0) {
            return Err(Error::invalid(
                "weight_decay",
                format!("must be finite and >= 0, got {weight_decay}"),
            ));
        }
        self.weight_decay = weight_decay;
        Ok(self)
    }

    /// Sets the learning-rate schedule.
    ///
    /// ```
    /// use modelfusion::nn::{LrSchedule, OptimizerConfig, TrainConfig};
    /// let c = TrainConfig::new(OptimizerConfig::adam(1e-3)?, 5, 32, 9)?.with_schedule(LrSchedule::Cosine);
    /// assert_eq!(c.schedule(), LrSchedule::Cosine);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_schedule(mut self, schedule: LrSchedule) -> Self {
        self.schedule = schedule;
        self
    }

    /// The optimiser.
    ///
    /// ```
    /// use modelfusion::nn::{OptimizerConfig, TrainConfig};
    /// let o = OptimizerConfig::adam(1e-3)?;
    /// assert_eq!(TrainConfig::new(o, 1, 1, 0)?.optimizer(), o);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn optimizer(&self) -> OptimizerConfig {
        self.optimizer
    }

    /// Number of passes over the data.
    ///
    /// ```
    /// use modelfusion::nn::{OptimizerConfig, TrainConfig};
    /// assert_eq!(TrainConfig::new(OptimizerConfig::adam(1e-3)?, 3, 1, 0)?.epochs(), 3);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn epochs(&self) -> usize {
        self.epochs
    }

    /// Samples per minibatch.
    ///
    /// ```
    /// use modelfusion::nn::{OptimizerConfig, TrainConfig};
    /// assert_eq!(TrainConfig::new(OptimizerConfig::adam(1e-3)?, 3, 16, 0)?.batch_size(), 16);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// The seed of the shuffling.
    ///
    /// ```
    /// use modelfusion::nn::{OptimizerConfig, TrainConfig};
    /// assert_eq!(TrainConfig::new(OptimizerConfig::adam(1e-3)?, 3, 16, 4)?.seed(), 4);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The L2 weight decay.
    ///
    /// ```
    /// use modelfusion::nn::{OptimizerConfig, TrainConfig};
    /// assert_eq!(TrainConfig::new(OptimizerConfig::adam(1e-3)?, 3, 16, 4)?.weight_decay(), 0.0);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn weight_decay(&self) -> f64 {
        self.weight_decay
    }

    /// The learning-rate schedule.
    ///
    /// ```
    /// use modelfusion::nn::{LrSchedule, OptimizerConfig, TrainConfig};
    /// assert_eq!(TrainConfig::new(OptimizerConfig::adam(1e-3)?, 3, 16, 4)?.schedule(), LrSchedule::Constant);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn schedule(&self) -> LrSchedule {
        self.schedule
    }
}

/// The result of [`train`]: the trained parameters and per-epoch statistics.
///
/// ```
/// use modelfusion::nn::{data, train, Mlp, Network, OptimizerConfig, TrainConfig};
/// let d = data::digits()?.head(200);
/// let net = Mlp::new(&[64, 10])?;
/// let t = train(&net, &net.init::<ndarray::ArrayD<f32>>(0), &d, &TrainConfig::new(OptimizerConfig::adam(1e-2)?, 2, 50, 0)?)?;
/// assert_eq!((t.loss_history.len(), t.accuracy_history.len()), (2, 2));
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Trained<T: Tensor> {
    /// The parameters after the last step (running statistics included).
    pub params: StateDict<T>,
    /// Mean training loss of every epoch (over its minibatches, as they were trained).
    pub loss_history: Vec<f64>,
    /// Training accuracy of every epoch (over its minibatches, as they were trained).
    pub accuracy_history: Vec<f64>,
}

/// Trains `net` from `init` on `data` with minibatches in a seeded random order.
///
/// Normalisation layers use batch statistics and their running statistics are updated
/// after every step; buffers get neither gradient steps nor weight decay. With a
/// network that has buffers, a final minibatch of a single sample is skipped (batch
/// statistics need two). Errors when `init` does not fit the network, the data's
/// feature count or class count does not fit it, or the loss becomes non-finite.
///
/// ```
/// use modelfusion::nn::{data, train, Network, OptimizerConfig, ResMlp, TrainConfig};
/// let d = data::digits()?.head(300);
/// let net = ResMlp::new(64, 16, 32, 1, 10)?;
/// let config = TrainConfig::new(OptimizerConfig::nesterov(0.05, 0.9)?, 3, 32, 1)?;
/// let t = train(&net, &net.init::<ndarray::ArrayD<f32>>(0), &d, &config)?;
/// assert!(t.loss_history[2] < t.loss_history[0]);
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn train<N: Network, T: Tensor>(
    net: &N,
    init: &StateDict<T>,
    data: &Dataset,
    config: &TrainConfig,
) -> Result<Trained<T>> {
    train_with(net, init, data, config, |_, _, _| Ok(()))
}

/// As [`train`], calling `on_epoch(epoch, params, mean_loss)` after every epoch (e.g. to
/// keep checkpoints for SWA or LAWA, or to evaluate on held-out data); an error from
/// the callback stops training and is returned.
///
/// ```
/// use modelfusion::nn::{data, train_with, Mlp, Network, OptimizerConfig, TrainConfig};
/// use modelfusion::StateDictF32;
/// let d = data::digits()?.head(100);
/// let net = Mlp::new(&[64, 10])?;
/// let init: StateDictF32 = net.init(0);
/// let mut checkpoints = Vec::new();
/// let config = TrainConfig::new(OptimizerConfig::adam(1e-2)?, 3, 25, 0)?;
/// let t = train_with(&net, &init, &d, &config, |epoch, params, _loss| {
///     checkpoints.push((epoch, params.clone()));
///     Ok(())
/// })?;
/// assert_eq!(checkpoints.len(), 3);
/// assert_eq!(checkpoints[2].1, t.params);
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn train_with<N: Network, T: Tensor>(
    net: &N,
    init: &StateDict<T>,
    data: &Dataset,
    config: &TrainConfig,
    mut on_epoch: impl FnMut(usize, &StateDict<T>, f64) -> Result<()>,
) -> Result<Trained<T>> {
    config.optimizer.validate()?;
    net.check_params(init)?;
    check_data(net, data)?;
    let mut params = init.clone();
    let mut optimizer = OptimizerState::new(net, &params, config);
    let has_buffers = params.names().any(|n| net.is_buffer(n));
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut order: Vec<usize> = (0..data.len()).collect();
    let total_steps = config.epochs * data.num_batches(config.batch_size);
    let mut step_index = 0;
    let mut loss_history = Vec::with_capacity(config.epochs);
    let mut accuracy_history = Vec::with_capacity(config.epochs);
    for epoch in 0..config.epochs {
        order.shuffle(&mut rng);
        let (mut loss_sum, mut correct, mut seen) = (0.0, 0usize, 0usize);
        for (b, chunk) in order.chunks(config.batch_size).enumerate() {
            if has_buffers && chunk.len() == 1 && data.len() > 1 {
                continue;
            }
            let x = gather_rows::<T::Elem>(data.x().view(), chunk);
            let y: Vec<usize> = chunk.iter().map(|&i| data.y()[i]).collect();
            let step = net.batch_loss_and_gradient(&params, x.view(), &y, Mode::Train)?;
            if !step.loss.is_finite() {
                return Err(Error::NonFinite {
                    what: format!(
                        "training loss at epoch {epoch}, batch {b} (learning rate {} too high?)",
                        config.optimizer.lr()
                    ),
                });
            }
            let lr = config.optimizer.lr() * config.schedule.factor(step_index, total_steps);
            optimizer.step(&mut params, &step.gradient, lr)?;
            for (name, value) in net.running_stats_update(&params, &step.cache)? {
                params.replace(&name, value)?;
            }
            loss_sum += step.loss * chunk.len() as f64;
            correct += step.correct;
            seen += chunk.len();
            step_index += 1;
        }
        let seen_f = seen.max(1) as f64;
        loss_history.push(loss_sum / seen_f);
        accuracy_history.push(correct as f64 / seen_f);
        on_epoch(epoch, &params, loss_sum / seen_f)?;
    }
    Ok(Trained {
        params,
        loss_history,
        accuracy_history,
    })
}

/// Recomputes every buffer (running statistic) of `params` from `data`: each batch runs
/// forward with batch statistics, and each buffer becomes the sample-weighted mean of its
/// batch statistics over the data set (PyTorch's cumulative average, `momentum=None`,
/// weighted by batch size). This is the usual repair of batch-norm statistics after
/// interpolating or merging networks. Every other parameter is returned unchanged, and a
/// network without buffers gets `params` back as they are. A final batch of a single
/// sample is skipped.
///
/// ```
/// use modelfusion::nn::{data, reset_running_stats, Classification, Network, ResMlp};
/// use modelfusion::{Model, StateDictF32};
/// let d = data::digits()?.head(200);
/// let net = ResMlp::new(64, 16, 32, 2, 10)?;
/// let p: StateDictF32 = net.init(0);
/// let fresh = reset_running_stats(&net, &p, &d, 50)?;
/// assert_ne!(fresh.get("blocks.1.norm.running_var"), p.get("blocks.1.norm.running_var"));
/// assert_eq!(fresh.get("blocks.1.fc1.weight"), p.get("blocks.1.fc1.weight"));
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn reset_running_stats<N: Network, T: Tensor>(
    net: &N,
    params: &StateDict<T>,
    data: &Dataset,
    batch_size: usize,
) -> Result<StateDict<T>> {
    super::data::check_batch_size(batch_size)?;
    net.check_params(params)?;
    check_data(net, data)?;
    if !params.names().any(|n| net.is_buffer(n)) {
        return Ok(params.clone());
    }
    let mut sums: Vec<(String, Array1<f64>)> = Vec::new();
    let mut total = 0usize;
    for (x, _) in data.batches(batch_size)? {
        let n = x.nrows();
        if n < 2 && data.len() >= 2 {
            continue;
        }
        let x = convert_batch::<T::Elem>(x);
        let (_, cache) = net.forward(params, x.view(), Mode::Train)?;
        let stats = net.batch_statistics(&cache);
        if sums.is_empty() {
            sums = stats
                .iter()
                .map(|(name, s)| (name.clone(), Array1::zeros(s.len())))
                .collect();
        }
        for ((_, acc), (_, s)) in sums.iter_mut().zip(&stats) {
            acc.zip_mut_with(s, |a, &b| *a += b.to_f64_lossless() * n as f64);
        }
        total += n;
    }
    if total == 0 {
        return Err(Error::invalid(
            "data",
            "recomputing batch statistics needs batches of at least 2 samples",
        ));
    }
    let mut out = params.clone();
    for (name, acc) in sums {
        let value = acc.mapv(|v| T::Elem::from_f64_lossy(v / total as f64));
        out.replace(&name, T::from_array(value.into_dyn()))?;
    }
    Ok(out)
}

/// Errors unless `data` fits `net`: non-empty, the right feature count, no more classes
/// than the network has outputs.
pub(crate) fn check_data<N: Network>(net: &N, data: &Dataset) -> Result<()> {
    if data.is_empty() {
        return Err(Error::empty("the data set"));
    }
    if data.num_features() != net.input_dim() {
        return Err(Error::shape(
            format!("data set features vs the input of the {}", net.describe()),
            &[data.len(), net.input_dim()],
            &[data.len(), data.num_features()],
        ));
    }
    if data.num_classes() > net.num_classes() {
        return Err(Error::invalid(
            "data",
            format!(
                "the data set has {} classes, the {} only {} outputs",
                data.num_classes(),
                net.describe(),
                net.num_classes()
            ),
        ));
    }
    Ok(())
}

/// Per-parameter optimiser state; `None` for buffers.
struct OptimizerState<S: Scalar> {
    config: OptimizerConfig,
    weight_decay: S,
    slots: Vec<(String, Option<Slot<S>>)>,
    steps: i32,
}

struct Slot<S> {
    first: ArrayD<S>,
    second: ArrayD<S>,
}

impl<S: Scalar> OptimizerState<S> {
    fn new<N: Network, T: Tensor<Elem = S>>(
        net: &N,
        params: &StateDict<T>,
        config: &TrainConfig,
    ) -> Self {
        let slots = params
            .iter()
            .map(|(name, t)| {
                let slot = (!net.is_buffer(name)).then(|| Slot {
                    first: ArrayD::zeros(t.shape()),
                    second: match config.optimizer {
                        OptimizerConfig::Adam { .. } => ArrayD::zeros(t.shape()),
                        OptimizerConfig::Sgd { .. } => ArrayD::zeros(vec![0]),
                    },
                });
                (name.to_string(), slot)
            })
            .collect();
        OptimizerState {
            config: config.optimizer,
            weight_decay: S::from_f64_lossy(config.weight_decay),
            slots,
            steps: 0,
        }
    }

    fn step<T: Tensor<Elem = S>>(
        &mut self,
        params: &mut StateDict<T>,
        grads: &StateDict<T>,
        lr: f64,
    ) -> Result<()> {
        self.steps = self.steps.saturating_add(1);
        let first_step = self.steps == 1;
        let wd = self.weight_decay;
        let lr_s = S::from_f64_lossy(lr);
        for (name, slot) in &mut self.slots {
            let Some(slot) = slot else { continue };
            let g = grads.require(name, "the gradient")?;
            let p = params.get_mut(name).ok_or_else(|| Error::MissingParam {
                name: name.clone(),
                context: "the parameters being trained".into(),
            })?;
            p.check_same_shape(g, &format!("parameter `{name}` vs its gradient"))?;
            let g = g.view();
            let mut p = p.view_mut();
            match self.config {
                OptimizerConfig::Sgd {
                    momentum, nesterov, ..
                } => {
                    let mom = S::from_f64_lossy(momentum);
                    Zip::from(&mut p)
                        .and(&g)
                        .and(&mut slot.first)
                        .for_each(|p, &g, buf| {
                            let g = g + wd * *p;
                            *buf = if first_step { g } else { mom * *buf + g };
                            let d = if nesterov { g + mom * *buf } else { *buf };
                            *p -= lr_s * d;
                        });
                }
                OptimizerConfig::Adam {
                    beta1, beta2, eps, ..
                } => {
                    let (b1, b2) = (S::from_f64_lossy(beta1), S::from_f64_lossy(beta2));
                    let bc1 = S::from_f64_lossy(1.0 - beta1.powi(self.steps));
                    let bc2 = S::from_f64_lossy(1.0 - beta2.powi(self.steps));
                    let eps = S::from_f64_lossy(eps);
                    Zip::from(&mut p)
                        .and(&g)
                        .and(&mut slot.first)
                        .and(&mut slot.second)
                        .for_each(|p, &g, m, v| {
                            let g = g + wd * *p;
                            *m = b1 * *m + (S::one() - b1) * g;
                            *v = b2 * *v + (S::one() - b2) * g * g;
                            *p -= lr_s * (*m / bc1) / ((*v / bc2).sqrt() + eps);
                        });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One parameter `w`, loss 0.5 * w^2 (gradient w): checks the update rules by hand.
    fn quadratic_steps(config: OptimizerConfig, wd: f64, steps: usize) -> f64 {
        use super::super::Mlp;
        let net = Mlp::new(&[1, 1]).unwrap();
        let tc = TrainConfig::new(config, 1, 1, 0)
            .unwrap()
            .with_weight_decay(wd)
            .unwrap();
        let mut params: StateDict<ArrayD<f64>> = StateDict::from_pairs([
            ("layers.0.weight", ArrayD::from_elem(vec![1, 1], 1.0)),
            ("layers.0.bias", ArrayD::from_elem(vec![1], 0.0)),
        ])
        .unwrap();
        let mut opt = OptimizerState::new(&net, &params, &tc);
        for _ in 0..steps {
            let grads = params.clone();
            opt.step(&mut params, &grads, config.lr()).unwrap();
        }
        params.get("layers.0.weight").unwrap()[[0, 0]]
    }

    #[test]
    fn update_rules_match_hand_computation() {
        // SGD momentum 0.5, lr 0.1: w1 = 1 - 0.1*1 = 0.9; buf = 0.5*1 + 0.9 = 1.4; w2 = 0.9 - 0.14.
        let w = quadratic_steps(OptimizerConfig::sgd(0.1, 0.5).unwrap(), 0.0, 2);
        assert!((w - 0.76).abs() < 1e-12, "{w}");
        // Nesterov: step1 buf = 1, d = 1 + 0.5 = 1.5, w = 0.85.
        let w = quadratic_steps(OptimizerConfig::nesterov(0.1, 0.5).unwrap(), 0.0, 1);
        assert!((w - 0.85).abs() < 1e-12, "{w}");
        // Weight decay 1 doubles the gradient: w = 1 - 0.1 * 2.
        let w = quadratic_steps(OptimizerConfig::sgd(0.1, 0.0).unwrap(), 1.0, 1);
        assert!((w - 0.8).abs() < 1e-12, "{w}");
        // Adam's first step moves by lr (up to eps).
        let w = quadratic_steps(OptimizerConfig::adam(0.01).unwrap(), 0.0, 1);
        assert!((w - 0.99).abs() < 1e-9, "{w}");
    }
}
