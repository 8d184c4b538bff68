//! Weight matching of two checkpoints out of core: the matching reads each parameter's
//! rows from the files when it needs them.

use rayon::prelude::*;

use super::{Checkpoint, check_compatible};
use crate::align::weight::{BLOCK, Layout, Lead, Side, Source};
use crate::align::{Alignment, WeightMatching, context};
use crate::error::{Error, Result};
use crate::perm::{PermutationSpec, Shapes};
use crate::progress::Observer;

/// The float tensors of a checkpoint's header, as a model's shapes.
struct FloatShapes<'c>(&'c Checkpoint);

impl Shapes for FloatShapes<'_> {
    fn param_names(&self) -> Vec<&str> {
        floats(self.0).map(|(n, _)| n).collect()
    }
    fn shape_of(&self, name: &str) -> Option<&[usize]> {
        self.0
            .info(name)
            .filter(|t| t.dtype().is_float())
            .map(|t| t.shape())
    }
}

/// Names and shapes of `ck`'s float tensors, in its order (as [`load`](super::load)
/// gives them).
fn floats(ck: &Checkpoint) -> impl Iterator<Item = (&str, &[usize])> {
    ck.tensors()
        .iter()
        .filter(|t| t.dtype().is_float())
        .map(|t| (t.name(), t.shape()))
}

/// The two checkpoints, read in `f32` with positioned reads, one request at a time.
struct CheckpointSource<'c> {
    ck: [&'c Checkpoint; 2],
    /// Tensor name of each parameter of the layout.
    names: Vec<String>,
}

impl CheckpointSource<'_> {
    /// Reads rows `list` (in that order) of `name` into `buf`, one positioned read per
    /// run of consecutive rows, runs in parallel.
    fn read_rows(
        ck: &Checkpoint,
        name: &str,
        row: usize,
        list: &[usize],
        buf: &mut [f32],
    ) -> Result<()> {
        let mut runs = Vec::new();
        let mut rest = buf;
        let mut i = 0;
        while i < list.len() {
            let mut j = i + 1;
            while j < list.len() && list[j] == list[j - 1] + 1 {
                j += 1;
            }
            let (run, tail) = rest.split_at_mut((j - i) * row);
            runs.push((list[i] * row, run));
            rest = tail;
            i = j;
        }
        runs.into_par_iter()
            .try_for_each(|(start, out)| ck.read_into(name, start, out))
    }
}

impl Source<f32> for CheckpointSource<'_> {
    fn rows<'d, 'l>(
        &'d self,
        side: Side,
        param: usize,
        row: usize,
        lead: Lead<'l>,
        buf: &'d mut Vec<f32>,
    ) -> Result<(&'d [f32], Option<&'l [usize]>)> {
        let ck = match side {
            Side::Reference => self.ck[0],
            Side::Other => self.ck[1],
        };
        let name = &self.names[param];
        let info = ck.info(name).ok_or_else(|| Error::Spec {
            reason: format!("`{name}` is not in {}", ck.path().display()),
        })?;
        let total = info.numel();
        let sel = match lead {
            Lead::Range(r) => {
                buf.resize(r.len() * row, 0.0);
                ck.read_into(name, r.start * row, buf)?;
                None
            }
            Lead::List(l) if 2 * l.len() * row >= total => {
                // Half the rows or more: one read of the whole tensor, read through the
                // selection.
                buf.resize(total, 0.0);
                ck.read_into(name, 0, buf)?;
                Some(l)
            }
            Lead::List(l) => {
                buf.resize(l.len() * row, 0.0);
                Self::read_rows(ck, name, row, l, buf)?;
                None
            }
        };
        if buf.par_iter().any(|x| !x.is_finite()) {
            return Err(Error::NonFinite {
                what: format!("tensor `{name}` of {}", ck.path().display()),
            });
        }
        Ok((buf, sel))
    }

    fn parallel(&self) -> bool {
        false
    }
}

