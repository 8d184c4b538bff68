//! Structured permutations of attention layers: heads move as blocks, head dimensions
//! move inside their head, with the constraints of shared query-key dimensions, rotary
//! embeddings and grouped-query attention.
//!
//! An attention group's units are `2 * heads * head_dim`: the first half indexes the
//! query-key dimensions of every query head (`h * head_dim + i`, the rows of Q), the
//! second half the value-output dimensions of every query head (the columns of O). A
//! permutation of the group is *structured* when
//! - it maps each half to itself and each head block to one head block, with the same
//!   head permutation in both halves (a head's Q, K, V and O move together);
//! - with grouped-query attention (`kv_heads < heads`), the query heads sharing a
//!   key-value head stay together (key-value heads move as blocks of query-head groups)
//!   and share one within-head permutation per half (the key-value head is permuted
//!   once);
//! - with rotary embeddings, the query-key dimensions the rotation acts on stay in
//!   place. The rotation of pair `(i, i + rotary_dim / 2)` (Hugging Face's `rotate_half`
//!   layout) depends on the frequency of slot `i`, so moving a pair to another slot
//!   changes the scores; only non-rotary dimensions (partial rotary) may move.
//!
//! Key and value rows (`kv_heads * head_dim` of them) read the permutation of the first
//! query head of their group ([`HeadLayout::slot_indices`]).
//!
//! ```
//! use modelfusion::perm::{HeadLayout, HeadSlot, Permutation};
//! let layout = HeadLayout::new(4, 2, 2)?; // 4 query heads, 2 KV heads, head_dim 2
//! let p = layout.compose(
//!     &Permutation::new(vec![2, 3, 1, 0])?,               // query heads (KV groups swap)
//!     &[Permutation::new(vec![1, 0])?, Permutation::identity(2)], // Q/K dims per KV head
//!     &[Permutation::identity(2), Permutation::new(vec![1, 0])?], // V/O dims per KV head
//! )?;
//! assert_eq!(layout.slot_indices(HeadSlot::Key, &p), vec![3, 2, 0, 1]);
//! assert!(layout.check(&p).is_ok());
//! // Query heads 0 and 1 share KV head 0: sending them to different KV groups is refused.
//! let bad = layout.compose(&Permutation::new(vec![0, 2, 1, 3])?, &[Permutation::identity(2), Permutation::identity(2)], &[Permutation::identity(2), Permutation::identity(2)]);
//! assert!(bad.unwrap_err().to_string().contains("key-value"));
//! # Ok::<(), modelfusion::Error>(())
//! ```

use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::Permutation;
use crate::error::{Error, Result};

/// The shape of an attention layer's heads.
///
/// ```
/// use modelfusion::perm::HeadLayout;
/// let l = HeadLayout::new(8, 2, 16)?.with_rotary_dim(16)?;
/// assert_eq!((l.heads(), l.kv_heads(), l.head_dim(), l.rotary_dim()), (8, 2, 16, 16));
/// assert_eq!(l.units(), 2 * 8 * 16);
/// assert!(HeadLayout::new(6, 4, 8).is_err()); // 6 query heads do not split into 4 groups
/// assert!(HeadLayout::new(4, 4, 8)?.with_rotary_dim(9).is_err());
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HeadLayout {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    rotary_dim: usize,
}

/// Which part of an attention layer a `(parameter, axis)` of an attention group holds.
///
/// ```
/// use modelfusion::perm::{HeadLayout, HeadSlot};
/// let l = HeadLayout::new(4, 2, 8)?;
/// assert_eq!(l.slot_len(HeadSlot::Query), 32);
/// assert_eq!(l.slot_len(HeadSlot::Key), 16);
/// assert_eq!(l.slot_len(HeadSlot::FusedQkv), 64);
/// assert_eq!("value".parse::<HeadSlot>()?, HeadSlot::Value);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HeadSlot {
    /// Query rows (`heads * head_dim`): the query-key half, query heads.
    Query,
    /// Key rows (`kv_heads * head_dim`): the query-key half, key-value heads.
    Key,
    /// Value rows (`kv_heads * head_dim`): the value-output half, key-value heads.
    Value,
    /// Output-projection inputs (`heads * head_dim`): the value-output half, query heads.
    Output,
    /// Query, key and value rows concatenated (GPT-2's `c_attn`).
    FusedQkv,
}

impl HeadSlot {
    /// Lower-case name (`query`, `key`, `value`, `output`, `fused_qkv`).
    pub fn as_str(self) -> &'static str {
        match self {
            HeadSlot::Query => "query",
            HeadSlot::Key => "key",
            HeadSlot::Value => "value",
            HeadSlot::Output => "output",
            HeadSlot::FusedQkv => "fused_qkv",
        }
    }
}

impl std::str::FromStr for HeadSlot {
    type Err = Error;

