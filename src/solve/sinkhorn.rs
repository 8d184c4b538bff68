//! Entropic optimal transport: Sinkhorn (balanced and unbalanced) and the Sinkhorn
//! operator on a score matrix.

use ndarray::{Array1, Array2, ArrayView1, ArrayView2};
use rayon::prelude::*;

use super::fastexp::exp;
use super::simd::{self, Isa};
use crate::error::check_positive;
use crate::{Error, Result, Scalar};

/// Lanes of the vectorised reductions.
const LANES: usize = 8;
/// Below this many matrix entries a pass runs on the calling thread (same blocks, so the
/// same result).
const PAR_MIN_ENTRIES: usize = 1 << 16;
/// Scalings outside `[1/ABSORB, ABSORB]` are absorbed into the potentials.
const ABSORB: f64 = 1e30;
/// Relative tolerance on `sum(a) == sum(b)` in the balanced problem.
const MASS_RTOL: f64 = 1e-6;
/// Relative tolerance on the total mass of a returned balanced plan (or the column
/// sums of the Sinkhorn operator): a plan further off than this is garbage, not an
/// unconverged iterate, and is refused.
const RESULT_MASS_RTOL: f64 = 1e-3;

/// The documented floor of the entropic regulariser (`reg` of [`Sinkhorn`], `tau` of
/// [`sinkhorn_operator`]) relative to the cost scale `max |M_ij|`: a smaller value is
/// refused with [`Error::InvalidParameter`], since `M / reg` then exceeds what `f64`
/// resolves (the entropic term vanishes below the cost's rounding) and the iteration can
/// only overflow. The value must also be at least `f64::MIN_POSITIVE`, whatever the costs.
///
/// ```
/// use modelfusion::solve::{sinkhorn, REG_REL_FLOOR};
/// use ndarray::array;
/// let m = array![[0.0, 1e6], [1e6, 0.0]];
/// let (a, b) = (array![0.5, 0.5], array![0.5, 0.5]);
/// let err = sinkhorn(a.view(), b.view(), m.view(), REG_REL_FLOOR * 1e5).unwrap_err();
/// assert!(err.to_string().contains("`reg`"), "{err}");
/// assert!(sinkhorn(a.view(), b.view(), m.view(), REG_REL_FLOOR * 1e7).is_ok());
/// ```
pub const REG_REL_FLOOR: f64 = 1e-12;

/// Parameters of [`Sinkhorn`], validated by [`SinkhornBuilder::build`].
///
/// ```
/// use modelfusion::solve::Sinkhorn;
/// let s = Sinkhorn::builder().with_reg(0.05).with_tol(1e-8).with_max_iter(500).build()?;
/// assert_eq!(s.reg(), 0.05);
/// assert!(Sinkhorn::builder().with_reg(-1.0).build().is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct SinkhornBuilder {
    reg: f64,
    tol: f64,
    max_iter: usize,
    reg_m: Option<f64>,
    epsilon_scaling: bool,
}

impl Default for SinkhornBuilder {
    fn default() -> Self {
        SinkhornBuilder {
            reg: 0.01,
            tol: 1e-9,
            max_iter: 10_000,
            reg_m: None,
            epsilon_scaling: false,
        }
    }
}

impl SinkhornBuilder {
    /// Entropic regulariser `reg > 0` (default `0.01`), in the units of the cost.
    ///
    /// ```
    /// let s = modelfusion::solve::Sinkhorn::builder().with_reg(0.1).build()?;
    /// assert_eq!(s.reg(), 0.1);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_reg(mut self, reg: f64) -> Self {
        self.reg = reg;
        self
    }

    /// Stopping tolerance `tol > 0` (default `1e-9`): balanced, the L1 norm of the
    /// marginal violation `sum_i |P 1 - a|_i` (the column marginals are met exactly
    /// after each iteration); unbalanced, the largest change of a dual potential in one
    /// iteration.
    ///
    /// ```
    /// let s = modelfusion::solve::Sinkhorn::builder().with_tol(1e-6).build()?;
    /// assert_eq!(s.tol(), 1e-6);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_tol(mut self, tol: f64) -> Self {
        self.tol = tol;
        self
    }

    /// Iteration cap `max_iter > 0` (default `10_000`), counted over all epsilon-scaling
    /// stages. Reaching it is not an error: the result says `converged == false`.
    ///
    /// ```
    /// let s = modelfusion::solve::Sinkhorn::builder().with_max_iter(50).build()?;
    /// assert_eq!(s.max_iter(), 50);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_max_iter(mut self, max_iter: usize) -> Self {
        self.max_iter = max_iter;
        self
    }

    /// Makes the problem unbalanced: the marginal constraints are replaced by
    /// `reg_m * KL(P 1 | a) + reg_m * KL(P^T 1 | b)` penalties (`reg_m > 0`).
    ///
    /// ```
    /// let s = modelfusion::solve::Sinkhorn::builder().with_reg_m(1.0).build()?;
    /// assert_eq!(s.reg_m(), Some(1.0));
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_reg_m(mut self, reg_m: f64) -> Self {
        self.reg_m = Some(reg_m);
        self
    }

    /// Epsilon scaling (default off, balanced problems only): solve with a large
    /// regulariser first and shrink it geometrically to `reg`, warm-starting each stage
    /// from the previous potentials.
    ///
    /// ```
    /// let s = modelfusion::solve::Sinkhorn::builder().with_epsilon_scaling(true).build()?;
    /// assert!(s.epsilon_scaling());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_epsilon_scaling(mut self, on: bool) -> Self {
        self.epsilon_scaling = on;
        self
    }

    /// Checks the parameters and returns the solver.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming `reg`, `tol`, `max_iter` or `reg_m` when
    /// `reg`/`tol`/`reg_m` are not finite and positive or `max_iter` is zero.
    ///
    /// ```
    /// use modelfusion::solve::Sinkhorn;
    /// assert!(Sinkhorn::builder().with_tol(0.0).build().is_err());
    /// assert!(Sinkhorn::builder().with_max_iter(0).build().is_err());
    /// assert!(Sinkhorn::builder().with_reg_m(f64::NAN).build().is_err());
    /// ```
    pub fn build(self) -> Result<Sinkhorn> {
        check_positive("reg", self.reg)?;
        check_positive("tol", self.tol)?;
        if let Some(r) = self.reg_m {
            check_positive("reg_m", r)?;
        }
        if self.max_iter == 0 {
            return Err(Error::invalid("max_iter", "must be at least 1, got 0"));
        }
        Ok(Sinkhorn { p: self })
    }
}

