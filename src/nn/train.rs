//! Minibatch training: SGD with momentum (optionally Nesterov) and Adam, both with
//! optional L2 weight decay, a constant or cosine learning-rate schedule, seeded
//! shuffling.

use ndarray::Array1;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result, check_nonnegative};
use crate::model::{Model, StateDict};
use crate::optim::{LrSchedule, ModelOptimizer, Optimizer};
use crate::tensor::{Scalar, Tensor};

use super::data::Dataset;
use super::layers::{convert_batch, gather_rows};
use super::{Mode, Network, Pgd};

/// A validated training configuration: optimiser, epochs, batch size, seed (for the
/// shuffling), weight decay (L2, added to the gradient of every parameter but buffers)
/// and learning-rate schedule.
///
/// ```
/// use modelfusion::nn::{LrSchedule, Optimizer, TrainConfig};
/// let c = TrainConfig::new(Optimizer::sgd(0.05, 0.9)?, 10, 64, 0)?
///     .with_weight_decay(5e-4)?
///     .with_schedule(LrSchedule::Cosine);
/// assert_eq!((c.epochs(), c.batch_size(), c.weight_decay()), (10, 64, 5e-4));
/// assert!(TrainConfig::new(Optimizer::adam(1e-3)?, 0, 64, 0).is_err());
/// assert!(TrainConfig::new(Optimizer::adam(1e-3)?, 1, 0, 0).is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    optimizer: Optimizer,
    epochs: usize,
    batch_size: usize,
    seed: u64,
    weight_decay: f64,
    schedule: LrSchedule,
    attack: Option<Pgd>,
}

impl TrainConfig {
    /// A configuration with no weight decay and a constant learning rate. Errors on an
    /// invalid optimiser, zero epochs or a zero batch size.
    ///
    /// ```
    /// use modelfusion::nn::{Optimizer, TrainConfig};
    /// let c = TrainConfig::new(Optimizer::adam(1e-3)?, 5, 32, 9)?;
    /// assert_eq!(c.seed(), 9);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn new(optimizer: Optimizer, epochs: usize, batch_size: usize, seed: u64) -> Result<Self> {
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
            attack: None,
        })
    }

    /// Sets the L2 weight decay; errors unless it is finite and `>= 0`.
    ///
    /// ```
    /// use modelfusion::nn::{Optimizer, TrainConfig};
    /// let c = TrainConfig::new(Optimizer::adam(1e-3)?, 5, 32, 9)?;
    /// assert!(c.with_weight_decay(-1.0).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_weight_decay(mut self, weight_decay: f64) -> Result<Self> {
        check_nonnegative("weight_decay", weight_decay)?;
        self.weight_decay = weight_decay;
        Ok(self)
    }

    /// Sets the learning-rate schedule.
    ///
    /// ```
    /// use modelfusion::nn::{LrSchedule, Optimizer, TrainConfig};
    /// let c = TrainConfig::new(Optimizer::adam(1e-3)?, 5, 32, 9)?.with_schedule(LrSchedule::Cosine);
    /// assert_eq!(c.schedule(), LrSchedule::Cosine);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_schedule(mut self, schedule: LrSchedule) -> Self {
        self.schedule = schedule;
        self
    }

    /// Adversarial training (Madry et al. 2018): every minibatch is replaced by its
    /// attack against the current parameters (training step `s` draws the random start
    /// from stream `s` of the attack's seed) before the gradient step.
    ///
    /// ```
    /// use modelfusion::nn::{data, train, Mlp, Network, Optimizer, Pgd, TrainConfig};
    /// let d = data::digits()?.head(200);
    /// let net = Mlp::new(&[64, 10])?;
    /// let pgd = Pgd::fgsm(0.1)?.with_range(0.0, 1.0)?;
    /// let c = TrainConfig::new(Optimizer::adam(1e-2)?, 2, 50, 0)?.with_attack(pgd.clone());
    /// assert_eq!(c.attack(), Some(&pgd));
    /// let t = train(&net, &net.init::<ndarray::ArrayD<f32>>(0), &d, &c)?;
    /// assert_eq!(t.loss_history.len(), 2);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_attack(mut self, attack: Pgd) -> Self {
        self.attack = Some(attack);
        self
    }

    /// The attack of adversarial training, if any.
    ///
    /// ```
    /// use modelfusion::nn::{Optimizer, TrainConfig};
    /// assert!(TrainConfig::new(Optimizer::adam(1e-3)?, 5, 32, 9)?.attack().is_none());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn attack(&self) -> Option<&Pgd> {
        self.attack.as_ref()
    }

    /// The optimiser.
    ///
    /// ```
    /// use modelfusion::nn::{Optimizer, TrainConfig};
    /// let o = Optimizer::adam(1e-3)?;
    /// assert_eq!(TrainConfig::new(o, 1, 1, 0)?.optimizer(), o);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn optimizer(&self) -> Optimizer {
        self.optimizer
    }

    /// Number of passes over the data.
    ///
    /// ```
    /// use modelfusion::nn::{Optimizer, TrainConfig};
    /// assert_eq!(TrainConfig::new(Optimizer::adam(1e-3)?, 3, 1, 0)?.epochs(), 3);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn epochs(&self) -> usize {
        self.epochs
    }

    /// Samples per minibatch.
    ///
    /// ```
    /// use modelfusion::nn::{Optimizer, TrainConfig};
    /// assert_eq!(TrainConfig::new(Optimizer::adam(1e-3)?, 3, 16, 0)?.batch_size(), 16);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// The seed of the shuffling.
    ///
    /// ```
    /// use modelfusion::nn::{Optimizer, TrainConfig};
    /// assert_eq!(TrainConfig::new(Optimizer::adam(1e-3)?, 3, 16, 4)?.seed(), 4);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The L2 weight decay.
    ///
    /// ```
    /// use modelfusion::nn::{Optimizer, TrainConfig};
    /// assert_eq!(TrainConfig::new(Optimizer::adam(1e-3)?, 3, 16, 4)?.weight_decay(), 0.0);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn weight_decay(&self) -> f64 {
        self.weight_decay
    }

    /// The learning-rate schedule.
    ///
    /// ```
    /// use modelfusion::nn::{LrSchedule, Optimizer, TrainConfig};
    /// assert_eq!(TrainConfig::new(Optimizer::adam(1e-3)?, 3, 16, 4)?.schedule(), LrSchedule::Constant);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn schedule(&self) -> LrSchedule {
        self.schedule
    }
}