    fn from_str(s: &str) -> Result<HeadSlot> {
        [
            HeadSlot::Query,
            HeadSlot::Key,
            HeadSlot::Value,
            HeadSlot::Output,
            HeadSlot::FusedQkv,
        ]
        .into_iter()
        .find(|h| h.as_str() == s)
        .ok_or_else(|| {
            Error::invalid(
                "slot",
                format!("`{s}`; expected query, key, value, output or fused_qkv"),
            )
        })
    }
}

/// The parts of a structured attention permutation (see [`HeadLayout::decompose`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeadPermutation {
    /// Query heads: output head `h` takes input head `heads[h]`.
    pub heads: Permutation,
    /// Query-key dimensions, one permutation per output key-value head.
    pub qk: Vec<Permutation>,
    /// Value-output dimensions, one permutation per output key-value head.
    pub vo: Vec<Permutation>,
}

fn bad(reason: String) -> Error {
    Error::InvalidPermutation { reason }
}

impl HeadLayout {
    /// `heads` query heads in `kv_heads` key-value groups (`kv_heads == heads` without
    /// grouped-query attention) of `head_dim` dimensions, no rotary embedding. Errors when
    /// a size is 0 or `kv_heads` does not divide `heads`.
    pub fn new(heads: usize, kv_heads: usize, head_dim: usize) -> Result<Self> {
        if heads == 0 || kv_heads == 0 || head_dim == 0 {
            return Err(Error::invalid(
                "head layout",
                format!(
                    "heads {heads}, kv_heads {kv_heads}, head_dim {head_dim}: all must be at least 1"
                ),
            ));
        }
        if heads % kv_heads != 0 {
            return Err(Error::invalid(
                "kv_heads",
                format!("{kv_heads} key-value heads do not divide {heads} query heads"),
            ));
        }
        Ok(HeadLayout {
            heads,
            kv_heads,
            head_dim,
            rotary_dim: 0,
        })
    }

    /// Rotary embeddings on the first `rotary_dim` query-key dimensions of every head
    /// (even, at most `head_dim`; `head_dim` for LLaMA-like models, 0 for none).
    pub fn with_rotary_dim(mut self, rotary_dim: usize) -> Result<Self> {
        if rotary_dim % 2 != 0 || rotary_dim > self.head_dim {
            return Err(Error::invalid(
                "rotary_dim",
                format!(
                    "{rotary_dim} must be even and at most head_dim {}",
                    self.head_dim
                ),
            ));
        }
        self.rotary_dim = rotary_dim;
        Ok(self)
    }

    /// Query heads.
    pub fn heads(&self) -> usize {
        self.heads
    }