/// Entropic optimal transport solver (log-domain stabilised Sinkhorn).
///
/// Minimises `<P, M> + reg * sum P_ij (ln P_ij - 1)` subject to `P 1 = a`, `P^T 1 = b`
/// (balanced) or with KL penalties on the marginals (unbalanced, see
/// [`SinkhornBuilder::with_reg_m`]). The plan is `P_ij = exp((f_i + g_j - M_ij) / reg)` with
/// dual potentials `f`, `g`. See the [module docs](crate::solve) for the algorithm.
///
/// ```
/// use modelfusion::solve::Sinkhorn;
/// use ndarray::array;
///
/// let a = array![0.5, 0.5];
/// let b = array![0.5, 0.5];
/// let m = array![[0.0f64, 1.0], [1.0, 0.0]];
/// let ot = Sinkhorn::builder().with_reg(0.01).build()?.solve(a.view(), b.view(), m.view())?;
/// assert!(ot.converged);
/// assert!((ot.plan[[0, 0]] - 0.5).abs() < 1e-9);
/// assert!(ot.cost < 1e-9);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Sinkhorn {
    p: SinkhornBuilder,
}

/// The result of [`Sinkhorn::solve`]: plan, dual potentials and convergence report.
///
/// ```
/// use modelfusion::solve::sinkhorn;
/// use ndarray::array;
/// let ot = sinkhorn(array![1.0].view(), array![1.0].view(), array![[3.0]].view(), 0.1)?;
/// assert_eq!(ot.plan[[0, 0]], 1.0);
/// assert_eq!(ot.cost, 3.0);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct TransportPlan<F> {
    /// The transport plan `P` (`n x m`).
    pub plan: Array2<F>,
    /// Row potential `f` (`P_ij = exp((f_i + g_j - M_ij) / reg)`); `-inf` where `a_i = 0`.
    pub f: Array1<F>,
    /// Column potential `g`; `-inf` where `b_j = 0`.
    pub g: Array1<F>,
    /// Transport cost `<P, M>`.
    pub cost: f64,
    /// Sinkhorn iterations run (over all epsilon-scaling stages).
    pub iterations: usize,
    /// Final value of the stopping criterion (see [`SinkhornBuilder::with_tol`]).
    pub error: f64,
    /// Whether `error <= tol` was reached within `max_iter` iterations.
    pub converged: bool,
}

impl Sinkhorn {
    /// A builder with the defaults (`reg = 0.01`, `tol = 1e-9`, `max_iter = 10_000`,
    /// balanced, epsilon scaling off).
    ///
    /// ```
    /// let s = modelfusion::solve::Sinkhorn::builder().build()?;
    /// assert_eq!((s.reg(), s.tol(), s.max_iter()), (0.01, 1e-9, 10_000));
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn builder() -> SinkhornBuilder {
        SinkhornBuilder::default()
    }

