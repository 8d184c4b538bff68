//! Greedy model soups (Wortsman et al. 2022).

use super::Merger;
use super::average::Average;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::objective::Objective;

/// One step of a greedy soup: an ingredient tried, the held-out objective of the soup
/// with it, and whether it was kept.
#[derive(Clone, Debug, PartialEq)]
pub struct SoupStep {
    /// Index of the ingredient (into the list passed to [`GreedySoup::cook`]).
    pub ingredient: usize,
    /// Held-out objective of the mean of the kept ingredients plus this one.
    pub candidate_score: f64,
    /// Whether the candidate strictly improved the soup and was kept.
    pub kept: bool,
}

/// What [`GreedySoup::cook`] produced.
#[derive(Clone, Debug)]
pub struct SoupReport<M> {
    /// The soup: the uniform mean of the kept ingredients.
    pub soup: M,
    /// Held-out objective of every ingredient alone, by ingredient index.
    pub ingredient_scores: Vec<f64>,
    /// Ingredient indices sorted by their score (best, i.e. lowest, first; ties by index).
    pub order: Vec<usize>,
    /// Indices of the kept ingredients, in the order they were added.
    pub kept: Vec<usize>,
    /// Every step after the first ingredient, in order.
    pub steps: Vec<SoupStep>,
    /// Held-out objective of the soup.
    pub score: f64,
}

/// Greedy soup: ingredients are sorted by their held-out objective; the soup starts
/// with the best and each next ingredient is kept only if the held-out objective of the
/// uniform mean of the soup with it is **strictly lower**. The objective is minimised:
/// pass a loss or an error rate (not an accuracy; negate one if needed).
///
/// ```
/// use modelfusion::merge::GreedySoup;
/// use modelfusion::{Model, Objective, Result, StateDict, StateDictF64};
/// use ndarray::arr1;
///
/// /// Distance to the point 1.0.
/// struct Dist;
/// impl Objective<StateDictF64> for Dist {
///     fn loss(&self, m: &StateDictF64) -> Result<f64> { Ok((m.get("w").unwrap()[[0]] - 1.0).abs()) }
/// }
/// let ing: Vec<StateDictF64> = [0.5, 1.6, 9.0]
///     .iter()
///     .map(|&v| StateDict::from_pairs([("w", arr1(&[v]).into_dyn())]).unwrap())
///     .collect();
/// let refs: Vec<&StateDictF64> = ing.iter().collect();
/// let report = GreedySoup::new(Dist).cook(&refs)?;
/// assert_eq!(report.order, vec![0, 1, 2]);
/// assert_eq!(report.kept, vec![0, 1]); // mean 1.05 beats 0.5; adding 9.0 does not help
/// assert!((report.score - 0.05).abs() < 1e-12);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct GreedySoup<O> {
    objective: O,
}

impl<O> GreedySoup<O> {
    /// A greedy soup judged by `objective` (lower is better) on held-out data.
    ///
    /// ```
    /// use modelfusion::merge::GreedySoup;
    /// let s = GreedySoup::new(());
    /// # let _ = s;
    /// ```
    pub fn new(objective: O) -> Self {
        GreedySoup { objective }
    }

    /// Cooks the soup from `ingredients` (mutually compatible models). Errors on no
    /// ingredients, incompatible ones, or a non-finite objective value.
    ///
    /// ```
    /// use modelfusion::merge::GreedySoup;
    /// use modelfusion::{Objective, Result, StateDictF64};
    /// struct Zero;
    /// impl Objective<StateDictF64> for Zero {
    ///     fn loss(&self, _: &StateDictF64) -> Result<f64> { Ok(0.0) }
    /// }
    /// assert!(GreedySoup::new(Zero).cook(&[]).is_err());
    /// ```
    pub fn cook<M: Model>(&self, ingredients: &[&M]) -> Result<SoupReport<M>>
    where
        O: Objective<M>,
    {
        let first = *ingredients
            .first()
            .ok_or_else(|| Error::empty("the list of soup ingredients"))?;
        for m in &ingredients[1..] {
            first.check_compatible(m)?;
        }
        let eval = |m: &M, what: &str| -> Result<f64> {
            let v = self.objective.loss(m)?;
            if v.is_nan() {
                return Err(Error::NonFinite {
                    what: format!("the held-out objective of {what}"),
                });
            }
            Ok(v)
        };
        let scores = ingredients
            .iter()
            .enumerate()
            .map(|(i, m)| eval(m, &format!("ingredient {i}")))
            .collect::<Result<Vec<_>>>()?;
        let mut order: Vec<usize> = (0..ingredients.len()).collect();
        order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
        let mut kept = vec![order[0]];
        let mut soup = ingredients[order[0]].clone();
        let mut score = scores[order[0]];
        let mut steps = Vec::new();
        for &i in &order[1..] {
            let mut members: Vec<&M> = kept.iter().map(|&k| ingredients[k]).collect();
            members.push(ingredients[i]);
            let candidate = Average::uniform().merge(&members)?;
            let s = eval(&candidate, &format!("the soup with ingredient {i}"))?;
            let keep = s < score;
            steps.push(SoupStep {
                ingredient: i,
                candidate_score: s,
                kept: keep,
            });
            if keep {
                kept.push(i);
                soup = candidate;
                score = s;
            }
        }
        Ok(SoupReport {
            soup,
            ingredient_scores: scores,
            order,
            kept,
            steps,
            score,
        })
    }
}

