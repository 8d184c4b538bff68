//! `modelfusion spec`, `permute` and `align`: permutation specs and weight matching on
//! checkpoints.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use modelfusion::align::AlignStats;
use modelfusion::config::AlignSettings;
use modelfusion::io::{Checkpoint, SpecSource, copy_side_files, load, write_permuted};
use modelfusion::perm::{PermutationSet, PermutationSpec};
use modelfusion::progress::{Progress, from_fn};
use modelfusion::{Result, StateDictF32};

/// Where a spec comes from.
#[derive(Args, Debug, Clone)]
pub struct SpecArg {
    /// `auto` (inferred from tensor names, shapes and config.json) or a spec file (JSON).
    #[arg(long, default_value = "auto")]
    spec: SpecSource,
}

#[derive(Args, Debug)]
pub struct SpecArgs {
    /// A .safetensors file or a checkpoint directory.
    ckpt: PathBuf,
    #[command(flatten)]
    source: SpecArg,
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
    source: SpecArg,
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
    source: SpecArg,
    /// Seed of weight matching's group order (and of random restarts).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Starting points of the descent (the identity, then random ones); the best wins.
    #[arg(long, default_value_t = 1)]
    restarts: usize,
    /// At most this many sweeps over the groups.
    #[arg(long, default_value_t = 100)]
    max_iter: usize,
    /// Memory for group cost matrices kept between visits, in MiB (a group of n units
    /// takes n * n * 8 bytes; groups that do not fit are rebuilt at each visit).
    #[arg(long, default_value_t = (modelfusion::config::ALIGN_COST_CACHE >> 20) as u64)]
    cost_cache_mib: u64,
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
    let (spec, origin) = a.source.spec.resolve(&ck)?;
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
    let summary = write_permuted(
        ck,
        spec,
        perms,
        out,
        max_shard_size,
        from_fn(|p| {
            if let Progress::Tensor { index, name, .. } = *p {
                b.set_position(index as u64 + 1);
                b.set_message(name.to_string());
            }
        }),
    )?;
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
    let (spec, origin) = a.source.spec.resolve(&ck)?;
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

/// One line on a weight matching: sweeps, convergence, objective, units moved.
pub fn describe_match(stats: &AlignStats, units: usize) -> String {
    let moved: usize = stats.moved.values().sum();
    format!(
        "{} sweep(s){}, objective {:.6e} -> {:.6e}, {moved} of {units} units moved",
        stats.sweeps,
        if stats.converged {
            ", converged"
        } else {
            " (cap reached)"
        },
        stats.objective.first().copied().unwrap_or(0.0),
        stats.objective.last().copied().unwrap_or(0.0),
    )
}

pub fn run_align(a: AlignArgs) -> Result<()> {
    let began = Instant::now();
    let settings = AlignSettings {
        spec: a.source.spec.clone(),
        seed: a.seed,
        restarts: a.restarts,
    };
    let ref_ck = Checkpoint::open(&a.reference)?;
    let other_ck = Checkpoint::open(&a.other)?;
    let (spec, origin) = settings.spec.resolve(&ref_ck)?;
    let cache = usize::try_from(a.cost_cache_mib.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
    let wm = settings
        .weight_matching()?
        .with_max_iter(a.max_iter)?
        .with_cost_cache(cache);
    eprintln!(
        "aligning {} to {} out of core; spec: {origin}; weight matching {} groups (seed {}, {} start(s), at most {} sweeps, {} MiB of kept costs)",
        a.other.display(),
        a.reference.display(),
        spec.num_groups(),
        settings.seed,
        settings.restarts,
        a.max_iter,
        a.cost_cache_mib
    );
    let spinner = bar(spec.num_groups() as u64, a.no_progress);
    spinner.set_message("weight matching");
    spinner.enable_steady_tick(std::time::Duration::from_millis(200));
    let mut last = String::from("objective not yet known");
    let alignment = wm.align_checkpoints(
        &ref_ck,
        &other_ck,
        &spec,
        &mut from_fn(|p| match *p {
            Progress::Group {
                start,
                sweep,
                index,
                name,
                units,
                ..
            } => {
                spinner.set_position(index as u64 + 1);
                spinner.set_message(format!(
                    "start {}, sweep {}: {name} ({units} units); {last}",
                    start + 1,
                    sweep + 1
                ));
            }
            Progress::Sweep {
                start,
                sweep,
                objective,
                changed,
            } => {
                last = format!("after sweep {}: objective {objective:.6e}, {changed} group(s) changed", sweep + 1);
                if spinner.is_hidden() {
                    eprintln!(
                        "start {}, sweep {} done at {:.1} s: objective {objective:.6e}, {changed} group(s) changed",
                        start + 1,
                        sweep + 1,
                        began.elapsed().as_secs_f64()
                    );
                }
            }
            _ => {}
        }),
    )?;
    let (perms, stats) = (
        alignment.permutations().ok_or_else(|| {
            modelfusion::Error::invalid("align", "weight matching gave no permutations")
        })?,
        alignment.stats().clone(),
    );
    spinner.finish_and_clear();
    let units: usize = perms.iter().map(|(_, p)| p.len()).sum();
    eprintln!(
        "matched in {:.2} s: {}",
        began.elapsed().as_secs_f64(),
        describe_match(&stats, units)
    );
    write_out(
        &other_ck,
        &a.other,
        &spec,
        &perms,
        &a.out,
        a.max_shard_size,
        a.no_progress,
    )
}