    /// The regulariser.
    ///
    /// ```
    /// assert_eq!(modelfusion::solve::Sinkhorn::builder().with_reg(0.2).build()?.reg(), 0.2);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn reg(&self) -> f64 {
        self.p.reg
    }

    /// The stopping tolerance.
    ///
    /// ```
    /// assert_eq!(modelfusion::solve::Sinkhorn::builder().with_tol(1e-5).build()?.tol(), 1e-5);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn tol(&self) -> f64 {
        self.p.tol
    }

    /// The iteration cap.
    ///
    /// ```
    /// assert_eq!(modelfusion::solve::Sinkhorn::builder().with_max_iter(7).build()?.max_iter(), 7);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn max_iter(&self) -> usize {
        self.p.max_iter
    }

    /// The marginal relaxation of the unbalanced problem (`None`: balanced).
    ///
    /// ```
    /// assert_eq!(modelfusion::solve::Sinkhorn::builder().build()?.reg_m(), None);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn reg_m(&self) -> Option<f64> {
        self.p.reg_m
    }

    /// Whether epsilon scaling is on.
    ///
    /// ```
    /// assert!(!modelfusion::solve::Sinkhorn::builder().build()?.epsilon_scaling());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn epsilon_scaling(&self) -> bool {
        self.p.epsilon_scaling
    }

    /// Solves the transport problem between histograms `a` (length `n`) and `b`
    /// (length `m`) with cost `cost` (`n x m`), starting from zero potentials.
    ///
    /// # Errors
    /// [`Error::Empty`] for empty inputs, [`Error::ShapeMismatch`] when the lengths of
    /// `a`/`b` do not match the cost's shape, [`Error::NonFinite`] for NaN or infinite
    /// entries, [`Error::InvalidParameter`] for negative masses, zero total mass, or (balanced)
    /// `sum(a) != sum(b)` beyond a relative `1e-6`.
    ///
    /// ```
    /// use modelfusion::solve::Sinkhorn;
    /// use ndarray::array;
    /// let s = Sinkhorn::builder().with_reg(0.05).build()?;
    /// let m = array![[0.0f32, 1.0, 4.0], [1.0, 0.0, 1.0]];
    /// let ot = s.solve(array![0.5f32, 0.5].view(), array![0.25f32, 0.5, 0.25].view(), m.view())?;
    /// assert!(ot.converged);
    /// let col_sums = ot.plan.sum_axis(ndarray::Axis(0));
    /// assert!((col_sums[1] - 0.5).abs() < 1e-6);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn solve<F: Scalar>(
        &self,
        a: ArrayView1<F>,
        b: ArrayView1<F>,
        cost: ArrayView2<F>,
    ) -> Result<TransportPlan<F>> {
        self.run(a, b, cost, None)
    }

    /// Like [`Sinkhorn::solve`], warm-started from potentials `f` (length `n`) and `g`
    /// (length `m`), e.g. those of a previous, similar problem. With a warm start epsilon
    /// scaling is skipped.
    ///
    /// # Errors
    /// As [`Sinkhorn::solve`], plus [`Error::ShapeMismatch`] / [`Error::NonFinite`] for
    /// the potentials.
    ///
    /// ```
    /// use modelfusion::solve::Sinkhorn;
    /// use ndarray::array;
    /// let s = Sinkhorn::builder().with_reg(1.0).build()?;
    /// let (a, b) = (array![0.5, 0.5], array![0.5, 0.5]);
    /// let m = array![[0.0, 1.0], [2.0, 0.5]];
    /// let cold = s.solve(a.view(), b.view(), m.view())?;
    /// let warm = s.solve_warm(a.view(), b.view(), m.view(), cold.f.view(), cold.g.view())?;
    /// assert!(warm.converged && warm.iterations <= cold.iterations);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn solve_warm<F: Scalar>(
        &self,
        a: ArrayView1<F>,
        b: ArrayView1<F>,
        cost: ArrayView2<F>,
        f: ArrayView1<F>,
        g: ArrayView1<F>,
    ) -> Result<TransportPlan<F>> {
        self.run(a, b, cost, Some((f, g)))
    }

    fn run<F: Scalar>(
        &self,
        a: ArrayView1<F>,
        b: ArrayView1<F>,
        cost: ArrayView2<F>,
        warm: Option<(ArrayView1<F>, ArrayView1<F>)>,
    ) -> Result<TransportPlan<F>> {
        let (n, m) = cost.dim();
        if n == 0 || m == 0 {
            return Err(Error::empty(format!(
                "cost matrix of shape [{n}, {m}] given to sinkhorn"
            )));
        }
        check_len("marginal `a` (one mass per cost row)", a.len(), n, m)?;
        check_len("marginal `b` (one mass per cost column)", b.len(), m, n)?;
        let a = marginal("a", a)?;
        let b = marginal("b", b)?;
        let cost = finite_matrix("cost matrix of sinkhorn", cost)?;
        let (sa, sb) = (a.iter().sum::<f64>(), b.iter().sum::<f64>());
        if self.p.reg_m.is_none() && (sa - sb).abs() > MASS_RTOL * sa.max(sb) {
            return Err(Error::invalid(
                "b",
                format!(
                    "balanced sinkhorn needs equal total masses, got sum(a) = {sa} and sum(b) = {sb} (use reg_m for unbalanced transport)"
                ),
            ));
        }
        let scale = check_reg("reg", self.p.reg, &cost)?;
        let (f0, g0) = match warm {
            Some((f, g)) => {
                check_len("potential `f` (one per cost row)", f.len(), n, m)?;
                check_len("potential `g` (one per cost column)", g.len(), m, n)?;
                let (f, g) = (potential("f", f)?, potential("g", g)?);
                check_warm_span(&f, &g, scale, self.p.reg)?;
                (f, g)
            }
            None => (vec![0.0; n], vec![0.0; m]),
        };
        let out = solve_f64(
            &self.p,
            &Problem {
                a: &a,
                b: &b,
                cost: &cost,
                n,
                m,
            },
            f0,
            g0,
            warm.is_some(),
            simd::best(),
        );
        check_plan("reg", self.p.reg, scale, &out.plan, m)?;
        if !out.cost.is_finite() {
            return Err(Error::invalid(
                "reg",
                format!(
                    "{:e} gives a plan whose transport cost <P, M> is {} (costs of scale {scale:e}); rescale the costs",
                    self.p.reg, out.cost
                ),
            ));
        }
        if let Some((name, v)) = [("f", &out.f), ("g", &out.g)]
            .into_iter()
            .find_map(|(name, v)| {
                v.iter()
                    .find(|x| x.is_nan() || **x == f64::INFINITY)
                    .map(|x| (name, *x))
            })
        {
            return Err(Error::invalid(
                "reg",
                format!(
                    "{:e} gives a potential `{name}` of {v}; raise `reg` or rescale the costs",
                    self.p.reg
                ),
            ));
        }
        if self.p.reg_m.is_none() {
            let total: f64 = out.plan.iter().sum();
            check_mass("reg", self.p.reg, "total mass of the plan", total, sa)?;
        }
        Ok(TransportPlan {
            plan: Array2::from_shape_vec(
                (n, m),
                out.plan.into_iter().map(F::from_f64_lossy).collect(),
            )
            .expect("n x m entries"),
            f: out.f.into_iter().map(F::from_f64_lossy).collect(),
            g: out.g.into_iter().map(F::from_f64_lossy).collect(),
            cost: out.cost,
            iterations: out.iterations,
            error: out.error,
            converged: out.converged,
        })
    }
}

/// Balanced entropic OT with the default tolerance and iteration cap; see [`Sinkhorn`].
///
/// # Errors
/// As [`Sinkhorn::solve`], and [`Error::InvalidParameter`] for a `reg` that is not
/// finite and positive.
///
/// ```
/// use modelfusion::solve::sinkhorn;
/// use ndarray::array;
/// let ot = sinkhorn(array![0.5, 0.5].view(), array![0.5, 0.5].view(),
///                   array![[1.0f64, 0.0], [0.0, 1.0]].view(), 0.01)?;
/// assert!((ot.plan[[0, 1]] - 0.5).abs() < 1e-9);
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn sinkhorn<F: Scalar>(
    a: ArrayView1<F>,
    b: ArrayView1<F>,
    cost: ArrayView2<F>,
    reg: f64,
) -> Result<TransportPlan<F>> {
    Sinkhorn::builder().with_reg(reg).build()?.solve(a, b, cost)
}

/// Unbalanced entropic OT (KL-relaxed marginals with weight `reg_m`); see [`Sinkhorn`].
///
/// # Errors
/// As [`Sinkhorn::solve`] (the masses need not be equal), and
/// [`Error::InvalidParameter`] for a `reg` or `reg_m` that is not finite and positive.
///
/// ```
/// use modelfusion::solve::sinkhorn_unbalanced;
/// use ndarray::array;
/// // more mass on the left than on the right: the plan moves less than sum(a)
/// let ot = sinkhorn_unbalanced(array![2.0, 2.0].view(), array![0.5, 0.5].view(),
///                              array![[0.0, 1.0], [1.0, 0.0]].view(), 0.05, 1.0)?;
/// assert!(ot.converged);
/// assert!(ot.plan.sum() < 4.0 && ot.plan.sum() > 1.0);
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn sinkhorn_unbalanced<F: Scalar>(
    a: ArrayView1<F>,
    b: ArrayView1<F>,
    cost: ArrayView2<F>,
    reg: f64,
    reg_m: f64,
) -> Result<TransportPlan<F>> {
    Sinkhorn::builder()
        .with_reg(reg)
        .with_reg_m(reg_m)
        .build()?
        .solve(a, b, cost)
}