/// One soup weight of a [`RobustSoup`]: the soup
/// `(1 - weight) theta_clean + weight theta_robust` and its two objectives.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RobustSoupPoint {
    /// The weight of the robust ingredient, in `[0, 1]`.
    pub weight: f64,
    /// The clean objective of the soup (e.g. the clean error rate).
    pub clean: f64,
    /// The robust objective of the soup (e.g. the error rate under attack).
    pub robust: f64,
    /// `(1 - trade_off) clean + trade_off robust`, what the weight is chosen by.
    pub score: f64,
}

/// What [`RobustSoup::cook`] produced.
#[derive(Clone, Debug)]
pub struct RobustSoupReport<M> {
    /// The soup at the chosen weight.
    pub soup: M,
    /// The chosen weight of the robust ingredient.
    pub weight: f64,
    /// Every weight of the grid in increasing order, with its objectives: the clean vs
    /// robust trade-off curve.
    pub points: Vec<RobustSoupPoint>,
}

/// The adversarially-robust soup (Croce et al. 2023, "Seasoning model soups for
/// robustness to adversarial and natural distribution shifts"): interpolate the weights
/// of a clean-trained and an adversarially trained model fine-tuned from a shared
/// initialisation, `theta(w) = (1 - w) theta_clean + w theta_robust`, and pick the soup
/// weight `w` from a grid by `(1 - trade_off) clean(theta(w)) + trade_off
/// robust(theta(w))` on held-out data (both objectives minimised: pass error rates or
/// losses, e.g. [`Classification::error_rate`](crate::nn::Classification::error_rate)
/// and [`Robust::error_rate`](crate::nn::Robust::error_rate)). The report keeps the
/// whole curve, so a caller can also pick the weight by another rule (a robustness
/// target at the least clean cost). Ties go to the smaller weight.
///
/// The grid defaults to the 11 weights `0, 0.1, ..., 1`; it always holds 0 and 1 (each
/// ingredient alone, returned bit for bit), and the trade-off defaults to `0.5`.
///
/// ```
/// use modelfusion::merge::RobustSoup;
/// use modelfusion::{Model, StateDict, StateDictF64};
/// use ndarray::arr1;
///
/// let m = |x: f64| StateDict::from_pairs([("w", arr1(&[x]).into_dyn())]).unwrap();
/// // The clean objective wants w = 0, the robust one w = 1 (quadratics).
/// let clean = |s: &StateDictF64| Ok(s.get("w").unwrap()[[0]].powi(2));
/// let robust = |s: &StateDictF64| Ok((s.get("w").unwrap()[[0]] - 1.0).powi(2));
/// let report = RobustSoup::new(clean, robust).with_trade_off(0.3)?.cook(&m(0.0), &m(1.0))?;
/// assert!((report.weight - 0.3).abs() < 1e-12); // argmin (0.7 w^2 + 0.3 (w - 1)^2)
/// assert_eq!(report.points.len(), 11);
/// assert_eq!(report.points[0].clean, 0.0);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct RobustSoup<C, R> {
    clean: C,
    robust: R,
    grid: Vec<f64>,
    trade_off: f64,
}