impl WeightMatching {
    /// Weight matching of two checkpoints (a `.safetensors` file or a sharded directory,
    /// F16, BF16, F32 or F64) out of core: the same algorithm and, for the same settings,
    /// the same permutations, sweeps and objective as [`align`](crate::align::Aligner)
    /// on both models loaded in `f32`, but each parameter's data is read from the files
    /// when a group needs it and converted to `f32` in blocks (a 32000 x 2048 embedding
    /// in 64 MB blocks of rows), so that neither model is ever held in memory. Memory is
    /// about one parameter's blocks of both models, the cost matrix of the group being
    /// solved (`n * n * 8` bytes, and half that for its product buffer and for the
    /// solver) and the costs kept between visits, which
    /// [`with_cost_cache`](Self::with_cost_cache) bounds (the default keeps them all:
    /// set a budget for LLM widths). A parameter whose own group permutes its axis 0 is
    /// read whole for that group's cost.
    ///
    /// The spec is checked against both headers before any data is read; a non-finite
    /// value is an error naming the tensor. Every group visit is reported
    /// ([`Progress::Group`](crate::progress::Progress::Group)), then every sweep
    /// ([`Progress::Sweep`](crate::progress::Progress::Sweep)); a stop returns
    /// [`Error::Cancelled`]. Write the aligned checkpoint with
    /// [`write_permuted`](super::write_permuted), which streams it.
    ///
    /// ```
    /// use modelfusion::align::{Aligner, WeightMatching};
    /// use modelfusion::io::{save, Checkpoint, Dtype, SaveOptions};
    /// use modelfusion::perm::{specs::{Architecture, MlpShapes}, PermutationSet};
    /// use modelfusion::progress::Silent;
    ///
    /// let arch = MlpShapes::new(&[6, 16, 16, 3])?;
    /// let spec = arch.spec();
    /// let a = arch.random_model(0);
    /// let planted = PermutationSet::random(&spec, &a, 4)?;
    /// let b = spec.apply(&planted, &a)?;
    /// let dir = std::env::temp_dir().join("modelfusion-doc-align-checkpoints");
    /// let opts = SaveOptions::new(Dtype::BF16).with_max_shard_size(1000); // sharded
    /// save(&a, dir.join("a"), &opts)?;
    /// save(&b, dir.join("b"), &opts)?;
    /// let (ca, cb) = (Checkpoint::open(dir.join("a"))?, Checkpoint::open(dir.join("b"))?);
    /// let wm = WeightMatching::new(0).with_cost_cache(0);
    /// let al = wm.align_checkpoints(&ca, &cb, &spec, &mut Silent)?;
    /// assert_eq!(al.permutations().unwrap(), planted.inverse());
    /// # std::fs::remove_dir_all(&dir).ok();
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn align_checkpoints(
        &self,
        reference: &Checkpoint,
        other: &Checkpoint,
        spec: &PermutationSpec,
        observer: &mut dyn Observer,
    ) -> Result<Alignment> {
        let sizes = spec
            .require_sound_shapes(&FloatShapes(reference))
            .map_err(|e| {
                context(
                    e,
                    &format!("the reference checkpoint {}", reference.path().display()),
                )
            })?;
        spec.require_sound_shapes(&FloatShapes(other))
            .map_err(|e| {
                context(
                    e,
                    &format!("the other checkpoint {}", other.path().display()),
                )
            })?;
        check_compatible(&[reference, other])?;
        let groups: Vec<String> = sizes.keys().cloned().collect();
        let layout = Layout::new(floats(reference), spec, &groups, BLOCK)?;
        let source = CheckpointSource {
            ck: [reference, other],
            names: layout.params.iter().map(|p| p.name.clone()).collect(),
        };
        self.align_source(layout, &source, &groups, &sizes, spec, observer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StateDictF32;
    use crate::align::Aligner;
    use crate::align::weight::InMemory;
    use crate::io::{Dtype, SaveOptions, load, save};
    use crate::perm::specs::{Architecture, MlpShapes};
    use crate::progress::Silent;

    #[test]
    fn blocked_reads_agree_in_memory_and_from_files() {
        // 300 x 300 weights are read in two blocks of rows when blocks are small: the
        // first term of hidden.0 (axis 1 of layers.1) is then summed block by block
        // with axis 0 read through hidden.1's permutation (row lists).
        let arch = MlpShapes::new(&[300, 300, 300, 7]).unwrap();
        let spec = arch.spec();
        let tmp = tempfile::tempdir().unwrap();
        let opts = SaveOptions::new(Dtype::BF16).with_max_shard_size(200_000);
        save(&arch.random_model(0), tmp.path().join("a"), &opts).unwrap();
        save(&arch.random_model(1), tmp.path().join("b"), &opts).unwrap();
        let ca = Checkpoint::open(tmp.path().join("a")).unwrap();
        let cb = Checkpoint::open(tmp.path().join("b")).unwrap();
        let la: StateDictF32 = load(tmp.path().join("a")).unwrap();
        let lb: StateDictF32 = load(tmp.path().join("b")).unwrap();
        let sizes = spec.require_sound(&la).unwrap();
        let groups: Vec<String> = sizes.keys().cloned().collect();
        let wm = WeightMatching::new(2).with_cost_cache(300 * 300 * 8);
        let run = |block: usize, disk: bool| {
            let layout = Layout::new(floats(&ca), &spec, &groups, block).unwrap();
            if disk {
                let names = layout.params.iter().map(|p| p.name.clone()).collect();
                let source = CheckpointSource {
                    ck: [&ca, &cb],
                    names,
                };
                wm.align_source(layout, &source, &groups, &sizes, &spec, &mut Silent)
            } else {
                let source = InMemory::new(&la, &lb, &layout).unwrap();
                wm.align_source(layout, &source, &groups, &sizes, &spec, &mut Silent)
            }
            .unwrap()
        };
        let whole = wm.align(&la, &lb, &spec).unwrap();
        assert_eq!(run(BLOCK, true).stats(), whole.stats());
        let (memory, disk) = (run(1000, false), run(1000, true));
        assert_eq!(memory.permutations(), disk.permutations());
        assert_eq!(memory.stats(), disk.stats());
        // Blocks only change the rounding of the costs' sums.
        assert_eq!(memory.permutations(), whole.permutations());
        for (x, y) in memory
            .stats()
            .objective
            .iter()
            .zip(&whole.stats().objective)
        {
            assert!((x - y).abs() <= 1e-9 * y.abs(), "{x} vs {y}");
        }
    }
}