/// The Sinkhorn operator: a soft permutation from a score matrix.
///
/// Starting from `X = scores / tau`, alternately normalises the rows and the columns of
/// `exp(X)` in log space, `n_iter` times each (rows to sum 1, columns to sum
/// `rows / cols`; the last step normalises the columns). For a square matrix the
/// result approaches a doubly stochastic matrix, and the permutation maximising
/// `<P, scores>` as `tau -> 0`.
///
/// # Errors
/// [`Error::Empty`] for an empty matrix, [`Error::NonFinite`] for NaN or infinite
/// scores, [`Error::InvalidParameter`] for `tau` not finite and positive or
/// `n_iter == 0`.
///
/// ```
/// use modelfusion::solve::sinkhorn_operator;
/// use ndarray::{array, Axis};
/// let s = array![[5.0f64, 1.0], [0.0, 4.0]];
/// let p = sinkhorn_operator(s.view(), 1.0, 20)?;
/// for c in p.sum_axis(Axis(0)) { assert!((c - 1.0).abs() < 1e-12); }
/// for r in p.sum_axis(Axis(1)) { assert!((r - 1.0).abs() < 1e-6); }
/// assert!(p[[0, 0]] > 0.9);
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn sinkhorn_operator<F: Scalar>(
    scores: ArrayView2<F>,
    tau: f64,
    n_iter: usize,
) -> Result<Array2<F>> {
    let (n, m) = scores.dim();
    if n == 0 || m == 0 {
        return Err(Error::empty(format!(
            "score matrix of shape [{n}, {m}] given to sinkhorn_operator"
        )));
    }
    check_positive("tau", tau)?;
    if n_iter == 0 {
        return Err(Error::invalid("n_iter", "must be at least 1, got 0"));
    }
    // the operator is log-domain Sinkhorn with cost -scores, reg tau and marginals
    // 1 (rows) and n/m (columns)
    let cost: Vec<f64> = finite_matrix("score matrix of sinkhorn_operator", scores)?
        .into_iter()
        .map(|x| -x)
        .collect();
    let scale = check_reg("tau", tau, &cost)?;
    let a = vec![1.0; n];
    let b = vec![n as f64 / m as f64; m];
    let pr = Problem {
        a: &a,
        b: &b,
        cost: &cost,
        n,
        m,
    };
    // Same iteration in the stabilised scaling form: one exact log-domain row
    // normalisation (so that the kernel cannot overflow), then `n_iter` pairs of
    // row / column scalings on the absorbed kernel, with the same absorption and
    // log-domain fallbacks as `Sinkhorn` (a fallback counts as one iteration).
    let isa = simd::best();
    let mut f = vec![0.0; n];
    lse_update_f(&pr, &vec![0.0; m], &mut f, tau, 1.0, isa);
    let mut st = Stage::new(&pr, tau, 1.0, true, isa, f, vec![0.0; m]);
    for _ in 0..n_iter {
        // a negative tolerance never stops early
        st.iterate(-1.0);
    }
    st.absorb();
    let plan = st.k;
    check_plan("tau", tau, scale, &plan, m)?;
    let want = n as f64 / m as f64;
    for j in 0..m {
        let col: f64 = plan.iter().skip(j).step_by(m).sum();
        check_mass("tau", tau, &format!("column {j} sum"), col, want)?;
    }
    Ok(
        Array2::from_shape_vec((n, m), plan.into_iter().map(F::from_f64_lossy).collect())
            .expect("n x m entries"),
    )
}

/// Errors naming `name` unless `reg >= max(REG_REL_FLOOR * max |M_ij|, f64::MIN_POSITIVE)`
/// and the cost range `max M - min M` is finite; returns the cost scale `max |M_ij|`.
fn check_reg(name: &str, reg: f64, cost: &[f64]) -> Result<f64> {
    let (lo, hi) = cost
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &c| {
            (l.min(c), h.max(c))
        });
    if !(hi - lo).is_finite() {
        return Err(Error::invalid(
            "cost",
            format!("the range of the costs, {hi:e} - ({lo:e}), overflows f64; rescale the costs"),
        ));
    }
    let scale = hi.abs().max(lo.abs());
    let floor = (REG_REL_FLOOR * scale).max(f64::MIN_POSITIVE);
    if reg < floor {
        return Err(Error::invalid(
            name,
            format!(
                "{reg:e} is below its floor {floor:e} (REG_REL_FLOOR = {REG_REL_FLOOR:e} times the cost scale max |M_ij| = {scale:e}, and at least {:e}); raise `{name}` or rescale the costs",
                f64::MIN_POSITIVE
            ),
        ));
    }
    Ok(scale)
}

/// Errors unless `(f_i + g_j - M_ij) / reg` stays finite for every finite warm start.
fn check_warm_span(f: &[f64], g: &[f64], scale: f64, reg: f64) -> Result<()> {
    let max_abs = |v: &[f64]| {
        v.iter()
            .filter(|x| x.is_finite())
            .fold(0.0f64, |s, x| s.max(x.abs()))
    };
    let (fm, gm) = (max_abs(f), max_abs(g));
    if !((fm + gm + scale) / reg).is_finite() {
        let name = if fm >= gm { "f" } else { "g" };
        return Err(Error::invalid(
            name,
            format!(
                "warm-start potentials as large as |f| = {fm:e}, |g| = {gm:e} overflow (f_i + g_j - M_ij) / reg with reg = {reg:e}"
            ),
        ));
    }
    Ok(())
}

/// Errors naming `name = reg` unless every entry of `plan` (`m` columns) is finite.
fn check_plan(name: &str, reg: f64, scale: f64, plan: &[f64], m: usize) -> Result<()> {
    if let Some(k) = plan.iter().position(|p| !p.is_finite()) {
        return Err(Error::invalid(
            name,
            format!(
                "{reg:e} gives a non-finite plan entry [{}, {}] = {} for costs of scale {scale:e}; raise `{name}` or rescale the costs",
                k / m,
                k % m,
                plan[k]
            ),
        ));
    }
    Ok(())
}

