//! `tokenizer_source` on models that ship no `tokenizer.json`: a GPT-2 BPE
//! (`vocab.json` + `merges.txt`) or a SentencePiece `tokenizer.model`. The fixtures in
//! `tests/golden/mergekit/tokenizers/` come from `gen_tokenizers.py` (the tokenizers and
//! sentencepiece libraries), with the vocabularies transformers reads from them in
//! `expected.json`; `union`, `base` and `model:` merges over them run end to end; and
//! corrupt files (truncated protobuf, huge lengths, bad JSON) are clear errors.
#![cfg(feature = "config")]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use modelfusion::config::{Config, RunOptions, vocabulary};
use modelfusion::io::load;
use modelfusion::progress::Silent;
use modelfusion::{Model, StateDictF32};
use ndarray::ArrayD;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/mergekit/tokenizers")
}

fn expected(which: &str) -> BTreeMap<String, u64> {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("expected.json")).unwrap()).unwrap();
    v[which]
        .as_object()
        .unwrap()
        .iter()
        .map(|(t, i)| (t.clone(), i.as_u64().unwrap()))
        .collect()
}

/// A one-layer Llama-like model `id` with the tokenizer files of fixture `tok` and
/// `rows` embedding rows: row `r` is `id * 1000 + r`.
fn write(dir: &Path, name: &str, id: f32, tok: &str, rows: usize) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    for f in std::fs::read_dir(fixtures().join(tok)).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), d.join(f.file_name())).unwrap();
    }
    let emb = ArrayD::from_shape_fn(vec![rows, 2], |ix| id * 1000.0 + ix[0] as f32);
    crate::config_vocab::write_llama_checkpoint(&d, id, emb.clone(), Some(emb), rows);
    d
}

fn run(dir: &Path, body: &str) -> modelfusion::Result<(StateDictF32, serde_json::Value)> {
    let text = body.replace("DIR", &dir.display().to_string());
    let c = Config::from_yaml(&text, Path::new("t.yml"))?;
    let out = dir.join("out");
    std::fs::remove_dir_all(&out).ok();
    c.run(&out, &RunOptions::new(), Silent)?;
    let cfg = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    Ok((load(&out)?, cfg))
}

#[test]
fn vocabularies_are_those_transformers_reads() {
    let gpt2 = vocabulary(&fixtures().join("gpt2")).unwrap();
    assert_eq!(gpt2, expected("gpt2"));
    assert_eq!(gpt2["<|im_end|>"], 301);
    let spm = vocabulary(&fixtures().join("spm")).unwrap();
    assert_eq!(spm, expected("spm"));
    assert_eq!(spm["<unk>"], 0);
}

#[test]
fn union_base_and_model_sources_over_slow_tokenizers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (spm, gpt2) = (expected("spm"), expected("gpt2"));
    write(dir, "a", 1.0, "spm", spm.len());
    write(dir, "b", 2.0, "gpt2", gpt2.len());
    let linear = "merge_method: linear\nmodels:\n  - model: DIR/a\n    parameters: {weight: 1}\n  - model: DIR/b\n    parameters: {weight: 1}\nparameters: {normalize: false}\n";
    // union (a, the first model, is the base): a's pieces keep their ids, b's other tokens follow.
    let (m, cfg) = run(dir, &format!("{linear}tokenizer_source: union\n")).unwrap();
    let new = gpt2.keys().filter(|t| !spm.contains_key(*t)).count();
    assert_eq!(cfg["vocab_size"], spm.len() + new);
    let e = m.get("model.embed_tokens.weight").unwrap();
    assert_eq!(e.shape(), &[spm.len() + new, 2]);
    // A token both have: a's own row plus b's own row.
    let (t, ia) = spm.iter().find(|(t, _)| gpt2.contains_key(*t)).unwrap();
    assert_eq!(
        e[[*ia as usize, 0]],
        1000.0 + *ia as f32 + 2000.0 + gpt2[t] as f32
    );
    // The SentencePiece model stays; the tokens past it are in added_tokens.json.
    let out = dir.join("out");
    assert!(out.join("tokenizer.model").is_file());
    assert!(!out.join("tokenizer.json").exists());
    let added: BTreeMap<String, u64> =
        serde_json::from_slice(&std::fs::read(out.join("added_tokens.json")).unwrap()).unwrap();
    assert_eq!(added.len(), new);
    assert!(added.values().all(|&i| i >= spm.len() as u64));
    let mut ids: Vec<u64> = added.values().copied().collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        (spm.len() as u64..(spm.len() + new) as u64).collect::<Vec<_>>()
    );
    // The output reads back as one vocabulary of that size.
    assert_eq!(vocabulary(&out).unwrap().len(), spm.len() + new);
    // base: a's files as they are.
    let (m, cfg) = run(dir, &format!("{linear}tokenizer_source: base\n")).unwrap();
    assert_eq!(cfg["vocab_size"], spm.len());
    assert_eq!(
        std::fs::read(out.join("tokenizer.model")).unwrap(),
        std::fs::read(fixtures().join("spm/tokenizer.model")).unwrap()
    );
    assert_eq!(m.get("lm_head.weight").unwrap().shape(), &[spm.len(), 2]);
    // model:b: the GPT-2 vocabulary; a token a lacks takes b's row for a too.
    let (m, cfg) = run(dir, &format!("{linear}tokenizer_source: model:DIR/b\n")).unwrap();
    assert_eq!(cfg["vocab_size"], gpt2.len());
    assert!(out.join("vocab.json").is_file() && out.join("merges.txt").is_file());
    let (t, ib) = gpt2.iter().find(|(t, _)| !spm.contains_key(*t)).unwrap();
    let e = m.get("model.embed_tokens.weight").unwrap();
    assert_eq!(e[[*ib as usize, 0]], 2.0 * (2000.0 + *ib as f32), "{t}");
}

