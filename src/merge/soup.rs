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