/// The result of [`train`]: the trained parameters and per-epoch statistics.
///
/// ```
/// use modelfusion::nn::{data, train, Mlp, Network, Optimizer, TrainConfig};
/// let d = data::digits()?.head(200);
/// let net = Mlp::new(&[64, 10])?;
/// let t = train(&net, &net.init::<ndarray::ArrayD<f32>>(0), &d, &TrainConfig::new(Optimizer::adam(1e-2)?, 2, 50, 0)?)?;
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
/// use modelfusion::nn::{data, train, Network, Optimizer, ResMlp, TrainConfig};
/// let d = data::digits()?.head(300);
/// let net = ResMlp::new(64, 16, 32, 1, 10)?;
/// let config = TrainConfig::new(Optimizer::nesterov(0.05, 0.9)?, 3, 32, 1)?;
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
/// use modelfusion::nn::{data, train_with, Mlp, Network, Optimizer, TrainConfig};
/// use modelfusion::StateDictF32;
/// let d = data::digits()?.head(100);
/// let net = Mlp::new(&[64, 10])?;
/// let init: StateDictF32 = net.init(0);
/// let mut checkpoints = Vec::new();
/// let config = TrainConfig::new(Optimizer::adam(1e-2)?, 3, 25, 0)?;
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
    let buffers: Vec<String> = params
        .names()
        .filter(|n| net.is_buffer(n))
        .map(str::to_string)
        .collect();
    let mut optimizer = ModelOptimizer::new(config.optimizer)
        .with_weight_decay(config.weight_decay)?
        .with_frozen(buffers.iter().cloned());
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
            if !buffers.is_empty() && chunk.len() == 1 && data.len() > 1 {
                continue;
            }
            let mut x = gather_rows::<T::Elem>(data.x().view(), chunk);
            let y: Vec<usize> = chunk.iter().map(|&i| data.y()[i]).collect();
            if let Some(attack) = &config.attack {
                x = attack
                    .perturb_stream(net, &params, x.view(), &y, step_index as u64)?
                    .x;
            }
            let step = net.batch_loss_and_gradient(&params, x.view(), &y, Mode::Train)?;
            if !step.loss.is_finite() {
                return Err(Error::NonFinite {
                    what: format!(
                        "training loss at epoch {epoch}, batch {b} (learning rate {} too high?)",
                        config.optimizer.lr()
                    ),
                });
            }
            let lr_factor = config.schedule.factor(step_index, total_steps);
            optimizer.step(&mut params, &step.gradient, lr_factor)?;
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