/// Errors naming `name = reg` unless `got` is within [`RESULT_MASS_RTOL`] of `want`.
fn check_mass(name: &str, reg: f64, what: &str, got: f64, want: f64) -> Result<()> {
    if (got - want).abs() > RESULT_MASS_RTOL * want.abs() || !got.is_finite() {
        return Err(Error::invalid(
            name,
            format!(
                "{reg:e} gives a plan whose {what} is {got:e} instead of {want:e}; raise `{name}` or rescale the costs"
            ),
        ));
    }
    Ok(())
}

fn check_len(what: &str, got: usize, expected: usize, other: usize) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(Error::shape(
            format!("{what}; cost matrix has {expected} x {other} or its transpose"),
            &[expected],
            &[got],
        ))
    }
}

fn marginal<F: Scalar>(name: &str, x: ArrayView1<F>) -> Result<Vec<f64>> {
    let v: Vec<f64> = x.iter().map(|&t| t.to_f64_lossless()).collect();
    if let Some(i) = v.iter().position(|t| !t.is_finite()) {
        return Err(Error::NonFinite {
            what: format!("marginal `{name}` at index {i} ({})", v[i]),
        });
    }
    if let Some(i) = v.iter().position(|&t| t < 0.0) {
        return Err(Error::invalid(
            name,
            format!("masses must be >= 0, got {} at index {i}", v[i]),
        ));
    }
    if v.iter().sum::<f64>() <= 0.0 {
        return Err(Error::invalid(name, "total mass must be > 0, got 0"));
    }
    Ok(v)
}

fn potential<F: Scalar>(name: &str, x: ArrayView1<F>) -> Result<Vec<f64>> {
    // -inf is a legitimate potential of a zero-mass point; NaN and +inf are not
    let v: Vec<f64> = x.iter().map(|&t| t.to_f64_lossless()).collect();
    if let Some(i) = v.iter().position(|t| t.is_nan() || *t == f64::INFINITY) {
        return Err(Error::NonFinite {
            what: format!("warm-start potential `{name}` at index {i} ({})", v[i]),
        });
    }
    Ok(v)
}

fn finite_matrix<F: Scalar>(what: &str, x: ArrayView2<F>) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.rows() {
        out.extend(row.iter().map(|&t| t.to_f64_lossless()));
    }
    if let Some(k) = out.iter().position(|t| !t.is_finite()) {
        let m = x.ncols();
        return Err(Error::NonFinite {
            what: format!("{what} at [{}, {}] ({})", k / m, k % m, out[k]),
        });
    }
    Ok(out)
}

/// A validated problem in `f64`, row-major.
struct Problem<'a> {
    a: &'a [f64],
    b: &'a [f64],
    cost: &'a [f64],
    n: usize,
    m: usize,
}

impl Problem<'_> {
    /// Rows per block of the fused passes: fixed by the shape alone, so that the
    /// reductions (and the results) do not depend on the number of threads.
    fn block_rows(&self) -> usize {
        self.n.div_ceil(32).max(16)
    }

    fn parallel(&self) -> bool {
        self.n * self.m >= PAR_MIN_ENTRIES
    }
}

struct Solution {
    plan: Vec<f64>,
    f: Vec<f64>,
    g: Vec<f64>,
    cost: f64,
    iterations: usize,
    error: f64,
    converged: bool,
}

/// Runs `op(first_row, rows)` over the fixed row blocks, in parallel when
/// the problem is large; results are returned in block order.
fn for_blocks<T: Send>(pr: &Problem, op: impl Fn(usize, usize) -> T + Sync + Send) -> Vec<T> {
    let br = pr.block_rows();
    let nb = pr.n.div_ceil(br);
    let run = |k: usize| {
        let r0 = k * br;
        op(r0, br.min(pr.n - r0))
    };
    if pr.parallel() {
        (0..nb).into_par_iter().map(run).collect()
    } else {
        (0..nb).map(run).collect()
    }
}

/// `K_ij = exp((f_i + g_j - M_ij) / reg)`.
fn build_kernel(pr: &Problem, f: &[f64], g: &[f64], reg: f64, k: &mut [f64], isa: Isa) {
    let m = pr.m;
    let br = pr.block_rows();
    let inv = 1.0 / reg;
    let work = |(kb, (cb, fb)): (&mut [f64], (&[f64], &[f64]))| {
        kernel_rows(kb, cb, fb, g, inv, isa);
    };
    let it_k = k.chunks_mut(br * m);
    let it_c = pr.cost.chunks(br * m);
    let it_f = f.chunks(br);
    if pr.parallel() {
        k.par_chunks_mut(br * m)
            .zip(pr.cost.par_chunks(br * m).zip(f.par_chunks(br)))
            .for_each(work);
    } else {
        it_k.zip(it_c.zip(it_f)).for_each(work);
    }
}

