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
mod config;
mod methods;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use modelfusion::io::{
    Checkpoint, Chunking, Dtype, SaveOptions, StreamOptions, check_compatible, copy_side_files,
    merge_checkpoints,
};
use modelfusion::{Error, Result};

use config::Config;
use methods::ConfigMerger;

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

fn open_inputs(config: &Config) -> Result<Vec<Checkpoint>> {
    config
        .inputs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let role = if config.has_base && i == 0 {
                "base_model".to_string()
            } else {
                format!("models[{}]", i - usize::from(config.has_base))
            };
            if !p.exists() {
                return Err(Error::invalid(
                    role,
                    format!(
                        "`{}` does not exist (modelfusion reads local checkpoints only; download Hugging Face repos first)",
                        p.display()
                    ),
                ));
            }
            Checkpoint::open(p)
        })
        .collect()
}

fn run_merge(a: MergeArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.config).map_err(|e| Error::Io {
        path: a.config.clone(),
        source: e,
    })?;
    let mut config = Config::from_yaml(&text, &a.config)?;
    config.seed = a.seed;
    let cks = open_inputs(&config)?;
    let refs: Vec<&Checkpoint> = cks.iter().collect();
    let plan = check_compatible(&refs)?;
    let merger = ConfigMerger::new(&config);
    merger.preflight(plan.iter().map(|(n, _)| n.as_str()))?;
    let out_dtype = config
        .out_dtype
        .or_else(|| {
            cks[0]
                .tensors()
                .iter()
                .map(|t| t.dtype())
                .find(|d| d.is_float())
        })
        .unwrap_or(Dtype::F32);
    let out_bytes: u64 = plan
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64 * out_dtype.size() as u64)
        .sum();
    eprintln!(
        "{} merge of {} checkpoint(s){}: {} tensors, {:.3} GB out as {} (compute {}, seed {})",
        config.method.name,
        cks.len(),
        if config.has_base {
            " (first is the base)"
        } else {
            ""
        },
        plan.len(),
        out_bytes as f64 / 1e9,
        out_dtype,
        if config.compute_f64 { "f64" } else { "f32" },
        config.seed,
    );
    if a.dry_run {
        for (i, c) in cks.iter().enumerate() {
            eprintln!("  input {i}: {} ({} tensors)", c.path().display(), c.len());
        }
        return Ok(());
    }
    let mut save = SaveOptions::new(out_dtype);
    save.max_shard_size = a.max_shard_size;
    let chunking = if config.method.elementwise {
        Chunking::Elementwise {
            chunk_elems: a.chunk_elems,
        }
    } else {
        Chunking::Whole
    };
    let opts = StreamOptions::new(save).chunking(chunking);
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
    let progress = |p: &modelfusion::io::Progress| {
        bar.set_position(p.bytes_done);
        bar.set_message(format!("{}/{} {}", p.tensor_index + 1, p.tensors, p.name));
    };
    let summary = if config.compute_f64 {
        merge_checkpoints::<f64, _>(&refs, &merger, &a.out, &opts, progress)?
    } else {
        merge_checkpoints::<f32, _>(&refs, &merger, &a.out, &opts, progress)?
    };
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    let copied = if !a.no_copy_files {
        copy_side_files(&config.inputs[0], &a.out, Some(out_dtype))?
    } else {
        Vec::new()
    };
    eprintln!(
        "merged {} tensors in {secs:.2} s: {:.3} GB read, {:.3} GB written ({:.2} GB/s) -> {}{}",
        summary.tensors,
        summary.bytes_read as f64 / 1e9,
        summary.bytes_written as f64 / 1e9,
        (summary.bytes_read + summary.bytes_written) as f64 / 1e9 / secs.max(1e-9),
        a.out.display(),
        if copied.is_empty() {
            String::new()
        } else {
            format!(" (copied {})", copied.join(", "))
        }
    );
    if !summary.carried.is_empty() {
        eprintln!(
            "carried {} non-float tensor(s) unchanged from {} ({} differ among the inputs{})",
            summary.carried.len(),
            config.inputs[0].display(),
            summary.carried_differing.len(),
            summary
                .carried_differing
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