/// Writes `bytes` as the only tokenizer file `file` of a fresh directory and returns
/// the error reading its vocabulary.
fn refused(file: &str, bytes: &[u8]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join(file), bytes).unwrap();
    vocabulary(tmp.path()).unwrap_err().to_string()
}

#[test]
fn corrupt_tokenizer_files_are_clear_errors() {
    let model = std::fs::read(fixtures().join("spm/tokenizer.model")).unwrap();
    // Cut inside the pieces: a length runs past the end.
    let e = refused("tokenizer.model", &model[..model.len() / 3]);
    assert!(
        e.contains("tokenizer.model") && e.contains("runs past the end"),
        "{e}"
    );
    let e = refused("tokenizer.model", &model[..model.len() - 1]);
    assert!(e.contains("runs past the end"), "{e}");
    // A huge length (2^63) and an over-long varint.
    let mut huge = vec![0x0a];
    huge.extend([0xff; 8]);
    huge.push(0x7f);
    let e = refused("tokenizer.model", &huge);
    assert!(e.contains("runs past the end"), "{e}");
    let e = refused(
        "tokenizer.model",
        &[
            0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
        ],
    );
    assert!(e.contains("overflows 64 bits"), "{e}");
    let e = refused("tokenizer.model", &[0x0a, 0x80]);
    assert!(e.contains("truncated varint"), "{e}");
    // No pieces at all (an empty file, another protobuf), a piece without text, not
    // UTF-8, a group wire type, duplicate pieces.
    assert!(refused("tokenizer.model", b"").contains("no pieces"));
    assert!(refused("tokenizer.model", &[0x10, 0x05]).contains("no pieces"));
    let e = refused("tokenizer.model", &[0x0a, 0x02, 0x15, 0x00]);
    assert!(e.contains("runs past the end"), "{e}");
    assert!(refused("tokenizer.model", &[0x0a, 0x02, 0x10, 0x01]).contains("has no text"));
    assert!(refused("tokenizer.model", &[0x0a, 0x03, 0x0a, 0x01, 0xff]).contains("not UTF-8"));
    assert!(refused("tokenizer.model", &[0x0b, 0x00]).contains("wire type 3"));
    let dup = [0x0a, 0x03, 0x0a, 0x01, b'a', 0x0a, 0x03, 0x0a, 0x01, b'a'];
    let e = refused("tokenizer.model", &dup);
    assert!(e.contains("`a` is both id 0 and id 1"), "{e}");
    // vocab.json: not JSON, not a map, a non-integer id.
    assert!(refused("vocab.json", b"{").contains("vocab.json"));
    assert!(refused("vocab.json", b"[1]").contains("expected a map"));
    let e = refused("vocab.json", br#"{"a": 0, "b": "x"}"#);
    assert!(e.contains("token `b`") && e.contains("vocab.json"), "{e}");
    // No tokenizer file at all names the three it looks for.
    let tmp = tempfile::tempdir().unwrap();
    let e = vocabulary(tmp.path()).unwrap_err().to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("vocab.json") && e.contains("tokenizer.model"),
        "{e}"
    );
    // A bad added_tokens_decoder names the file.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("vocab.json"), br#"{"a": 0}"#).unwrap();
    std::fs::write(
        tmp.path().join("tokenizer_config.json"),
        br#"{"added_tokens_decoder": {"x": {"content": "b"}}}"#,
    )
    .unwrap();
    let e = vocabulary(tmp.path()).unwrap_err().to_string();
    assert!(
        e.contains("tokenizer_config.json") && e.contains("`x`"),
        "{e}"
    );
}