impl<C, R> RobustSoup<C, R> {
    /// A soup judged by `clean` and `robust` (lower is better) on held-out data; 11
    /// weights, trade-off `0.5`.
    ///
    /// ```
    /// use modelfusion::merge::RobustSoup;
    /// let s = RobustSoup::new((), ());
    /// assert_eq!(s.grid().len(), 11);
    /// assert_eq!(s.trade_off(), 0.5);
    /// ```
    pub fn new(clean: C, robust: R) -> Self {
        RobustSoup {
            clean,
            robust,
            grid: (0..=10).map(|i| f64::from(i) / 10.0).collect(),
            trade_off: 0.5,
        }
    }

    /// The soup weights to try: finite, in `[0, 1]`, strictly increasing; 0 and 1 are
    /// added when missing.
    ///
    /// ```
    /// use modelfusion::merge::RobustSoup;
    /// assert_eq!(RobustSoup::new((), ()).with_grid(vec![0.5])?.grid(), &[0.0, 0.5, 1.0]);
    /// assert!(RobustSoup::new((), ()).with_grid(vec![0.5, 0.2]).is_err());
    /// assert!(RobustSoup::new((), ()).with_grid(vec![f64::NAN]).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_grid(mut self, grid: Vec<f64>) -> Result<Self> {
        self.grid = crate::barrier::BarrierConfig::from_grid(grid)?
            .grid()
            .to_vec();
        Ok(self)
    }

    /// The weight of the robust objective in the score, in `[0, 1]` (0: the best clean
    /// soup, 1: the most robust one).
    ///
    /// ```
    /// use modelfusion::merge::RobustSoup;
    /// assert!(RobustSoup::new((), ()).with_trade_off(1.5).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn with_trade_off(mut self, trade_off: f64) -> Result<Self> {
        crate::error::check_fraction("trade_off", trade_off)?;
        self.trade_off = trade_off;
        Ok(self)
    }

    /// The soup weights tried.
    pub fn grid(&self) -> &[f64] {
        &self.grid
    }

    /// The weight of the robust objective in the score.
    pub fn trade_off(&self) -> f64 {
        self.trade_off
    }

    /// Evaluates the soup at every weight of the grid and keeps the best by score.
    /// Errors when the ingredients are incompatible or an objective is NaN.
    ///
    /// ```
    /// use modelfusion::merge::RobustSoup;
    /// use modelfusion::{Model, StateDict, StateDictF64};
    /// use ndarray::arr1;
    /// let a = StateDict::from_pairs([("w", arr1(&[1.0]).into_dyn())])?;
    /// let b = StateDict::from_pairs([("v", arr1(&[1.0]).into_dyn())])?;
    /// let zero = |_: &StateDictF64| Ok(0.0);
    /// assert!(RobustSoup::new(zero, zero).cook(&a, &b).is_err());
    /// let nan = |_: &StateDictF64| Ok(f64::NAN);
    /// assert!(RobustSoup::new(zero, nan).cook(&a, &a).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn cook<M: Model>(&self, clean_model: &M, robust_model: &M) -> Result<RobustSoupReport<M>>
    where
        C: Objective<M>,
        R: Objective<M>,
    {
        use crate::path::PathSampler;
        let line = crate::path::Linear::new(clean_model.clone(), robust_model.clone())?;
        let checked = |v: f64, what: &str, w: f64| {
            if v.is_nan() {
                Err(Error::NonFinite {
                    what: format!("the {what} objective of the soup at weight {w}"),
                })
            } else {
                Ok(v)
            }
        };
        let mut points = Vec::with_capacity(self.grid.len());
        let mut best: Option<(f64, M)> = None;
        for &weight in &self.grid {
            let soup = line.point(weight)?;
            let clean = checked(self.clean.loss(&soup)?, "clean", weight)?;
            let robust = checked(self.robust.loss(&soup)?, "robust", weight)?;
            let score = (1.0 - self.trade_off) * clean + self.trade_off * robust;
            points.push(RobustSoupPoint {
                weight,
                clean,
                robust,
                score,
            });
            if best.as_ref().is_none_or(|(s, _)| score < *s) {
                best = Some((score, soup));
            }
        }
        let (score, soup) = best.ok_or_else(|| Error::empty("the grid of soup weights"))?;
        let weight = points
            .iter()
            .find(|p| p.score == score)
            .map_or(0.0, |p| p.weight);
        Ok(RobustSoupReport {
            soup,
            weight,
            points,
        })
    }
}
