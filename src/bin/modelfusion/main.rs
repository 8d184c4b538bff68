//! `modelfusion`: merge checkpoints from a mergekit-style YAML config, out of core; find,
//! check and apply permutation specs; align checkpoints by weight matching.
//!
//! ```text
//! modelfusion merge config.yml ./merged [--seed 0] [--max-shard-size 5G] [--dry-run]
//! modelfusion inspect ./model
//! modelfusion spec ./model [--spec auto|FILE] [--write spec.json]
//! modelfusion permute ./model --seed 1 -o ./permuted
//! modelfusion align ./reference ./other -o ./aligned [--seed 0] [--restarts 4]
//! ```

mod align_cmd;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use modelfusion::Result;
use modelfusion::config::{Config, RunOptions};
use modelfusion::io::Checkpoint;
use modelfusion::progress::{Progress, from_fn};

#[derive(Parser, Debug)]
#[command(
    name = "modelfusion",
    version,
    about = "Merge model checkpoints (safetensors) out of core, from mergekit-style YAML configs; align them modulo permutation symmetry"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug)]
struct MergeArgs {
    /// The merge config (mergekit format: merge_method, base_model, models, parameters, dtype, out_dtype).
    config: PathBuf,
    /// Output directory (created if needed; must not hold an input).
    out: PathBuf,
    /// Seed for random methods (DARE, DELLA); the same seed gives the same output.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Largest output shard, e.g. 5G, 500M, or bytes; default: one file.
    #[arg(long, value_parser = parse_size)]
    max_shard_size: Option<u64>,
    /// Elements per chunk for elementwise methods (linear, task arithmetic).
    #[arg(long, default_value_t = 1 << 18)]
    chunk_elems: usize,
    /// Check the config and the inputs' headers, print the plan, write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Never draw a progress bar (it is hidden anyway when stderr is not a terminal).
    #[arg(long)]
    no_progress: bool,
    /// Do not copy config.json and tokenizer files from the base (or first) model.
    #[arg(long)]
    no_copy_files: bool,
    /// Write merged tensors even when they hold NaN or infinite values (refused by default).
    #[arg(long)]
    allow_nonfinite: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Merge the checkpoints a YAML config names into OUT (a directory).
    Merge(MergeArgs),
    /// List the tensors of a checkpoint (file or directory): name, dtype, shape.
    Inspect {
        /// A .safetensors file or a checkpoint directory.
        path: PathBuf,
    },
    /// Detect the architecture of a checkpoint (or read a spec file), print its
    /// permutation groups and check the spec against the checkpoint's shapes.
    Spec(align_cmd::SpecArgs),
    /// Write a randomly permuted, function-identical copy of a checkpoint (to test specs).
    Permute(align_cmd::PermuteArgs),
    /// Weight-match OTHER into REFERENCE's basis and write it, each tensor in its own dtype.
    Align(align_cmd::AlignArgs),
}

fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim().to_ascii_uppercase();
    let t = t
        .strip_suffix("IB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(&t);
    let (num, mult) = match t.chars().last() {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        Some('T') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let x: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a size like 5G, 500M or 1000000"))?;
    if !(x > 0.0 && x.is_finite()) {
        return Err(format!("size `{s}` must be positive"));
    }
    Ok((x * mult as f64) as u64)
}

fn run_merge(a: MergeArgs) -> Result<()> {
    let mut config = Config::from_file(&a.config)?;
    config.seed = a.seed;
    let plan = config.plan()?;
    let out_dtype = plan.out_dtype();
    let out_bytes = plan.out_bytes();
    eprintln!(
        "{} merge of {} checkpoint(s){}: {} tensors, {:.3} GB out as {} (compute {}, seed {}){}",
        config.method.name,
        plan.inputs().len(),
        if config.has_base {
            " (first is the base)"
        } else {
            ""
        },
        plan.tensors().len(),
        out_bytes as f64 / 1e9,
        out_dtype,
        if config.compute_f64 { "f64" } else { "f32" },
        config.seed,
        match &config.align {
            Some(al) => format!(
                "; every model weight-matched to the first input first (spec {}, seed {}, {} start(s))",
                al.spec, al.seed, al.restarts
            ),
            None => String::new(),
        },
    );
    if a.dry_run {
        for (i, c) in plan.inputs().iter().enumerate() {
            eprintln!("  input {i}: {} ({} tensors)", c.path().display(), c.len());
        }
        return Ok(());
    }
    let mut options = RunOptions::new()
        .with_chunk_elems(a.chunk_elems)?
        .with_copy_files(!a.no_copy_files)
        .with_allow_nonfinite(a.allow_nonfinite);
    if let Some(bytes) = a.max_shard_size {
        options = options.with_max_shard_size(bytes)?;
    }
    let bar = if !a.no_progress && std::io::stderr().is_terminal() {
        ProgressBar::with_draw_target(Some(out_bytes), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let start = Instant::now();
    let summary = plan.run(
        &a.out,
        &options,
        from_fn(|p| match *p {
            Progress::Tensor {
                index,
                total,
                name,
                bytes_done,
                ..
            } => {
                bar.set_position(bytes_done);
                bar.set_message(format!("{}/{total} {name}", index + 1));
            }
            Progress::Stage { what, .. } => bar.set_message(what.to_string()),
            Progress::Sweep {
                sweep, objective, ..
            } => bar.set_message(format!(
                "weight matching: sweep {}, objective {objective:.6e}",
                sweep + 1
            )),
            _ => {}
        }),
    )?;
    bar.finish_and_clear();
    for al in &summary.aligned {
        eprintln!(
            "aligned input {} ({}; spec: {}): {}",
            al.input,
            config.inputs[al.input].display(),
            al.spec_origin,
            align_cmd::describe_match(&al.stats, al.units)
        );
    }
    if let Some(w) = summary.overflow_warning() {
        eprintln!("{w}");
    }
    let m = &summary.merge;
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "merged {} tensors in {secs:.2} s: {:.3} GB read, {:.3} GB written ({:.2} GB/s) -> {}{}",
        m.tensors,
        m.bytes_read as f64 / 1e9,
        m.bytes_written as f64 / 1e9,
        (m.bytes_read + m.bytes_written) as f64 / 1e9 / secs.max(1e-9),
        a.out.display(),
        if summary.copied.is_empty() {
            String::new()
        } else {
            format!(" (copied {})", summary.copied.join(", "))
        }
    );
    if let Some(first) = summary.dropped.first() {
        eprintln!(
            "left out {} tensor(s) outside the architecture's layout, as mergekit does (e.g. `{}`)",
            summary.dropped.len(),
            modelfusion::error::Escaped(first)
        );
    }
    if !m.carried.is_empty() {
        eprintln!(
            "carried {} non-float tensor(s) unchanged from {} ({} differ among the inputs{})",
            m.carried.len(),
            config.inputs[0].display(),
            m.carried_differing.len(),
            m.carried_differing
                .first()
                .map(|n| format!(", e.g. `{n}`"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

fn run_inspect(path: &Path) -> Result<()> {
    let ck = Checkpoint::open(path)?;
    let mut total = 0usize;
    for t in ck.tensors() {
        println!("{}\t{}\t{:?}", t.name(), t.dtype(), t.shape());
        total += t.byte_len();
    }
    eprintln!(
        "{} tensors in {} file(s), {:.3} GB",
        ck.len(),
        ck.files().count(),
        total as f64 / 1e9
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Merge(args) => run_merge(args),
        Command::Inspect { path } => run_inspect(&path),
        Command::Spec(args) => align_cmd::run_spec(args),
        Command::Permute(args) => align_cmd::run_permute(args),
        Command::Align(args) => align_cmd::run_align(args),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("5G"), Ok(5 << 30));
        assert_eq!(parse_size("500MB"), Ok(500 << 20));
        assert_eq!(parse_size("2KiB"), Ok(2048));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("-1G").is_err());
    }
}
