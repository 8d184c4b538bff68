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
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use modelfusion::io::{
    Checkpoint, Chunking, Dtype, IoScalar, SaveOptions, StreamOptions, check_compatible,
    merge_checkpoints, read_capped, side_files,
};
use modelfusion::merge::TensorMerger;
use modelfusion::{Error, Result};
use ndarray::ArrayD;

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

/// Largest merge config read, in bytes (checked from the metadata and by reading at
/// most this much, so `/dev/zero`-like inputs fail at once).
const MAX_CONFIG_SIZE: u64 = 16 << 20;

/// Checks every merged tensor before it is written: non-finite values are an error
/// (unless allowed), and finite values that the output dtype cannot hold (above the
/// float16 / bfloat16 maximum: stored as infinity) are counted for a warning.
struct Checked<'a, M> {
    inner: &'a M,
    allow_nonfinite: bool,
    out_dtype: Dtype,
    overflowed: AtomicU64,
    first_overflow: Mutex<Option<String>>,
}

impl<'a, M> Checked<'a, M> {
    fn new(inner: &'a M, allow_nonfinite: bool, out_dtype: Dtype) -> Self {
        Checked {
            inner,
            allow_nonfinite,
            out_dtype,
            overflowed: AtomicU64::new(0),
            first_overflow: Mutex::new(None),
        }
    }

    /// Largest finite value of the output dtype, when it is narrower than `f32`.
    fn narrow_max(&self) -> Option<f64> {
        match self.out_dtype {
            Dtype::F16 => Some(f64::from(modelfusion::io::f16::MAX)),
            Dtype::BF16 => Some(f64::from(modelfusion::io::bf16::MAX)),
            _ => None,
        }
    }

    /// Whether `x` (finite, above the dtype's maximum) is stored as an infinity.
    fn becomes_infinite(&self, x: f64) -> bool {
        match self.out_dtype {
            Dtype::F16 => modelfusion::io::f16::from_f64(x).is_infinite(),
            Dtype::BF16 => modelfusion::io::bf16::from_f64(x).is_infinite(),
            _ => false,
        }
    }

    /// A warning line for the values that overflowed the output dtype, if any did.
    fn overflow_warning(&self) -> Option<String> {
        let n = self.overflowed.load(Ordering::Relaxed);
        let first = self
            .first_overflow
            .lock()
            .map(|g| g.clone())
            .unwrap_or_default()?;
        (n > 0).then(|| {
            format!(
                "warning: {n} merged value(s) exceed the {} maximum ({}) and are stored as infinity (first in tensor `{}`); consider out_dtype: float32",
                self.out_dtype.torch_name(),
                self.narrow_max().unwrap_or(f64::INFINITY),
                modelfusion::error::Escaped(&first)
            )
        })
    }
}

impl<T, M> TensorMerger<ArrayD<T>> for Checked<'_, M>
where
    T: IoScalar,
    M: TensorMerger<ArrayD<T>>,
{
    fn merge_tensor(&self, name: &str, ts: &[&ArrayD<T>]) -> Result<ArrayD<T>> {
        let out = self.inner.merge_tensor(name, ts)?;
        let max = self.narrow_max().unwrap_or(f64::INFINITY);
        let (mut nonfinite, mut overflow) = (0u64, 0u64);
        for &x in out.iter() {
            let v = x.to_f64_lossless();
            if !v.is_finite() {
                nonfinite += 1;
            } else if v.abs() > max && self.becomes_infinite(v) {
                overflow += 1;
            }
        }
        if nonfinite > 0 && !self.allow_nonfinite {
            return Err(Error::NonFinite {
                what: format!(
                    "merged tensor `{name}` ({nonfinite} of {} values are NaN or infinite); nothing more is written, pass --allow-nonfinite to write such values anyway",
                    out.len()
                ),
            });
        }
        if overflow > 0 {
            self.overflowed.fetch_add(overflow, Ordering::Relaxed);
            if let Ok(mut first) = self.first_overflow.lock() {
                first.get_or_insert_with(|| name.to_string());
            }
        }
        Ok(out)
    }
}

fn read_config(path: &Path) -> Result<String> {
    let bytes = read_capped(path, MAX_CONFIG_SIZE, "merge config")?;
    String::from_utf8(bytes).map_err(|e| {
        Error::invalid(
            "merge config",
            format!("`{}` is not UTF-8 text: {e}", path.display()),
        )
    })
}

fn run_merge(a: MergeArgs) -> Result<()> {
    let text = read_config(&a.config)?;
    let mut config = Config::from_yaml(&text, &a.config)?;
    config.seed = a.seed;
    let cks = open_inputs(&config)?;
    let refs: Vec<&Checkpoint> = cks.iter().collect();
    let plan = check_compatible(&refs)?;
    let config_merger = ConfigMerger::new(&config);
    config_merger.preflight(plan.iter().map(|(n, _)| n.as_str()))?;
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
    let merger = Checked::new(&config_merger, a.allow_nonfinite, out_dtype);
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
    // Side files are committed with the weights, before the index.
    let side = if a.no_copy_files {
        Vec::new()
    } else {
        side_files(&config.inputs[0], Some(out_dtype))?
    };
    let copied: Vec<String> = side.iter().map(|(n, _)| n.clone()).collect();
    let opts = StreamOptions::new(save).chunking(chunking).files(side);
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
    if let Some(w) = merger.overflow_warning() {
        eprintln!("{w}");
    }
    let secs = start.elapsed().as_secs_f64();
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