    /// Key-value heads.
    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }

    /// Dimensions per head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Rotary dimensions per head (0: none).
    pub fn rotary_dim(&self) -> usize {
        self.rotary_dim
    }

    /// Query heads per key-value head.
    pub fn group_size(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// Units of the attention group: `2 * heads * head_dim`.
    pub fn units(&self) -> usize {
        2 * self.heads * self.head_dim
    }

    /// Entries of an axis holding `slot`.
    pub fn slot_len(&self, slot: HeadSlot) -> usize {
        let (q, kv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        match slot {
            HeadSlot::Query | HeadSlot::Output => q,
            HeadSlot::Key | HeadSlot::Value => kv,
            HeadSlot::FusedQkv => q + 2 * kv,
        }
    }

    /// The gather indices a group permutation `p` (of [`units`](Self::units)) induces on
    /// an axis holding `slot`; empty (so that gathering with them fails on the length)
    /// unless `p` is structured ([`check`](Self::check)).
    pub fn slot_indices(&self, slot: HeadSlot, p: &Permutation) -> Vec<usize> {
        if self.check(p).is_err() {
            return Vec::new();
        }
        let hd = self.heads * self.head_dim;
        let kvd = self.kv_heads * self.head_dim;
        let half = |s: usize| {
            p.as_slice()[s * hd..(s + 1) * hd]
                .iter()
                .map(move |&u| u - s * hd)
        };
        let kv = |s: usize| -> Vec<usize> {
            let h = half(s).collect::<Vec<_>>();
            (0..self.kv_heads)
                .flat_map(|g| {
                    let row = g * self.group_size() * self.head_dim;
                    h[row..row + self.head_dim].iter().map(|&src| {
                        (src / self.head_dim / self.group_size()) * self.head_dim
                            + src % self.head_dim
                    })
                })
                .collect()
        };
        match slot {
            HeadSlot::Query => half(0).collect(),
            HeadSlot::Output => half(1).collect(),
            HeadSlot::Key => kv(0),
            HeadSlot::Value => kv(1),
            HeadSlot::FusedQkv => half(0)
                .chain(kv(0).into_iter().map(|i| i + hd))
                .chain(kv(1).into_iter().map(|i| i + hd + kvd))
                .collect(),
        }
    }

    /// The group permutation made of a query-head permutation and one within-head
    /// permutation per key-value head for each half; errors (naming the constraint)
    /// unless the result is structured.
    pub fn compose(
        &self,
        heads: &Permutation,
        qk: &[Permutation],
        vo: &[Permutation],
    ) -> Result<Permutation> {
        if heads.len() != self.heads {
            return Err(bad(format!(
                "head permutation has length {}, the layout has {} heads",
                heads.len(),
                self.heads
            )));
        }
        for (name, parts) in [("query-key", qk), ("value-output", vo)] {
            if parts.len() != self.kv_heads || parts.iter().any(|t| t.len() != self.head_dim) {
                return Err(bad(format!(
                    "{name} dimensions need {} permutations of length {} (one per key-value head), got lengths {:?}",
                    self.kv_heads,
                    self.head_dim,
                    parts.iter().map(Permutation::len).collect::<Vec<_>>()
                )));
            }
        }
        let (d, hd, r) = (self.head_dim, self.heads * self.head_dim, self.group_size());
        let mut idx = Vec::with_capacity(self.units());
        for (s, parts) in [qk, vo].into_iter().enumerate() {
            for (h, &src) in heads.as_slice().iter().enumerate() {
                let within = &parts[h / r];
                idx.extend(within.as_slice().iter().map(|&i| s * hd + src * d + i));
            }
        }
        let p = Permutation::new(idx)?;
        self.check(&p)?;
        Ok(p)
    }

    /// Splits a group permutation into its parts, or says which constraint it breaks:
    /// a half or head block not kept together, different head permutations in the two
    /// halves, query heads of one key-value head sent to different ones or given
    /// different within-head permutations, a rotary dimension moved.
    pub fn decompose(&self, p: &Permutation) -> Result<HeadPermutation> {
        if p.len() != self.units() {
            return Err(bad(format!(
                "attention permutation has length {}, the layout ({} heads, {} key-value heads, head_dim {}) has {} units",
                p.len(),
                self.heads,
                self.kv_heads,
                self.head_dim,
                self.units()
            )));
        }
        let (d, hd, r) = (self.head_dim, self.heads * self.head_dim, self.group_size());
        let half_name = ["query-key", "value-output"];
        let mut blocks = [Vec::new(), Vec::new()];
        let mut within: [Vec<Vec<usize>>; 2] = [Vec::new(), Vec::new()];
        for s in 0..2 {
            for h in 0..self.heads {
                let seg = &p.as_slice()[s * hd + h * d..s * hd + (h + 1) * d];
                let first = seg[0];
                if !(s * hd..(s + 1) * hd).contains(&first) {
                    return Err(bad(format!(
                        "{} dimension 0 of head {h} is taken from the other half (unit {first}): the query-key and value-output halves must stay apart",
                        half_name[s]
                    )));
                }
                let block = (first - s * hd) / d;
                let mut t = Vec::with_capacity(d);
                for (i, &u) in seg.iter().enumerate() {
                    if u < s * hd || (u - s * hd) / d != block {
                        return Err(bad(format!(
                            "{} dimensions of head {h} come from different heads (dimension 0 from head {block}, dimension {i} from unit {u}): heads move as whole blocks",
                            half_name[s]
                        )));
                    }
                    t.push((u - s * hd) % d);
                }
                blocks[s].push(block);
                within[s].push(t);
            }
        }
        if blocks[0] != blocks[1] {
            return Err(bad(format!(
                "the query-key half moves heads as {:?} but the value-output half as {:?}: a head's Q, K, V and O must move together",
                blocks[0], blocks[1]
            )));
        }
        for g in 0..self.kv_heads {
            let members = g * r..(g + 1) * r;
            let kv: Vec<usize> = blocks[0][members.clone()].iter().map(|b| b / r).collect();
            if kv.iter().any(|&k| k != kv[0]) {
                return Err(bad(format!(
                    "query heads {members:?} share key-value head {g} but take their heads from key-value heads {kv:?}: query heads move with their key-value head"
                )));
            }
            for s in 0..2 {
                if let Some(h) = members.clone().find(|&h| within[s][h] != within[s][g * r]) {
                    return Err(bad(format!(
                        "query heads {} and {h} share key-value head {g} but have different {} within-head permutations ({:?} vs {:?})",
                        g * r,
                        half_name[s],
                        within[s][g * r],
                        within[s][h]
                    )));
                }
            }
        }
        for (h, t) in within[0].iter().enumerate() {
            if let Some(i) = (0..self.rotary_dim).find(|&i| t[i] != i) {
                return Err(bad(format!(
                    "head {h} moves rotary query-key dimension {} to position {i}: rotary embeddings rotate each dimension pair by its own frequency, so the first {} (rotary) dimensions of Q and K must stay in place",
                    t[i], self.rotary_dim
                )));
            }
        }
        let to_perms = |w: &[Vec<usize>]| -> Result<Vec<Permutation>> {
            (0..self.kv_heads)
                .map(|g| Permutation::new(w[g * r].clone()))
                .collect()
        };
        Ok(HeadPermutation {
            heads: Permutation::new(blocks[0].clone())?,
            qk: to_perms(&within[0])?,
            vo: to_perms(&within[1])?,
        })
    }

    /// Whether `p` is structured ([`decompose`](Self::decompose)'s checks).
    pub fn check(&self, p: &Permutation) -> Result<()> {
        self.decompose(p).map(|_| ())
    }

    /// A uniformly random structured permutation: key-value heads, query heads inside
    /// each group, and within-head dimensions (non-rotary query-key ones, all
    /// value-output ones) per key-value head.
    pub(crate) fn random_with(&self, rng: &mut ChaCha8Rng) -> Permutation {
        let r = self.group_size();
        let kv = Permutation::random_with(self.kv_heads, rng);
        let mut heads = Vec::with_capacity(self.heads);
        for &g in kv.as_slice() {
            let inner = Permutation::random_with(r, rng);
            heads.extend(inner.as_slice().iter().map(|&j| g * r + j));
        }
        let mut within = |rotary: usize| -> Vec<Permutation> {
            (0..self.kv_heads)
                .map(|_| {
                    let mut t: Vec<usize> = (0..self.head_dim).collect();
                    t[rotary..].shuffle(rng);
                    Permutation { idx: t }
                })
                .collect()
        };
        let qk = within(self.rotary_dim);
        let vo = within(0);
        let (d, hd) = (self.head_dim, self.heads * self.head_dim);
        let mut idx = Vec::with_capacity(self.units());
        for (s, parts) in [&qk, &vo].into_iter().enumerate() {
            for (h, &src) in heads.iter().enumerate() {
                idx.extend(
                    parts[h / r]
                        .as_slice()
                        .iter()
                        .map(|&i| s * hd + src * d + i),
                );
            }
        }
        Permutation { idx }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn random_permutations_are_structured_and_closed() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for layout in [
            HeadLayout::new(4, 2, 4).unwrap(),
            HeadLayout::new(6, 6, 4)
                .unwrap()
                .with_rotary_dim(2)
                .unwrap(),
            HeadLayout::new(8, 1, 2)
                .unwrap()
                .with_rotary_dim(2)
                .unwrap(),
        ] {
            for _ in 0..20 {
                let p = layout.random_with(&mut rng);
                let q = layout.random_with(&mut rng);
                layout.check(&p).unwrap();
                layout.check(&p.inverse()).unwrap();
                layout.check(&p.then(&q).unwrap()).unwrap();
                let parts = layout.decompose(&p).unwrap();
                assert_eq!(
                    layout.compose(&parts.heads, &parts.qk, &parts.vo).unwrap(),
                    p
                );
                // Key indices compose like the permutation itself.
                let pq = p.then(&q).unwrap();
                let k = |x: &Permutation| {
                    Permutation::new(layout.slot_indices(HeadSlot::Key, x)).unwrap()
                };
                assert_eq!(k(&pq), k(&p).then(&k(&q)).unwrap());
            }
        }
    }

    #[test]
    fn broken_constraints_are_named() {
        let l = HeadLayout::new(2, 2, 4)
            .unwrap()
            .with_rotary_dim(4)
            .unwrap();
        let id = Permutation::identity(4);
        let swap = Permutation::new(vec![2, 3, 0, 1]).unwrap(); // swaps rotary pairs' halves
        let e = l
            .compose(
                &Permutation::identity(2),
                &[swap.clone(), id.clone()],
                &[id.clone(), id.clone()],
            )
            .unwrap_err();
        assert!(e.to_string().contains("rotary"), "{e}");
        // Value-output dims are free under RoPE.
        assert!(
            l.compose(
                &Permutation::identity(2),
                &[id.clone(), id.clone()],
                &[swap, id.clone()]
            )
            .is_ok()
        );
        // Heads moved differently in the two halves.
        let mut idx: Vec<usize> = (0..16).collect();
        idx.swap(0, 4);
        idx[..8].rotate_left(0);
        let mixed: Vec<usize> = (4..8).chain(0..4).chain(8..16).collect();
        let e = l.check(&Permutation::new(mixed).unwrap()).unwrap_err();
        assert!(e.to_string().contains("move together"), "{e}");
        let e = l.check(&Permutation::new(idx).unwrap()).unwrap_err();
        assert!(e.to_string().contains("whole blocks"), "{e}");
        assert!(l.check(&Permutation::identity(15)).is_err());
    }
}
