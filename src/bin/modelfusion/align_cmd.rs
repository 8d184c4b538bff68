//! `modelfusion spec`, `permute` and `align`: permutation specs and weight matching on
//! checkpoints.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use modelfusion::align::{Aligner, WeightMatching};
use modelfusion::io::{Checkpoint, copy_side_files, infer_checkpoint_spec, load, write_permuted};
use modelfusion::perm::{PermutationSet, PermutationSpec};
use modelfusion::{Result, StateDictF32};

/// Where a spec comes from.
#[derive(Args, Debug, Clone)]
pub struct SpecSource {
    /// `auto` (inferred from tensor names, shapes and config.json) or a spec file (JSON).
    #[arg(long, default_value = "auto")]
    spec: String,
}

impl SpecSource {
    fn resolve(&self, ck: &Checkpoint) -> Result<(PermutationSpec, String)> {
        if self.spec == "auto" {
            let found = infer_checkpoint_spec(ck)?;
            Ok((found.spec, format!("{} ({})", found.family, found.reason)))
        } else {
            let spec = PermutationSpec::load(&self.spec)?;
            Ok((spec, format!("spec file {}", self.spec)))
        }
    }
}

#[derive(Args, Debug)]
pub struct SpecArgs {
    /// A .safetensors file or a checkpoint directory.
    ckpt: PathBuf,
    #[command(flatten)]
    source: SpecSource,
    /// Write the spec as a spec file (JSON) to FILE.
    #[arg(long)]
    write: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct PermuteArgs {
    /// A .safetensors file or a checkpoint directory.
    ckpt: PathBuf,
    /// Seed of the random permutations.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output: a directory, or a file ending in .safetensors.
    #[arg(short, long)]
    out: PathBuf,
    #[command(flatten)]
    source: SpecSource,
}

#[derive(Args, Debug)]
pub struct AlignArgs {
    /// The reference checkpoint (its basis is kept).
    reference: PathBuf,
    /// The checkpoint to align into the reference's basis.
    other: PathBuf,
    /// Output: a directory, or a file ending in .safetensors.
    #[arg(short, long)]
    out: PathBuf,
    #[command(flatten)]
    source: SpecSource,
    /// Seed of weight matching's group order (and of random restarts).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Starting points of the descent (the identity, then random ones); the best wins.
    #[arg(long, default_value_t = 1)]
    restarts: usize,
    /// Largest output shard, in bytes; default: one file.
    #[arg(long)]
    max_shard_size: Option<u64>,
    /// Never draw a progress bar.
    #[arg(long)]
    no_progress: bool,
}

fn bar(len: u64, hidden: bool) -> ProgressBar {
    let b = if !hidden && std::io::stderr().is_terminal() {
        ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    b.set_style(
        ProgressStyle::with_template("{spinner} {bar:40} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    b
}

pub fn run_spec(a: SpecArgs) -> Result<()> {
    let ck = Checkpoint::open(&a.ckpt)?;
    let (spec, origin) = a.source.resolve(&ck)?;
    let model: StateDictF32 = load(&a.ckpt)?;
    let report = spec.check(&model)?;
    println!("family: {origin}");
    println!("{} groups:", spec.num_groups());
    for (g, members) in spec.groups() {
        println!(
            "  {g}\t{} units\t{} tensor axes",
            report.sizes.get(g).copied().unwrap_or(0),
            members.len()
        );
    }
    let inv: Vec<&str> = spec.invariant_params().collect();
    if !inv.is_empty() {
        println!("invariant: {}", inv.join(", "));
    }
    println!(
        "passive (permuted, not matched): {}",
        spec.passive_params().count()
    );
    if report.is_sound() {
        println!("check: sound");
    } else {
        println!("check: {} issue(s)", report.issues.len());
        for i in &report.issues {
            println!("  {i}");
        }
    }
    if let Some(path) = &a.write {
        let family = origin.split(' ').next();
        std::fs::write(path, spec.to_json_with_family(family)?).map_err(|e| {
            modelfusion::Error::Io {
                path: path.clone(),
                source: e,
            }
        })?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Writes `ck` permuted by `perms` to `out` with its side files.
fn write_out(
    ck: &Checkpoint,
    src: &Path,
    spec: &PermutationSpec,
    perms: &PermutationSet,
    out: &Path,
    max_shard_size: Option<u64>,
    hidden: bool,
) -> Result<()> {
    let b = bar(ck.len() as u64, hidden);
    let summary = write_permuted(ck, spec, perms, out, max_shard_size, |k, _, name| {
        b.set_position(k as u64 + 1);
        b.set_message(name.to_string());
    })?;
    b.finish_and_clear();
    let copied = copy_side_files(src, out, None)?;
    eprintln!(
        "wrote {} tensors ({} permuted, every one in its own dtype) to {}{}",
        summary.tensors,
        summary.permuted,
        out.display(),
        if copied.is_empty() {
            String::new()
        } else {
            format!(" (copied {})", copied.join(", "))
        }
    );
    Ok(())
}

pub fn run_permute(a: PermuteArgs) -> Result<()> {
    let ck = Checkpoint::open(&a.ckpt)?;
    let (spec, origin) = a.source.resolve(&ck)?;
    let model: StateDictF32 = load(&a.ckpt)?;
    spec.require_sound(&model)?;
    let perms = PermutationSet::random(&spec, &model, a.seed)?;
    eprintln!(
        "spec: {origin}; {} groups permuted at random (seed {})",
        spec.num_groups(),
        a.seed
    );
    write_out(&ck, &a.ckpt, &spec, &perms, &a.out, None, false)
}

/// Weight matching settings shared by `align` and the `align:` section of merge configs.
#[derive(Clone, Debug)]
pub struct MatchSettings {
    /// Spec source: `auto` or a spec file.
    pub spec: String,
    /// Seed of the group order.
    pub seed: u64,
    /// Starting points.
    pub restarts: usize,
}

/// Weight-matches `other` into `reference`'s basis and writes it to `out` (with its side
/// files), each tensor in its own dtype.
pub fn align_into(
    reference: &Path,
    other: &Path,
    out: &Path,
    settings: &MatchSettings,
    max_shard_size: Option<u64>,
    hidden: bool,
) -> Result<()> {
    let start = Instant::now();
    let ref_ck = Checkpoint::open(reference)?;
    let other_ck = Checkpoint::open(other)?;
    let source = SpecSource {
        spec: settings.spec.clone(),
    };
    let (spec, origin) = source.resolve(&ref_ck)?;
    let a: StateDictF32 = load(reference)?;
    let b: StateDictF32 = load(other)?;
    eprintln!(
        "aligning {} to {}; spec: {origin}; weight matching {} groups (seed {}, {} start(s))",
        other.display(),
        reference.display(),
        spec.num_groups(),
        settings.seed,
        settings.restarts
    );
    let spinner = bar(0, hidden);
    spinner.set_message("weight matching");
    spinner.enable_steady_tick(std::time::Duration::from_millis(200));
    let alignment = WeightMatching::new(settings.seed)
        .with_restarts(settings.restarts)?
        .align(&a, &b, &spec)?;
    spinner.finish_and_clear();
    let perms = alignment.permutations().ok_or_else(|| {
        modelfusion::Error::invalid("alignment", "weight matching gave no permutations")
    })?;
    let stats = alignment.stats();
    let moved: usize = perms.iter().map(|(_, p)| p.num_moved()).sum();
    let units: usize = perms.iter().map(|(_, p)| p.len()).sum();
    eprintln!(
        "matched in {:.2} s: {} sweep(s){}, objective {:.6e} -> {:.6e}, {moved} of {units} units moved",
        start.elapsed().as_secs_f64(),
        stats.sweeps,
        if stats.converged {
            ", converged"
        } else {
            " (cap reached)"
        },
        stats.objective.first().copied().unwrap_or(0.0),
        stats.objective.last().copied().unwrap_or(0.0),
    );
    write_out(&other_ck, other, &spec, &perms, out, max_shard_size, hidden)
}

pub fn run_align(a: AlignArgs) -> Result<()> {
    let settings = MatchSettings {
        spec: a.source.spec.clone(),
        seed: a.seed,
        restarts: a.restarts,
    };
    align_into(
        &a.reference,
        &a.other,
        &a.out,
        &settings,
        a.max_shard_size,
        a.no_progress,
    )
}
