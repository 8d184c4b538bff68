//! Activations computed elsewhere (PyTorch forward hooks, say), read back from
//! safetensors files: one file per model and batch, one tensor per key.

use std::path::PathBuf;

use ndarray::{Array2, Ix2, Ix4};

use super::reader::Checkpoint;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::objective::{Activations, Elem, Features};
use crate::tensor::{Scalar, Tensor};

/// An [`Activations`] source backed by files: for each registered model, one safetensors
/// file per batch whose tensors are that batch's features, keyed by permutation group
/// (activation matching, REPAIR's endpoint statistics) or by weight name (RegMean). A
/// tensor is `(samples, features)`, or `(N, C, H, W)` for a convolution's channels
/// (then every spatial position is a sample: it becomes `(N * H * W, C)`).
///
/// The source recognises which model it is asked about by content: a model is
/// registered together with its files, and a later call with a model equal to it
/// (bit for bit) reads those files. Asking about any other model is an error, so a
/// source of saved features cannot evaluate a model it has never seen (such as an
/// interpolated one; REPAIR's correction of a merged model needs a live forward pass).
///
/// Writing the files from PyTorch:
///
/// ```text
/// feats = {}                       # group name -> tensor, via forward hooks
/// for i, (x, _) in enumerate(loader):
///     model(x)
///     safetensors.torch.save_file({k: v.contiguous() for k, v in feats.items()},
///                                 f"feats_a/batch{i:04}.safetensors")
/// ```
///
/// ```
/// use modelfusion::io::{save_file, Dtype, SavedActivations};
/// use modelfusion::{Activations, StateDict, StateDictF32};
/// use ndarray::{arr1, Array2, ArrayD};
///
/// let dir = std::env::temp_dir().join("modelfusion-doc-saved-acts");
/// std::fs::create_dir_all(&dir).unwrap();
/// let model = StateDict::from_pairs([("w", arr1(&[1.0f32, 2.0]).into_dyn())])?;
/// let feats = StateDict::from_pairs([("hidden.0", Array2::<f32>::ones((4, 3)).into_dyn())])?;
/// save_file(&feats, dir.join("a0.safetensors"), Dtype::F32)?;
/// let source = SavedActivations::new().with_model(&model, [dir.join("a0.safetensors")])?;
/// assert_eq!(Activations::<StateDictF32>::num_batches(&source), 1);
/// assert_eq!(source.activations(&model, 0)?["hidden.0"].dim(), (4, 3));
/// let other = StateDict::from_pairs([("w", arr1(&[1.0f32, 3.0]).into_dyn())])?;
/// assert!(source.activations(&other, 0).is_err()); // never registered
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct SavedActivations {
    models: Vec<(u64, Vec<PathBuf>)>,
}

/// A content digest of a model's parameters (names, shapes and element bits; FNV-1a).
fn digest<M: Model>(model: &M) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h = (h ^ b as u64).wrapping_mul(PRIME);
        }
    };
    for name in model.names() {
        eat(name.as_bytes());
        if let Some(t) = model.get(name) {
            for &d in t.shape() {
                eat(&d.to_le_bytes());
            }
            for x in t.view().iter() {
                eat(&x.to_f64_lossless().to_bits().to_le_bytes());
            }
        }
    }
    h
}

impl SavedActivations {
    /// A source with no model registered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `model` with its batch files (in batch order). Every model must have
    /// the same number of batches; the files must exist.
    pub fn with_model<M: Model>(
        mut self,
        model: &M,
        batches: impl IntoIterator<Item = PathBuf>,
    ) -> Result<Self> {
        let files: Vec<PathBuf> = batches.into_iter().collect();
        if files.is_empty() {
            return Err(Error::empty("the list of feature files"));
        }
        if let Some(f) = files.iter().find(|f| !f.is_file()) {
            return Err(Error::invalid(
                "batches",
                format!("feature file {} is not a regular file", f.display()),
            ));
        }
        if let Some((_, first)) = self.models.first()
            && first.len() != files.len()
        {
            return Err(Error::invalid(
                "batches",
                format!(
                    "{} feature files for this model, {} for the first one",
                    files.len(),
                    first.len()
                ),
            ));
        }
        self.models.push((digest(model), files));
        Ok(self)
    }
}

impl<M: Model> Activations<M> for SavedActivations {
    fn num_batches(&self) -> usize {
        self.models.first().map_or(0, |(_, f)| f.len())
    }

    fn activations(&self, model: &M, batch: usize) -> Result<Features<Elem<M>>> {
        let d = digest(model);
        let (_, files) = self.models.iter().find(|(h, _)| *h == d).ok_or_else(|| {
            Error::Objective(
                "saved activations: the model asked about is none of the registered ones (features cannot be read for a model that was never saved)".into(),
            )
        })?;
        let path = files.get(batch).ok_or_else(|| {
            Error::invalid(
                "batch",
                format!("batch {batch} of {} saved batches", files.len()),
            )
        })?;
        let ck = Checkpoint::open(path)?;
        let mut out = Features::new();
        for t in ck.tensors() {
            let a = ck.read::<f64>(t.name())?;
            let m: Array2<f64> = match a.ndim() {
                2 => a
                    .into_dimensionality::<Ix2>()
                    .map_err(|e| Error::invalid("features", e.to_string()))?,
                4 => {
                    let a = a
                        .into_dimensionality::<Ix4>()
                        .map_err(|e| Error::invalid("features", e.to_string()))?;
                    let (n, c, h, w) = a.dim();
                    // (N, C, H, W) -> (N, H, W, C) -> (N*H*W, C)
                    let moved = a.permuted_axes([0, 2, 3, 1]);
                    Array2::from_shape_vec((n * h * w, c), moved.iter().copied().collect())
                        .map_err(|e| Error::invalid("features", e.to_string()))?
                }
                _ => {
                    return Err(Error::shape(
                        format!(
                            "saved features `{}` of {} (expected (samples, features) or (N, C, H, W))",
                            t.name(),
                            path.display()
                        ),
                        &[0, 0],
                        t.shape(),
                    ));
                }
            };
            out.insert(t.name().to_string(), m.mapv(Elem::<M>::from_f64_lossy));
        }
        Ok(out)
    }
}