fn kernel_rows(k: &mut [f64], c: &[f64], f: &[f64], g: &[f64], inv: f64, isa: Isa) {
    #[inline(always)]
    fn body(k: &mut [f64], c: &[f64], f: &[f64], g: &[f64], inv: f64) {
        let m = g.len();
        for ((kr, cr), &fi) in k.chunks_exact_mut(m).zip(c.chunks_exact(m)).zip(f) {
            for ((kij, &cij), &gj) in kr.iter_mut().zip(cr).zip(g) {
                *kij = exp((fi + gj - cij) * inv);
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn avx2(k: &mut [f64], c: &[f64], f: &[f64], g: &[f64], inv: f64) {
        body(k, c, f, g, inv)
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only produced after runtime detection of AVX2 and FMA.
        Isa::Avx2 => unsafe { avx2(k, c, f, g, inv) },
        Isa::Portable => body(k, c, f, g, inv),
    }
}

/// Sum of `x[j] * y[j]` with independent lane accumulators (vectorisable).
#[inline(always)]
fn dot(x: &[f64], y: &[f64]) -> f64 {
    let mut acc = [0.0; LANES];
    let xc = x.chunks_exact(LANES);
    let yc = y.chunks_exact(LANES);
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (a, b) in xc.zip(yc) {
        for l in 0..LANES {
            acc[l] += a[l] * b[l];
        }
    }
    let mut s = 0.0;
    for (a, b) in xr.iter().zip(yr) {
        s += a * b;
    }
    // fixed pairwise order
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            acc[l] += acc[l + w];
        }
    }
    acc[0] + s
}

/// [`dot`] with AVX2 + FMA: four independent 4-wide accumulators (LLVM's own
/// vectorisation of the reduction stays at 128 bits).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
fn dot_avx2(x: &[f64], y: &[f64]) -> f64 {
    use std::arch::x86_64::{
        _mm256_add_pd, _mm256_fmadd_pd, _mm256_loadu_pd, _mm256_setzero_pd, _mm256_storeu_pd,
    };
    let n = x.len().min(y.len());
    let split = n - n % 16;
    let (x, y) = (&x[..n], &y[..n]);
    let mut acc = [_mm256_setzero_pd(); 4];
    for c0 in (0..split).step_by(16) {
        for (q, a) in acc.iter_mut().enumerate() {
            let o = c0 + 4 * q;
            // SAFETY: o + 4 <= split <= n = len of both slices.
            let (vx, vy) = unsafe {
                (
                    _mm256_loadu_pd(x.as_ptr().add(o)),
                    _mm256_loadu_pd(y.as_ptr().add(o)),
                )
            };
            *a = _mm256_fmadd_pd(vx, vy, *a);
        }
    }
    let sum = _mm256_add_pd(_mm256_add_pd(acc[0], acc[1]), _mm256_add_pd(acc[2], acc[3]));
    let mut t = [0.0; 4];
    // SAFETY: `t` holds exactly four f64.
    unsafe { _mm256_storeu_pd(t.as_mut_ptr(), sum) };
    let mut s = (t[0] + t[1]) + (t[2] + t[3]);
    for j in split..n {
        s += x[j] * y[j];
    }
    s
}

/// Output of one fused pass over a block of rows.
struct BlockOut {
    /// `sum_i |u_old_i (K v)_i - a_i|` (balanced) or `max_i |ln u_new - ln u_old|`.
    err: f64,
    /// A row with `(K v)_i == 0` or non-finite scaling (needs a log-domain step).
    bad: bool,
    /// Largest `max(u, 1/u)` among rows with mass.
    spread: f64,
}

/// The Sinkhorn scaling `(mass / sum)^phi` (`phi = 1`: balanced).
#[inline(always)]
fn scaling(mass: f64, sum: f64, phi: f64) -> f64 {
    if phi == 1.0 {
        mass / sum
    } else {
        (mass / sum).powf(phi)
    }
}

/// The slices and settings of one fused pass over a block of rows.
struct BlockArgs<'x> {
    k: &'x [f64],
    v: &'x [f64],
    a: &'x [f64],
    u_old: &'x [f64],
    u_new: &'x mut [f64],
    partial: &'x mut [f64],
    phi: f64,
    balanced: bool,
}

/// One fused pass: `u_i = (a_i / (K v)_i)^phi` and `partial = sum_i u_i K_i` over the
/// block. Reading each row of `K` once serves both half-iterations.
#[inline(always)]
fn fused_block(dot: impl Fn(&[f64], &[f64]) -> f64, b: BlockArgs) -> BlockOut {
    let BlockArgs {
        k,
        v,
        a,
        u_old,
        u_new,
        partial,
        phi,
        balanced,
    } = b;
    let m = v.len();
    partial.fill(0.0);
    let mut out = BlockOut {
        err: 0.0,
        bad: false,
        spread: 1.0,
    };
    for (i, kr) in k.chunks_exact(m).enumerate() {
        let s = dot(kr, v);
        let ai = a[i];
        if balanced {
            out.err += (u_old[i] * s - ai).abs();
        }
        if ai == 0.0 {
            u_new[i] = 0.0;
            continue;
        }
        let ui = scaling(ai, s, phi);
        if !(ui.is_finite() && ui > 0.0) {
            out.bad = true;
            u_new[i] = ui;
            continue;
        }
        if !balanced {
            out.err = out.err.max((ui / u_old[i]).ln().abs());
        }
        out.spread = out.spread.max(ui).max(1.0 / ui);
        u_new[i] = ui;
        for (p, &kij) in partial.iter_mut().zip(kr) {
            *p += ui * kij;
        }
    }
    out
}

fn fused_block_isa(b: BlockArgs, isa: Isa) -> BlockOut {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn avx2(b: BlockArgs) -> BlockOut {
        fused_block(|x, y| dot_avx2(x, y), b)
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only produced after runtime detection of AVX2 and FMA.
        Isa::Avx2 => unsafe { avx2(b) },
        Isa::Portable => fused_block(dot, b),
    }
}

/// Log-sum-exp of `(h_j - c_j) / reg` over a row, with the max subtracted.
#[inline(always)]
fn row_lse(c: &[f64], h: &[f64], inv: f64) -> f64 {
    let mut mx = f64::NEG_INFINITY;
    for (&cj, &hj) in c.iter().zip(h) {
        mx = mx.max((hj - cj) * inv);
    }
    if mx == f64::NEG_INFINITY {
        return mx;
    }
    let mut acc = [0.0; LANES];
    let cc = c.chunks_exact(LANES);
    let hc = h.chunks_exact(LANES);
    let (cr, hr) = (cc.remainder(), hc.remainder());
    for (x, y) in cc.zip(hc) {
        for l in 0..LANES {
            acc[l] += exp((y[l] - x[l]) * inv - mx);
        }
    }
    let mut s: f64 = acc.iter().sum();
    for (&x, &y) in cr.iter().zip(hr) {
        s += exp((y - x) * inv - mx);
    }
    mx + s.ln()
}

