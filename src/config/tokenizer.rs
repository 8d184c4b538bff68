//! `tokenizer_source`, the `tokenizer:` block and `chat_template`: where the output's
//! tokenizer files come from, checked against the inputs' vocabularies (read from
//! `tokenizer.json` with serde_json), and the chat template written beside them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::io::read_capped;
use crate::{Error, Result};

/// Where the output's tokenizer comes from (`tokenizer_source`, or `tokenizer.source`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenizerSource {
    /// The base model's (the first model's without one).
    Base,
    /// The union of the inputs' vocabularies.
    Union,
    /// The tokenizer of the model at this path.
    Model(PathBuf),
}

/// Largest `tokenizer.json` read.
const MAX_TOKENIZER: u64 = 256 << 20;

impl TokenizerSource {
    /// Reads `tokenizer_source: base | union | PATH`.
    ///
    /// ```
    /// use modelfusion::config::TokenizerSource;
    /// let v = serde_json::json!("union");
    /// assert_eq!(TokenizerSource::parse(&v, "tokenizer_source")?, TokenizerSource::Union);
    /// assert!(TokenizerSource::parse(&serde_json::json!(3), "tokenizer_source").is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn parse(v: &serde_json::Value, key: &str) -> Result<TokenizerSource> {
        match v {
            serde_json::Value::String(s) if s == "base" => Ok(TokenizerSource::Base),
            serde_json::Value::String(s) if s == "union" => Ok(TokenizerSource::Union),
            serde_json::Value::String(s) if !s.is_empty() => {
                Ok(TokenizerSource::Model(PathBuf::from(s)))
            }
            other => Err(Error::invalid(
                key,
                format!("expected `base`, `union` or the path of a model, got `{other}`"),
            )),
        }
    }

    /// Reads the `tokenizer:` block: `source` (default `union`, as in mergekit);
    /// `tokens` (embeddings chosen per added token) and `pad_to_multiple_of` need
    /// vocabulary remapping and are refused.
    pub(crate) fn parse_block(v: &serde_json::Value) -> Result<TokenizerSource> {
        let serde_json::Value::Object(map) = v else {
            return Err(Error::invalid(
                "tokenizer",
                format!("expected a map {{source, tokens, pad_to_multiple_of}}, got `{v}`"),
            ));
        };
        for (k, x) in map {
            match k.as_str() {
                "source" => {}
                "tokens" | "pad_to_multiple_of" if x.is_null() => {}
                "tokens" | "pad_to_multiple_of" => {
                    return Err(Error::invalid(
                        format!("tokenizer.{k}"),
                        "needs embedding rows built for new tokens, which modelfusion does not do (it merges inputs that share one vocabulary)",
                    ));
                }
                _ => {
                    return Err(Error::invalid(
                        "tokenizer",
                        format!("unknown key `{k}` (keys: source, tokens, pad_to_multiple_of)"),
                    ));
                }
            }
        }
        match map.get("source") {
            None => Ok(TokenizerSource::Union),
            Some(s) => Self::parse(s, "tokenizer.source"),
        }
    }
}

/// The vocabulary of the tokenizer in model directory `dir`: token -> id, from the
/// `model.vocab` of its `tokenizer.json` (a map, or Unigram's `[token, score]` list)
/// and its `added_tokens`.
///
/// ```
/// let dir = std::env::temp_dir().join("modelfusion-doc-vocab");
/// std::fs::create_dir_all(&dir).unwrap();
/// std::fs::write(dir.join("tokenizer.json"), r#"{"model": {"vocab": {"a": 0, "b": 1}}, "added_tokens": [{"id": 2, "content": "<s>"}]}"#).unwrap();
/// let v = modelfusion::config::vocabulary(&dir)?;
/// assert_eq!(v.len(), 3);
/// assert_eq!(v["<s>"], 2);
/// # Ok::<(), modelfusion::Error>(())
/// ```
pub fn vocabulary(dir: &Path) -> Result<BTreeMap<String, u64>> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Err(Error::invalid(
            "tokenizer_source",
            format!(
                "{} has no tokenizer.json (the vocabulary is read from it; tokenizer.model or vocab.json alone are not read)",
                dir.display()
            ),
        ));
    }
    let bytes = read_capped(&path, MAX_TOKENIZER, "tokenizer.json")?;
    let bad = |why: &str| Error::Format {
        format: "tokenizer.json",
        path: Some(path.clone()),
        reason: why.to_string(),
    };
    let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| bad(&e.to_string()))?;
    let mut out = BTreeMap::new();
    match v.pointer("/model/vocab") {
        Some(serde_json::Value::Object(m)) => {
            for (tok, id) in m {
                let id = id
                    .as_u64()
                    .ok_or_else(|| bad(&format!("token `{tok}` has id `{id}`")))?;
                out.insert(tok.clone(), id);
            }
        }
        Some(serde_json::Value::Array(list)) => {
            for (id, e) in list.iter().enumerate() {
                let tok = e
                    .get(0)
                    .and_then(serde_json::Value::as_str)
                    .ok_or_else(|| bad(&format!("vocab entry {id} is not [token, score]")))?;
                out.insert(tok.to_string(), id as u64);
            }
        }
        _ => return Err(bad("no `model.vocab` map or list")),
    }
    for e in v
        .get("added_tokens")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
    {
        let (Some(id), Some(tok)) = (
            e.get("id").and_then(serde_json::Value::as_u64),
            e.get("content").and_then(serde_json::Value::as_str),
        ) else {
            return Err(bad(&format!("added token `{e}` lacks id or content")));
        };
        out.insert(tok.to_string(), id);
    }
    Ok(out)
}

