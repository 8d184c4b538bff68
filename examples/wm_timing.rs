//! Weight matching on random weights of a ready architecture: timing, and a dump for the
//! numpy + scipy comparison (`benches/compare/align_compare.py`).
//!
//! ```text
//! cargo run --release --example wm_timing -- resnet20x16            # time it
//! cargo run --release --example wm_timing -- resnet20x16 --dump DIR # and write the
//!     weights (.npy), the spec, the passive parameters, the visiting order and the
//!     result for the script
//! options: --f64 (f64 weights)  --max-iter N  --seed N  --runs N (best of N)
//! architectures: resnet20x1, resnet20x4, resnet20x16, vgg16, mlp (784-512-512-512-10)
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use modelfusion::align::{Aligner, WeightMatching};
use modelfusion::perm::PermutationSpec;
use modelfusion::perm::specs::{Architecture, MlpShapes, ResNet, Vgg};
use modelfusion::{Error, Model, Result, Scalar, StateDict, StateDictF32, Tensor};

fn arch(name: &str) -> Result<Box<dyn ArchBox>> {
    Ok(match name {
        "resnet20x1" => Box::new(ResNet::resnet20(1, 10)),
        "resnet20x4" => Box::new(ResNet::resnet20(4, 10)),
        "resnet20x16" => Box::new(ResNet::resnet20(16, 10)),
        "vgg16" => Box::new(Vgg::vgg16(1, 10)),
        "mlp" => Box::new(MlpShapes::new(&[784, 512, 512, 512, 10])?),
        other => {
            return Err(Error::invalid(
                "architecture",
                format!("unknown `{other}` (resnet20x1, resnet20x4, resnet20x16, vgg16, mlp)"),
            ));
        }
    })
}

/// Object-safe view of an [`Architecture`].
trait ArchBox {
    fn spec(&self) -> PermutationSpec;
    fn random_model(&self, seed: u64) -> StateDictF32;
}
impl<A: Architecture> ArchBox for A {
    fn spec(&self) -> PermutationSpec {
        Architecture::spec(self)
    }
    fn random_model(&self, seed: u64) -> StateDictF32 {
        Architecture::random_model(self, seed)
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

/// Writes a little-endian `.npy` (version 1.0) file.
fn write_npy<T: Tensor>(path: &Path, t: &T) -> Result<()> {
    let (descr, size) = if std::mem::size_of::<T::Elem>() == 4 {
        ("<f4", 4)
    } else {
        ("<f8", 8)
    };
    let shape: Vec<String> = t.shape().iter().map(|d| d.to_string()).collect();
    let shape = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!("({})", shape.join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + t.len() * size);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for &x in t.view().as_standard_layout().iter() {
        let v = x.to_f64_lossless();
        if size == 4 {
            out.extend_from_slice(&(v as f32).to_le_bytes());
        } else {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    std::fs::write(path, out).map_err(io(path))
}

fn dump<T: Tensor>(
    dir: &Path,
    a: &StateDict<T>,
    b: &StateDict<T>,
    spec: &PermutationSpec,
    al: &modelfusion::align::Alignment,
) -> Result<()> {
    for (sub, m) in [("a", a), ("b", b)] {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d).map_err(io(&d))?;
        for (name, t) in m.iter() {
            write_npy(&d.join(format!("{name}.npy")), t)?;
        }
    }
    let mut text = String::new();
    for (g, members) in spec.groups() {
        for (p, ax) in members {
            text.push_str(&format!("{g}\t{p}\t{ax}\n"));
        }
    }
    let f = dir.join("spec.tsv");
    std::fs::write(&f, text).map_err(io(&f))?;
    // Passive parameters (running statistics) are permuted but not matched.
    let passive: Vec<&str> = spec.passive_params().collect();
    let f = dir.join("passive.txt");
    std::fs::write(&f, passive.join("\n")).map_err(io(&f))?;
    let mut text = String::new();
    for sweep in &al.stats().order {
        text.push_str(&sweep.join(" "));
        text.push('\n');
    }
    let f = dir.join("order.txt");
    std::fs::write(&f, text).map_err(io(&f))?;
    let mut text = String::new();
    for (g, m) in al.iter() {
        let p = m
            .permutation()
            .ok_or_else(|| Error::invalid("alignment", "not hard"))?;
        let idx: Vec<String> = p.as_slice().iter().map(|i| i.to_string()).collect();
        text.push_str(&format!("{g}\t{}\n", idx.join(" ")));
    }
    let f = dir.join("perms.tsv");
    let mut file = std::fs::File::create(&f).map_err(io(&f))?;
    file.write_all(text.as_bytes()).map_err(io(&f))?;
    Ok(())
}

fn time<T: Tensor>(
    a: &StateDict<T>,
    b: &StateDict<T>,
    spec: &PermutationSpec,
    wm: &WeightMatching,
    dump_dir: Option<&PathBuf>,
    runs: u64,
) -> Result<()> {
    let mut secs = f64::INFINITY;
    let mut al = None;
    for _ in 0..runs.max(1) {
        let t0 = Instant::now();
        let run = wm.align(a, b, spec)?;
        secs = secs.min(t0.elapsed().as_secs_f64());
        al = Some(run);
    }
    let al = al.ok_or_else(|| Error::invalid("--runs", "no run"))?;
    let s = al.stats();
    println!(
        "rust: {:.4} s (best of {runs}), {} sweeps ({:.4} s/sweep), converged {}, objective {:.9} -> {:.9}, elements {}",
        secs,
        s.sweeps,
        secs / s.sweeps as f64,
        s.converged,
        s.objective[0],
        s.objective.last().copied().unwrap_or(f64::NAN),
        a.num_elements()
    );
    if let Some(dir) = dump_dir {
        dump(dir, a, b, spec, &al)?;
        println!("dumped to {}", dir.display());
    }
    Ok(())
}

fn run() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_else(|| "resnet20x1".to_string());
    let (mut dump_dir, mut f64_mode, mut max_iter, mut seed, mut runs) =
        (None, false, 100, 0u64, 1u64);
    while let Some(a) = args.next() {
        let mut num = |flag: &str| -> Result<u64> {
            args.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| Error::invalid(flag, "needs a non-negative integer"))
        };
        match a.as_str() {
            "--dump" => {
                dump_dir =
                    Some(PathBuf::from(args.next().ok_or_else(|| {
                        Error::invalid("--dump", "needs a directory")
                    })?))
            }
            "--f64" => f64_mode = true,
            "--max-iter" => max_iter = num("--max-iter")? as usize,
            "--seed" => seed = num("--seed")?,
            "--runs" => runs = num("--runs")?,
            other => return Err(Error::invalid("argument", format!("unknown `{other}`"))),
        }
    }
    let arch = arch(&name)?;
    let spec = arch.spec();
    let (a, b) = (arch.random_model(1), arch.random_model(2));
    let wm = WeightMatching::new(seed).with_max_iter(max_iter)?;
    println!(
        "{name}: {} groups, {} threads, {}",
        spec.num_groups(),
        rayon::current_num_threads(),
        if f64_mode { "f64" } else { "f32" }
    );
    if f64_mode {
        let (a, b): (
            StateDict<ndarray::ArrayD<f64>>,
            StateDict<ndarray::ArrayD<f64>>,
        ) = (a.cast(), b.cast());
        time(&a, &b, &spec, &wm, dump_dir.as_ref(), runs)
    } else {
        time(&a, &b, &spec, &wm, dump_dir.as_ref(), runs)
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