/// Exact log-domain update `f_i = phi * reg * (ln a_i - LSE_j((g_j - M_ij) / reg))`.
fn lse_update_f(pr: &Problem, g: &[f64], f: &mut [f64], reg: f64, phi: f64, isa: Isa) {
    #[inline(always)]
    fn body(c: &[f64], g: &[f64], a: &[f64], f: &mut [f64], reg: f64, phi: f64) {
        let m = g.len();
        for ((cr, fi), &ai) in c.chunks_exact(m).zip(f.iter_mut()).zip(a) {
            *fi = if ai == 0.0 {
                f64::NEG_INFINITY
            } else {
                phi * reg * (ai.ln() - row_lse(cr, g, 1.0 / reg))
            };
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn avx2(c: &[f64], g: &[f64], a: &[f64], f: &mut [f64], reg: f64, phi: f64) {
        body(c, g, a, f, reg, phi)
    }
    let br = pr.block_rows();
    let m = pr.m;
    let work = |(fb, (cb, ab)): (&mut [f64], (&[f64], &[f64]))| match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only produced after runtime detection of AVX2 and FMA.
        Isa::Avx2 => unsafe { avx2(cb, g, ab, fb, reg, phi) },
        Isa::Portable => body(cb, g, ab, fb, reg, phi),
    };
    if pr.parallel() {
        f.par_chunks_mut(br)
            .zip(pr.cost.par_chunks(br * m).zip(pr.a.par_chunks(br)))
            .for_each(work);
    } else {
        f.chunks_mut(br)
            .zip(pr.cost.chunks(br * m).zip(pr.a.chunks(br)))
            .for_each(work);
    }
}

/// Exact log-domain update `g_j = phi * reg * (ln b_j - LSE_i((f_i - M_ij) / reg))`,
/// column-wise over the row-major cost with per-block partial sums (fixed order).
fn lse_update_g(pr: &Problem, f: &[f64], g: &mut [f64], reg: f64, phi: f64, isa: Isa) {
    let m = pr.m;
    let inv = 1.0 / reg;
    // pass 1: column maxima of (f_i - M_ij) / reg
    let maxes = for_blocks(pr, |r0, nr| {
        let mut mx = vec![f64::NEG_INFINITY; m];
        let rows = &pr.cost[r0 * m..(r0 + nr) * m];
        for (row, &fi) in rows.chunks_exact(m).zip(&f[r0..r0 + nr]) {
            for (x, &c) in mx.iter_mut().zip(row) {
                *x = x.max((fi - c) * inv);
            }
        }
        mx
    });
    let mut colmax = vec![f64::NEG_INFINITY; m];
    for mx in &maxes {
        for (c, &x) in colmax.iter_mut().zip(mx) {
            *c = c.max(x);
        }
    }
    // pass 2: partial sums of exp(. - colmax), combined in block order
    #[inline(always)]
    fn sums_body(rows: &[f64], f: &[f64], colmax: &[f64], inv: f64, s: &mut [f64]) {
        let m = colmax.len();
        for (row, &fi) in rows.chunks_exact(m).zip(f) {
            if fi == f64::NEG_INFINITY {
                continue;
            }
            for ((sj, &c), &cm) in s.iter_mut().zip(row).zip(colmax) {
                *sj += exp((fi - c) * inv - cm);
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn sums_avx2(rows: &[f64], f: &[f64], colmax: &[f64], inv: f64, s: &mut [f64]) {
        sums_body(rows, f, colmax, inv, s)
    }
    let partials = for_blocks(pr, |r0, nr| {
        let mut s = vec![0.0; m];
        let rows = &pr.cost[r0 * m..(r0 + nr) * m];
        let fb = &f[r0..r0 + nr];
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Avx2` is only produced after runtime detection of AVX2 and FMA.
            Isa::Avx2 => unsafe { sums_avx2(rows, fb, &colmax, inv, &mut s) },
            Isa::Portable => sums_body(rows, fb, &colmax, inv, &mut s),
        }
        s
    });
    let mut sums = vec![0.0; m];
    for p in &partials {
        for (s, &x) in sums.iter_mut().zip(p) {
            *s += x;
        }
    }
    for j in 0..m {
        g[j] = if pr.b[j] == 0.0 || colmax[j] == f64::NEG_INFINITY {
            f64::NEG_INFINITY
        } else {
            phi * reg * (pr.b[j].ln() - (colmax[j] + sums[j].ln()))
        };
    }
}

/// The stabilised iteration at one regulariser. Potentials `f`, `g` are absorbed into
/// the kernel; `u`, `v` are the scalings on top of them.
struct Stage<'p, 'a> {
    pr: &'p Problem<'a>,
    reg: f64,
    phi: f64,
    balanced: bool,
    isa: Isa,
    f: Vec<f64>,
    g: Vec<f64>,
    k: Vec<f64>,
    u: Vec<f64>,
    u_next: Vec<f64>,
    v: Vec<f64>,
    v_next: Vec<f64>,
    partials: Vec<f64>,
}

impl<'p, 'a> Stage<'p, 'a> {
    /// A stage at regulariser `reg` from potentials `f`, `g` (kernel built).
    fn new(
        pr: &'p Problem<'a>,
        reg: f64,
        phi: f64,
        balanced: bool,
        isa: Isa,
        f: Vec<f64>,
        g: Vec<f64>,
    ) -> Self {
        let (n, m) = (pr.n, pr.m);
        let mut st = Stage {
            pr,
            reg,
            phi,
            balanced,
            isa,
            f,
            g,
            k: vec![0.0; n * m],
            u: vec![1.0; n],
            u_next: vec![1.0; n],
            v: vec![1.0; m],
            v_next: vec![1.0; m],
            partials: Vec::new(),
        };
        st.reset_kernel();
        st
    }

    /// Folds `u`, `v` into `f`, `g` and rebuilds the kernel.
    fn absorb(&mut self) {
        let reg = self.reg;
        for (fi, &ui) in self.f.iter_mut().zip(&self.u) {
            *fi += reg * ui.ln();
        }
        for (gj, &vj) in self.g.iter_mut().zip(&self.v) {
            *gj += reg * vj.ln();
        }
        self.reset_kernel();
    }

    fn reset_kernel(&mut self) {
        self.u.fill(1.0);
        self.v.fill(1.0);
        build_kernel(self.pr, &self.f, &self.g, self.reg, &mut self.k, self.isa);
    }

    /// One exact log-domain iteration, then a fresh kernel.
    fn log_step(&mut self) {
        lse_update_f(self.pr, &self.g, &mut self.f, self.reg, self.phi, self.isa);
        lse_update_g(self.pr, &self.f, &mut self.g, self.reg, self.phi, self.isa);
        self.reset_kernel();
    }

    /// One scaling iteration (see [`Step`]).
    fn iterate(&mut self, tol: f64) -> Step {
        let pr = self.pr;
        let (m, br) = (pr.m, pr.block_rows());
        let nb = pr.n.div_ceil(br);
        self.partials.resize(nb * m, 0.0);
        let (k, v, u, isa) = (&self.k, &self.v, &self.u, self.isa);
        let (phi, balanced) = (self.phi, self.balanced);
        type Item<'x> = (
            ((&'x [f64], &'x [f64]), (&'x [f64], &'x mut [f64])),
            &'x mut [f64],
        );
        let job = |(((kb, ab), (uo, un)), part): Item| {
            let args = BlockArgs {
                k: kb,
                v,
                a: ab,
                u_old: uo,
                u_new: un,
                partial: part,
                phi,
                balanced,
            };
            fused_block_isa(args, isa)
        };
        let outs: Vec<BlockOut> = if pr.parallel() {
            k.par_chunks(br * m)
                .zip(pr.a.par_chunks(br))
                .zip(u.par_chunks(br).zip(self.u_next.par_chunks_mut(br)))
                .zip(self.partials.par_chunks_mut(m))
                .map(job)
                .collect()
        } else {
            k.chunks(br * m)
                .zip(pr.a.chunks(br))
                .zip(u.chunks(br).zip(self.u_next.chunks_mut(br)))
                .zip(self.partials.chunks_mut(m))
                .map(job)
                .collect()
        };
        let mut err = 0.0f64;
        let mut spread = 1.0f64;
        let mut bad = false;
        for o in &outs {
            bad |= o.bad;
            err = if balanced {
                err + o.err
            } else {
                err.max(o.err)
            };
            spread = spread.max(o.spread);
        }
        if balanced && err <= tol {
            // the state before this pass meets the tolerance: keep it
            return Step::Done(err);
        }
        if bad {
            self.absorb();
            self.log_step();
            return Step::Fallback;
        }
        let mut change = 0.0f64;
        for j in 0..m {
            let mut t = 0.0;
            for blk in 0..nb {
                t += self.partials[blk * m + j];
            }
            let bj = pr.b[j];
            if bj == 0.0 {
                self.v_next[j] = 0.0;
                continue;
            }
            let vj = scaling(bj, t, phi);
            if !(vj.is_finite() && vj > 0.0) {
                self.absorb();
                self.log_step();
                return Step::Fallback;
            }
            if !balanced {
                change = change.max((vj / self.v[j]).ln().abs());
            }
            spread = spread.max(vj).max(1.0 / vj);
            self.v_next[j] = vj;
        }
        std::mem::swap(&mut self.u, &mut self.u_next);
        std::mem::swap(&mut self.v, &mut self.v_next);
        if spread > ABSORB {
            self.absorb();
        }
        if balanced {
            Step::Continue(err)
        } else {
            let change = self.reg * err.max(change);
            if change <= tol {
                Step::Done(change)
            } else {
                Step::Continue(change)
            }
        }
    }
}

/// What one stabilised iteration did.
enum Step {
    /// Converged (balanced: the state before the iteration, left unchanged).
    Done(f64),
    /// Made an iteration; the criterion's value.
    Continue(f64),
    /// Hit an underflow or overflow and made an exact log-domain iteration instead.
    Fallback,
}

/// Epsilon-scaling stages start at the cost's range and shrink by this factor.
const EPS_DECAY: f64 = 0.25;
/// Intermediate stages stop at this marginal error relative to the total mass.
const STAGE_TOL: f64 = 1e-3;

fn solve_f64(
    p: &SinkhornBuilder,
    pr: &Problem,
    f0: Vec<f64>,
    g0: Vec<f64>,
    warm: bool,
    isa: Isa,
) -> Solution {
    let balanced = p.reg_m.is_none();
    let mut regs = Vec::new();
    if balanced && p.epsilon_scaling && !warm {
        let (lo, hi) = pr
            .cost
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &c| {
                (l.min(c), h.max(c))
            });
        let mut r = hi - lo;
        while r > p.reg {
            regs.push(r);
            r *= EPS_DECAY;
        }
    }
    regs.push(p.reg);
    let phi = p.reg_m.map_or(1.0, |rm| rm / (rm + p.reg));
    let mut st = Stage::new(pr, regs[0], phi, balanced, isa, f0, g0);
    let mass: f64 = pr.a.iter().sum();
    let mut iterations = 0;
    let mut converged = false;
    let mut error = f64::INFINITY;
    for (si, &reg) in regs.iter().enumerate() {
        let last = si + 1 == regs.len();
        if si > 0 {
            st.absorb();
            st.reg = reg;
            st.reset_kernel();
        }
        let tol = if last {
            p.tol
        } else {
            p.tol.max(STAGE_TOL * mass)
        };
        while iterations < p.max_iter {
            match st.iterate(tol) {
                Step::Done(e) => {
                    error = e;
                    converged = last;
                    break;
                }
                Step::Continue(e) => {
                    error = e;
                    iterations += 1;
                }
                Step::Fallback => iterations += 1,
            }
        }
    }
    // fold the scalings into the potentials; the plan is the exact kernel
    st.absorb();
    let Stage { f, g, k: plan, .. } = st;
    let cost = plan.iter().zip(pr.cost).map(|(&p, &c)| p * c).sum();
    if balanced {
        error = marginal_error(&plan, pr);
    }
    Solution {
        plan,
        f,
        g,
        cost,
        iterations,
        error,
        converged,
    }
}

/// `sum_i |P 1 - a|_i + sum_j |P^T 1 - b|_j`.
fn marginal_error(plan: &[f64], pr: &Problem) -> f64 {
    let m = pr.m;
    let mut cols = vec![0.0; m];
    let mut e = 0.0;
    for (row, &ai) in plan.chunks_exact(m).zip(pr.a) {
        let mut s = 0.0;
        for (c, &x) in cols.iter_mut().zip(row) {
            s += x;
            *c += x;
        }
        e += (s - ai).abs();
    }
    e + cols
        .iter()
        .zip(pr.b)
        .map(|(c, b)| (c - b).abs())
        .sum::<f64>()
}