/// The directory holding a checkpoint's side files (itself, or a file's folder).
pub(crate) fn model_dir(p: &Path) -> PathBuf {
    if p.is_dir() {
        p.to_path_buf()
    } else {
        p.parent().unwrap_or(Path::new(".")).to_path_buf()
    }
}

/// Checks that every input has the output tokenizer's vocabulary, token for token
/// (the embedding and LM-head rows then need no remapping, and mergekit's remapping
/// is the identity), and returns the directory the tokenizer files come from and the
/// vocabulary size. `donor` is the base model (or the first input).
pub(crate) fn check_vocabularies(
    source: &TokenizerSource,
    donor: &Path,
    inputs: &[PathBuf],
) -> Result<(PathBuf, usize)> {
    let from = match source {
        TokenizerSource::Model(p) => p.clone(),
        TokenizerSource::Base | TokenizerSource::Union => donor.to_path_buf(),
    };
    let want = vocabulary(&model_dir(&from))?;
    for p in inputs {
        let got = vocabulary(&model_dir(p))?;
        if got != want {
            let first = want
                .iter()
                .find(|(t, id)| got.get(*t) != Some(id))
                .map(|(t, id)| match got.get(t) {
                    Some(g) => format!("`{t}` is {id} in {} but {g} here", from.display()),
                    None => format!("`{t}` ({id} in {}) is missing here", from.display()),
                })
                .or_else(|| {
                    got.keys()
                        .find(|t| !want.contains_key(*t))
                        .map(|t| format!("`{t}` is not in {}", from.display()))
                })
                .unwrap_or_default();
            return Err(Error::invalid(
                "tokenizer_source",
                format!(
                    "{} has another vocabulary ({} tokens against {}; {first}): remapping embedding and LM-head rows to a new vocabulary is not implemented, so tokenizer_source needs inputs that share one vocabulary",
                    p.display(),
                    got.len(),
                    want.len()
                ),
            ));
        }
    }
    Ok((from, want.len()))
}

/// The chat template of model directory `dir`, if it has one (`chat_template.jinja`,
/// else the `chat_template` string of `tokenizer_config.json`).
fn template_of(dir: &Path) -> Option<String> {
    if let Ok(t) = std::fs::read_to_string(dir.join("chat_template.jinja")) {
        return Some(t);
    }
    let bytes = read_capped(
        dir.join("tokenizer_config.json"),
        MAX_TOKENIZER,
        "tokenizer_config.json",
    )
    .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("chat_template")?.as_str().map(str::to_string)
}

/// The template `chat_template` asks for: `auto` picks the one most inputs have (none
/// when no input has one, as mergekit), any other value is the template's text (it
/// must look like one: at least 20 characters with a `{`, as mergekit checks).
/// mergekit's named templates (`chatml`, `llama3`, ...) are files of its own: they are
/// refused with that explanation.
pub(crate) fn resolve_template(value: &str, inputs: &[PathBuf]) -> Result<Option<String>> {
    if value == "auto" {
        let mut counts: Vec<(String, usize)> = Vec::new();
        for p in inputs {
            if let Some(t) = template_of(&model_dir(p)) {
                let t = t.trim().to_string();
                match counts.iter_mut().find(|(u, _)| *u == t) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((t, 1)),
                }
            }
        }
        // The first of the most common, as Counter.most_common orders ties.
        let best = counts.iter().map(|(_, n)| *n).max();
        return Ok(counts
            .into_iter()
            .find(|(_, n)| Some(*n) == best)
            .map(|(t, _)| t));
    }
    if value.len() < 20 || !value.contains('{') {
        let why = if !value.contains('\n') && !value.contains('{') && value.len() < 256 {
            " (mergekit's named templates such as `chatml` or `llama3` are files of mergekit's; paste the template's text instead)"
        } else {
            ""
        };
        return Err(Error::invalid(
            "chat_template",
            format!(
                "`{value}` is neither `auto` nor a Jinja template (at least 20 characters with a `{{`){why}"
            ),
        ));
    }
    Ok(Some(value.to_string()))
}

/// Puts `template` into the side files: `chat_template.jinja` (where the tokenizer
/// files saved by transformers keep it), with any `chat_template` key of
/// `tokenizer_config.json` removed so that the two cannot disagree.
pub(crate) fn set_template(side: &mut Vec<(String, Vec<u8>)>, template: &str) -> Result<()> {
    side.retain(|(n, _)| n != "chat_template.jinja");
    edit_json(side, "tokenizer_config.json", |obj| {
        obj.remove("chat_template");
    })?;
    side.push(("chat_template.jinja".into(), template.as_bytes().to_vec()));
    Ok(())
}

/// Edits the JSON object of side file `file` among `side` (if present), rewriting it
/// pretty-printed.
pub(crate) fn edit_json(
    side: &mut [(String, Vec<u8>)],
    file: &str,
    edit: impl Fn(&mut serde_json::Map<String, serde_json::Value>),
) -> Result<()> {
    for (name, bytes) in side.iter_mut().filter(|(n, _)| n == file) {
        let mut v: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| Error::Format {
                format: "JSON",
                path: Some(PathBuf::from(name.as_str())),
                reason: e.to_string(),
            })?;
        if let Some(obj) = v.as_object_mut() {
            edit(obj);
        }
        let s =
            serde_json::to_string_pretty(&v).map_err(|e| Error::invalid(file, e.to_string()))?;
        *bytes = (s + "\n").into_bytes();
    }
    Ok(())
}
