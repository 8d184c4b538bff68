//! `tokenizer_source`, the `tokenizer:` block and `chat_template`: the output's
//! vocabulary built as mergekit 0.1.5 builds it (the base's, a model's, or the union of
//! the inputs', plus the tokens of `tokens:`), read from `tokenizer.json` with
//! serde_json; the rows of each input's embedding and LM head remapped to it
//! ([`RowRemap`]); the tokenizer files and the chat template written beside the output.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn};

use super::slow_tokenizer;
use crate::io::{IoScalar, read_capped};
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
    /// Reads `tokenizer_source: base | union | model:PATH | PATH | {model: PATH}` (a
    /// model as mergekit writes one: its path, `model:` in front being optional).
    ///
    /// ```
    /// use modelfusion::config::TokenizerSource;
    /// use std::path::PathBuf;
    /// let v = serde_json::json!("union");
    /// assert_eq!(TokenizerSource::parse(&v, "tokenizer_source")?, TokenizerSource::Union);
    /// let m = TokenizerSource::parse(&serde_json::json!("model:/m/a"), "tokenizer_source")?;
    /// assert_eq!(m, TokenizerSource::Model(PathBuf::from("/m/a")));
    /// assert!(TokenizerSource::parse(&serde_json::json!(3), "tokenizer_source").is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn parse(v: &serde_json::Value, key: &str) -> Result<TokenizerSource> {
        match v {
            serde_json::Value::String(s) if s == "base" => Ok(TokenizerSource::Base),
            serde_json::Value::String(s) if s == "union" => Ok(TokenizerSource::Union),
            other => model_ref(other).map(TokenizerSource::Model).ok_or_else(|| {
                Error::invalid(
                    key,
                    format!(
                        "expected `base`, `union` or a model (`model:PATH`, a path, or {{model: PATH}}), got `{other}`"
                    ),
                )
            }),
        }
    }
}

/// A model as mergekit references one: `model:PATH`, `PATH` or `{model: PATH}`.
fn model_ref(v: &serde_json::Value) -> Option<PathBuf> {
    let s = match v {
        serde_json::Value::String(s) => s.as_str(),
        serde_json::Value::Object(m) if m.len() == 1 => m.get("model")?.as_str()?,
        _ => return None,
    };
    let s = s.strip_prefix("model:").unwrap_or(s);
    (!s.is_empty()).then(|| PathBuf::from(s))
}

/// The `tokenizer` settings of a config: where the vocabulary comes from, the tokens
/// whose embedding rows are chosen (added to the vocabulary when missing), and the
/// multiple the row count is padded to. `tokenizer_source: X` is `{source: X}`.
///
/// ```
/// use modelfusion::config::{EmbeddingSource, TokenizerConfig, TokenizerSource};
/// let block = serde_json::json!({"source": "base", "pad_to_multiple_of": 8});
/// let tokens = vec![("<|im_start|>".to_string(), serde_json::json!({"source": {"kind": "zero"}}))];
/// let t = TokenizerConfig::parse_block(&block, tokens)?;
/// assert_eq!(t.source, TokenizerSource::Base);
/// assert_eq!(t.pad_to_multiple_of, Some(8));
/// assert_eq!(t.tokens[0].1.source, EmbeddingSource::Zero);
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct TokenizerConfig {
    /// Where the vocabulary comes from.
    pub source: TokenizerSource,
    /// `tokens:`, in the order written: each token's embedding row.
    pub tokens: Vec<(String, TokenEmbedding)>,
    /// `pad_to_multiple_of`: the row count is rounded up to a multiple of it (the extra
    /// rows hold the mean of the others, as mergekit does).
    pub pad_to_multiple_of: Option<usize>,
}

/// The embedding row chosen for one token of `tokens:`.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenEmbedding {
    /// Where the row comes from.
    pub source: EmbeddingSource,
    /// Whether every model gets this row, also those that have the token (`force`;
    /// without it the row fills in for the models that lack the token only).
    pub force: bool,
}

/// A token's embedding row, as mergekit 0.1.5's `tokens:` sources give it.
#[derive(Clone, Debug, PartialEq)]
pub enum EmbeddingSource {
    /// `{kind: zero}`: zeros.
    Zero,
    /// A model (`PATH`, `model:PATH`): its row for the same token.
    Model(PathBuf),
    /// `{kind: model_token, model: PATH, token: TEXT}` (or `token_id: N`): the row of
    /// another token of a model.
    ModelToken {
        /// The model.
        model: PathBuf,
        /// The token in that model's own vocabulary.
        token: TokenRef,
    },
}

/// A token of a model's own vocabulary: by id or by text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenRef {
    /// Its id (row) in the model.
    Id(u64),
    /// Its text, looked up in the model's `tokenizer.json`.
    Text(String),
}

impl TokenizerConfig {
    /// `tokenizer_source: X`: the vocabulary of `X`, no tokens, no padding.
    ///
    /// ```
    /// use modelfusion::config::{TokenizerConfig, TokenizerSource};
    /// assert!(TokenizerConfig::from_source(TokenizerSource::Union).tokens.is_empty());
    /// ```
    pub fn from_source(source: TokenizerSource) -> TokenizerConfig {
        TokenizerConfig {
            source,
            tokens: Vec::new(),
            pad_to_multiple_of: None,
        }
    }

    /// Reads the `tokenizer:` block `v`: `source` (default `union`, as in mergekit),
    /// `tokens` (passed separately as `tokens`, in the order written, which the JSON
    /// map of `v` does not keep) and `pad_to_multiple_of`; every error names the key,
    /// the expected form and the value.
    pub fn parse_block(
        v: &serde_json::Value,
        tokens: Vec<(String, serde_json::Value)>,
    ) -> Result<TokenizerConfig> {
        let serde_json::Value::Object(map) = v else {
            return Err(Error::invalid(
                "tokenizer",
                format!("expected a map {{source, tokens, pad_to_multiple_of}}, got `{v}`"),
            ));
        };
        if let Some(k) = map
            .keys()
            .find(|k| !matches!(k.as_str(), "source" | "tokens" | "pad_to_multiple_of"))
        {
            return Err(Error::invalid(
                "tokenizer",
                format!("unknown key `{k}` (keys: source, tokens, pad_to_multiple_of)"),
            ));
        }
        let source = match map.get("source") {
            None | Some(serde_json::Value::Null) => TokenizerSource::Union,
            Some(s) => TokenizerSource::parse(s, "tokenizer.source")?,
        };
        let pad_to_multiple_of = match map.get("pad_to_multiple_of") {
            None | Some(serde_json::Value::Null) => None,
            Some(x) => Some(
                x.as_u64()
                    .filter(|&n| n > 0)
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| {
                        Error::invalid(
                            "tokenizer.pad_to_multiple_of",
                            format!("expected a whole number >= 1, got `{x}`"),
                        )
                    })?,
            ),
        };
        match map.get("tokens") {
            None | Some(serde_json::Value::Null) | Some(serde_json::Value::Object(_)) => {}
            Some(other) => {
                return Err(Error::invalid(
                    "tokenizer.tokens",
                    format!("expected a map token -> {{source, force}}, got `{other}`"),
                ));
            }
        }
        let tokens = tokens
            .into_iter()
            .map(|(t, e)| {
                let parsed = TokenEmbedding::parse(&t, &e)?;
                Ok((t, parsed))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(TokenizerConfig {
            source,
            tokens,
            pad_to_multiple_of,
        })
    }

    /// The embedding settings of token `t`, if `tokens:` has it.
    fn token(&self, t: &str) -> Option<&TokenEmbedding> {
        self.tokens.iter().find(|(u, _)| u == t).map(|(_, e)| e)
    }
}

impl TokenEmbedding {
    /// One entry of `tokens:` (`token` names it in errors): `{source, force}`.
    fn parse(token: &str, v: &serde_json::Value) -> Result<TokenEmbedding> {
        let key = format!("tokenizer.tokens.{token}");
        let bad = |why: &str, got: &serde_json::Value| {
            Error::invalid(
                key.as_str(),
                format!(
                    "{why}; expected {{source, force}} where `source` is {{kind: zero}}, a model (PATH or model:PATH) or {{kind: model_token, model: PATH, token: TEXT | token_id: N}}; got `{got}`"
                ),
            )
        };
        let serde_json::Value::Object(map) = v else {
            return Err(bad("not a map", v));
        };
        if let Some(k) = map.keys().find(|k| *k != "source" && *k != "force") {
            return Err(bad(&format!("unknown key `{k}` (keys: source, force)"), v));
        }
        let force = match map.get("force") {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::Bool(b)) => *b,
            Some(x) => return Err(bad("`force` is true or false", x)),
        };
        let source = match map.get("source") {
            None | Some(serde_json::Value::Null) => {
                return Err(bad(
                    "no `source` (mergekit 0.1.5 fails on a token without one that a model lacks)",
                    v,
                ));
            }
            Some(src @ serde_json::Value::Object(m)) if m.contains_key("kind") => {
                match m.get("kind").and_then(serde_json::Value::as_str) {
                    Some("zero") if m.len() == 1 => EmbeddingSource::Zero,
                    Some("model_token") => {
                        if let Some(k) = m.keys().find(|k| {
                            !matches!(k.as_str(), "kind" | "model" | "token" | "token_id")
                        }) {
                            return Err(bad(
                                &format!(
                                    "unknown key `{k}` in a model_token source (keys: kind, model, token, token_id)"
                                ),
                                src,
                            ));
                        }
                        let model = m
                            .get("model")
                            .and_then(model_ref)
                            .ok_or_else(|| bad("a model_token source needs `model`", src))?;
                        let token = match (m.get("token"), m.get("token_id")) {
                            (Some(serde_json::Value::String(t)), None) => TokenRef::Text(t.clone()),
                            (None, Some(id)) => TokenRef::Id(
                                id.as_u64()
                                    .ok_or_else(|| bad("`token_id` is a whole number >= 0", id))?,
                            ),
                            _ => {
                                return Err(bad(
                                    "a model_token source needs exactly one of `token` (text) and `token_id`",
                                    src,
                                ));
                            }
                        };
                        EmbeddingSource::ModelToken { model, token }
                    }
                    _ => return Err(bad("unknown source kind (kinds: zero, model_token)", src)),
                }
            }
            Some(m) => EmbeddingSource::Model(model_ref(m).ok_or_else(|| bad("not a source", m))?),
        };
        Ok(TokenEmbedding { source, force })
    }
}

/// The files a tokenizer was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TokenizerFormat {
    /// `tokenizer.json` (the `tokenizers` library's, transformers' fast tokenizers).
    Json,
    /// `vocab.json` + `merges.txt` (GPT-2 byte-level BPE).
    VocabJson,
    /// `tokenizer.model` (SentencePiece).
    SentencePiece,
}

impl TokenizerFormat {
    /// Which files of model directory `dir` hold its tokenizer, in transformers'
    /// order of preference; `None` when it has none.
    fn of(dir: &Path) -> Option<TokenizerFormat> {
        [
            ("tokenizer.json", TokenizerFormat::Json),
            ("vocab.json", TokenizerFormat::VocabJson),
            ("tokenizer.model", TokenizerFormat::SentencePiece),
        ]
        .into_iter()
        .find(|(f, _)| dir.join(f).is_file())
        .map(|(_, k)| k)
    }
}

/// A parsed tokenizer: the `tokenizer.json` (`Null` for the other formats), token -> id
/// (model vocabulary and added tokens) and the added tokens' entries.
#[derive(Clone, Debug)]
struct TokenizerFile {
    format: TokenizerFormat,
    /// Tokens of the model vocabulary (before any added token).
    model_len: usize,
    json: serde_json::Value,
    vocab: BTreeMap<String, u64>,
    /// `added_tokens` entries, by content.
    added: BTreeMap<String, serde_json::Value>,
}

/// The vocabulary of the tokenizer in model directory `dir`: token -> id, from the
/// `model.vocab` of its `tokenizer.json` (a map, or Unigram's `[token, score]` list)
/// and its `added_tokens`; without a `tokenizer.json`, from a GPT-2 BPE's `vocab.json`
/// or a SentencePiece `tokenizer.model` (its pieces in id order, read from the protobuf
/// with every length checked), with the added tokens of `tokenizer_config.json`
/// (`added_tokens_decoder`) and `added_tokens.json`.
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
    Ok(TokenizerFile::read(dir)?.vocab)
}

impl TokenizerFile {
    fn read(dir: &Path) -> Result<TokenizerFile> {
        let format = TokenizerFormat::of(dir).ok_or_else(|| {
            Error::invalid(
                "tokenizer_source",
                format!(
                    "{} has no tokenizer (tokenizer.json, vocab.json + merges.txt, or tokenizer.model)",
                    dir.display()
                ),
            )
        })?;
        if format != TokenizerFormat::Json {
            return Self::read_slow(dir, format);
        }
        let path = dir.join("tokenizer.json");
        let bytes = read_capped(&path, MAX_TOKENIZER, "tokenizer.json")?;
        let bad = |why: &str| Error::Format {
            format: "tokenizer.json",
            path: Some(path.clone()),
            reason: why.to_string(),
        };
        let json: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| bad(&e.to_string()))?;
        let mut vocab = BTreeMap::new();
        match json.pointer("/model/vocab") {
            Some(serde_json::Value::Object(m)) => {
                for (tok, id) in m {
                    let id = id
                        .as_u64()
                        .ok_or_else(|| bad(&format!("token `{tok}` has id `{id}`")))?;
                    vocab.insert(tok.clone(), id);
                }
            }
            Some(serde_json::Value::Array(list)) => {
                for (id, e) in list.iter().enumerate() {
                    let tok = e
                        .get(0)
                        .and_then(serde_json::Value::as_str)
                        .ok_or_else(|| bad(&format!("vocab entry {id} is not [token, score]")))?;
                    vocab.insert(tok.to_string(), id as u64);
                }
            }
            _ => return Err(bad("no `model.vocab` map or list")),
        }
        let mut added = BTreeMap::new();
        for e in json
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
            vocab.insert(tok.to_string(), id);
            added.insert(tok.to_string(), e.clone());
        }
        Ok(TokenizerFile {
            format,
            model_len: vocab.len(),
            json,
            vocab,
            added,
        })
    }

    /// A tokenizer saved without `tokenizer.json` (see [`vocabulary`]).
    fn read_slow(dir: &Path, format: TokenizerFormat) -> Result<TokenizerFile> {
        let mut vocab = match format {
            TokenizerFormat::SentencePiece => {
                let pieces = slow_tokenizer::read_sentencepiece(dir)?;
                let mut vocab = BTreeMap::new();
                for (id, p) in pieces.into_iter().enumerate() {
                    if let Some(first) = vocab.insert(p.clone(), id as u64) {
                        return Err(Error::Format {
                            format: "SentencePiece tokenizer.model",
                            path: Some(dir.join("tokenizer.model")),
                            reason: format!("piece `{p}` is both id {first} and id {id}"),
                        });
                    }
                }
                vocab
            }
            _ => slow_tokenizer::read_vocab_json(dir)?,
        };
        let model_len = vocab.len();
        let added = slow_tokenizer::read_added(dir)?;
        for (t, e) in &added {
            vocab.insert(t.clone(), e["id"].as_u64().unwrap_or_default());
        }
        Ok(TokenizerFile {
            format,
            model_len,
            json: serde_json::Value::Null,
            vocab,
            added,
        })
    }

    /// The tokens in id order.
    fn by_id(&self) -> Vec<(&str, u64)> {
        let mut v: Vec<(&str, u64)> = self.vocab.iter().map(|(t, i)| (t.as_str(), *i)).collect();
        v.sort_by_key(|(t, i)| (*i, *t));
        v
    }

    /// Drops the tokens with ids `>= n` (mergekit's "stripped" base tokenizer: the
    /// tokens beyond the model's `vocab_size`), with the BPE merges that use one;
    /// `place` names the model in errors. Returns whether any was dropped.
    fn strip(&mut self, n: u64, place: &Path) -> Result<bool> {
        let gone: HashSet<String> = self
            .vocab
            .iter()
            .filter(|(_, i)| **i >= n)
            .map(|(t, _)| t.clone())
            .collect();
        if gone.is_empty() {
            return Ok(false);
        }
        let kind = self
            .json
            .pointer("/model/type")
            .and_then(serde_json::Value::as_str);
        let refused = match self.format {
            TokenizerFormat::Json if kind == Some("BPE") => None,
            TokenizerFormat::Json => Some(format!(
                "works for BPE tokenizers only (as in mergekit), this one is {}",
                kind.unwrap_or("of no known type")
            )),
            TokenizerFormat::VocabJson => {
                Some("is done for tokenizer.json files only, this tokenizer is a vocab.json".into())
            }
            TokenizerFormat::SentencePiece => Some(
                "is done for tokenizer.json files only, this tokenizer is a tokenizer.model".into(),
            ),
        };
        if let Some(why) = refused {
            return Err(Error::invalid(
                "tokenizer_source",
                format!(
                    "{}: tokens {:?} have ids beyond the model's vocab_size {n}; dropping them {why}",
                    place.display(),
                    gone.iter().take(3).collect::<Vec<_>>(),
                ),
            ));
        }
        self.vocab.retain(|t, _| !gone.contains(t));
        self.added.retain(|t, _| !gone.contains(t));
        if let Some(serde_json::Value::Object(v)) = self.json.pointer_mut("/model/vocab") {
            v.retain(|t, _| !gone.contains(t));
        }
        if let Some(serde_json::Value::Array(m)) = self.json.pointer_mut("/model/merges") {
            m.retain(|e| match e {
                serde_json::Value::String(s) => !s.split(' ').any(|t| gone.contains(t)),
                serde_json::Value::Array(ts) => !ts
                    .iter()
                    .any(|t| t.as_str().is_some_and(|t| gone.contains(t))),
                _ => true,
            });
        }
        Ok(true)
    }

    /// Adds a token as transformers' `add_tokens` does: a token already added is left
    /// as it is; one of the model vocabulary becomes an added token (`entry` given)
    /// with its id; a new one gets the next id. `entry` is the added token's settings
    /// (`None`: a plain token, `normalized` and not special).
    fn add(&mut self, content: &str, entry: Option<&serde_json::Value>) {
        if self.added.contains_key(content) {
            return;
        }
        let id = match self.vocab.get(content) {
            Some(_) if entry.is_none() => return,
            Some(id) => *id,
            None => self.vocab.values().max().map_or(0, |m| m + 1),
        };
        let mut e = entry.cloned().unwrap_or_else(|| {
            serde_json::json!({"id": 0, "content": content, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": true, "special": false})
        });
        e["id"] = id.into();
        self.vocab.insert(content.to_string(), id);
        self.added.insert(content.to_string(), e);
    }

    /// The file's JSON with the current added tokens (in id order).
    fn to_json(&self) -> serde_json::Value {
        let mut json = self.json.clone();
        let mut added: Vec<&serde_json::Value> = self.added.values().collect();
        added.sort_by_key(|e| e.get("id").and_then(serde_json::Value::as_u64));
        json["added_tokens"] = serde_json::Value::Array(added.into_iter().cloned().collect());
        json
    }
}

/// `vocab_size` of the `config.json` in model directory `dir`, if it has one.
fn config_vocab_size(dir: &Path) -> Option<u64> {
    let bytes = read_capped(dir.join("config.json"), MAX_TOKENIZER, "config.json").ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("vocab_size")?.as_u64()
}

/// The directory holding a checkpoint's side files (itself, or a file's folder).
pub(crate) fn model_dir(p: &Path) -> PathBuf {
    if p.is_dir() {
        p.to_path_buf()
    } else {
        p.parent().unwrap_or(Path::new(".")).to_path_buf()
    }
}

/// The output vocabulary of a config and, per input, the input's row of each output
/// token: built as mergekit 0.1.5 builds them (`build_tokenizer`), read from the
/// inputs' `tokenizer.json` files.
#[derive(Debug)]
pub(crate) struct OutputVocab {
    settings: TokenizerConfig,
    /// The output tokenizer file, and the directory it was read from.
    file: TokenizerFile,
    from: PathBuf,
    /// Whether the file differs from the one in `from` (tokens stripped or added).
    changed: bool,
    /// Token text by output id.
    tokens: Vec<String>,
    /// Rows of the remapped tensors (the vocabulary, padded).
    rows: usize,
    /// Per input: its vocabulary (the base's when it has none) and `vocab_size`.
    inputs: Vec<(BTreeMap<String, u64>, u64)>,
    paths: Vec<PathBuf>,
}

impl OutputVocab {
    /// Builds the output vocabulary of `settings` over `inputs` (every model of the
    /// config, once each), `base` being the base model's index (or the first's).
    ///
    /// `union` takes the base's tokens with their ids, then each other input's tokens
    /// (in the config's order, each input's in id order; tokens at ids beyond an
    /// input's `vocab_size` left out), then the inputs' added tokens (the first
    /// settings seen); `base` the base's (stripped of tokens beyond its `vocab_size`);
    /// a model path that model's. The tokens of `tokens:` are added last. mergekit
    /// walks the inputs in an unordered set and their tokens in hash order, so the ids
    /// of tokens new to the base differ between its runs; modelfusion's order is
    /// fixed.
    pub(crate) fn build(
        settings: &TokenizerConfig,
        inputs: &[PathBuf],
        base: usize,
    ) -> Result<OutputVocab> {
        let base_dir = model_dir(&inputs[base]);
        let mut base_tok = TokenizerFile::read(&base_dir)?;
        let base_size = config_vocab_size(&base_dir).unwrap_or(base_tok.vocab.len() as u64);
        let stripped = base_tok.strip(base_size, &inputs[base])?;
        let mut files: Vec<Option<TokenizerFile>> = Vec::new();
        let mut sizes = Vec::new();
        for (i, p) in inputs.iter().enumerate() {
            let dir = model_dir(p);
            let file = if i == base {
                Some(base_tok.clone())
            } else if TokenizerFormat::of(&dir).is_some() {
                Some(TokenizerFile::read(&dir)?)
            } else {
                None
            };
            let n = file
                .as_ref()
                .map_or(base_tok.vocab.len(), |f| f.vocab.len());
            sizes.push(config_vocab_size(&dir).unwrap_or(n as u64));
            files.push(file);
        }
        let (mut file, from, mut changed) = match &settings.source {
            TokenizerSource::Model(p) => (TokenizerFile::read(&model_dir(p))?, model_dir(p), false),
            TokenizerSource::Base => (base_tok.clone(), base_dir.clone(), stripped),
            TokenizerSource::Union => {
                let mut out = base_tok.clone();
                let order = std::iter::once(base).chain((0..inputs.len()).filter(|&i| i != base));
                let (mut plain, mut added): (Vec<&str>, Vec<(&str, &serde_json::Value)>) =
                    (Vec::new(), Vec::new());
                let (mut seen, mut seen_added) = (HashSet::new(), HashSet::new());
                for i in order {
                    let Some(f) = &files[i] else { continue };
                    for (t, id) in f.by_id() {
                        if id < sizes[i] && !f.added.contains_key(t) && seen.insert(t) {
                            plain.push(t);
                        }
                    }
                    let mut ad: Vec<(&str, u64, &serde_json::Value)> = f
                        .added
                        .iter()
                        .map(|(t, e)| (t.as_str(), f.vocab[t], e))
                        .collect();
                    ad.sort_by_key(|(_, id, _)| *id);
                    for (t, id, e) in ad {
                        if id < sizes[i] && seen_added.insert(t) {
                            added.push((t, e));
                        }
                    }
                }
                for t in plain {
                    if !seen_added.contains(t) && !base_tok.vocab.contains_key(t) {
                        out.add(t, None);
                    }
                }
                for (t, e) in added {
                    out.add(t, Some(e));
                }
                let changed =
                    stripped || out.vocab != base_tok.vocab || out.added != base_tok.added;
                (out, base_dir.clone(), changed)
            }
        };
        for (t, _) in &settings.tokens {
            if !file.vocab.contains_key(t) {
                file.add(t, None);
                changed = true;
            }
        }
        let mut tokens = vec![None; file.vocab.len()];
        for (t, &id) in &file.vocab {
            match usize::try_from(id).ok().and_then(|i| tokens.get_mut(i)) {
                Some(slot) => *slot = Some(t.clone()),
                None => {
                    return Err(Error::invalid(
                        "tokenizer_source",
                        format!(
                            "the output vocabulary ({} tokens, from {}) has token `{t}` at id {id}: its ids are not 0..{}",
                            file.vocab.len(),
                            from.display(),
                            file.vocab.len()
                        ),
                    ));
                }
            }
        }
        let tokens: Vec<String> = tokens.into_iter().map(Option::unwrap_or_default).collect();
        let vocab = tokens.len();
        let rows = match settings.pad_to_multiple_of {
            Some(m) => vocab.div_ceil(m) * m,
            None => vocab,
        };
        let inputs_vocab = files
            .into_iter()
            .zip(sizes)
            .map(|(f, n)| (f.map_or_else(|| base_tok.vocab.clone(), |f| f.vocab), n))
            .collect();
        Ok(OutputVocab {
            settings: settings.clone(),
            file,
            from,
            changed,
            tokens,
            rows,
            inputs: inputs_vocab,
            paths: inputs.to_vec(),
        })
    }

    /// Rows of the remapped embedding and LM head (the config's `vocab_size`).
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// The tokenizer files written beside the output: those of the model the
    /// vocabulary comes from, with `tokenizer.json` (and the `added_tokens_decoder` of
    /// `tokenizer_config.json`) rewritten when tokens were stripped or added; the
    /// files that would then disagree with it (`tokenizer.model`, `vocab.json`,
    /// `merges.txt`, `added_tokens.json`) are left out, as mergekit's re-saved
    /// tokenizer has none. A tokenizer without `tokenizer.json` keeps its files, and
    /// the added tokens past its vocabulary are written to `added_tokens.json`.
    pub(crate) fn side_files(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let mut side: Vec<(String, Vec<u8>)> = crate::io::side_files(&self.from, None)?
            .into_iter()
            .filter(|(n, _)| !matches!(n.as_str(), "config.json" | "generation_config.json"))
            .collect();
        if !self.changed {
            return Ok(side);
        }
        let added = &self.file.added;
        if self.file.format == TokenizerFormat::Json {
            side.retain(|(n, _)| {
                !matches!(
                    n.as_str(),
                    "tokenizer.model" | "vocab.json" | "merges.txt" | "added_tokens.json"
                )
            });
            let json = serde_json::to_string_pretty(&self.file.to_json())
                .map_err(|e| Error::invalid("tokenizer.json", e.to_string()))?;
            side.retain(|(n, _)| n != "tokenizer.json");
            side.push(("tokenizer.json".into(), (json + "\n").into_bytes()));
        } else {
            // The model's own files stay as they are; the tokens added past its
            // vocabulary go to `added_tokens.json`, as transformers' slow tokenizers
            // save them.
            let new: serde_json::Map<String, serde_json::Value> = added
                .iter()
                .filter_map(|(t, e)| {
                    let id = e.get("id").and_then(serde_json::Value::as_u64)?;
                    (id >= self.file.model_len as u64).then(|| (t.clone(), id.into()))
                })
                .collect();
            let json = serde_json::to_string_pretty(&new)
                .map_err(|e| Error::invalid("added_tokens.json", e.to_string()))?;
            side.retain(|(n, _)| n != "added_tokens.json" && n != "tokenizer.json");
            side.push(("added_tokens.json".into(), (json + "\n").into_bytes()));
        }
        edit_json(&mut side, "tokenizer_config.json", |obj| {
            if let Some(serde_json::Value::Object(dec)) = obj.get_mut("added_tokens_decoder") {
                dec.clear();
                for e in added.values() {
                    let mut e = e.clone();
                    let id = e.get("id").cloned().unwrap_or_default();
                    if let Some(m) = e.as_object_mut() {
                        m.remove("id");
                    }
                    dec.insert(id.to_string(), e);
                }
            }
        })?;
        Ok(side)
    }

    /// How the rows of one tensor's sources map to the output's: `sources` are the
    /// inputs (indices among the config's) of the tensor `tensor`, `rows` their row
    /// counts, `base` the base model's input index when the merge has one. Each
    /// output token takes the source's own row when it has the token; otherwise (or
    /// for every source, with `force`) a row shared by all: the `tokens:` setting's,
    /// else the one model's that has it, the base's, the mean over the sources that
    /// have it, or zeros (none has it) — mergekit's `PermutedVocabulary`. Rows past
    /// the vocabulary (`pad_to_multiple_of`) are the mean of each source's others.
    pub(crate) fn remap(
        &self,
        tensor: &str,
        sources: &[usize],
        rows: &[usize],
        base: Option<usize>,
    ) -> Result<RowRemap> {
        let slot_of = |m: &Path, token: &str| {
            sources
                .iter()
                .position(|&i| self.paths[i] == m)
                .ok_or_else(|| {
                    Error::invalid(
                        format!("tokenizer.tokens.{token}"),
                        format!(
                            "takes its row from `{}`, which is not a source of tensor `{tensor}`",
                            m.display()
                        ),
                    )
                })
        };
        let base_slot = base.and_then(|b| sources.iter().position(|&i| i == b));
        let mut mixes: Vec<Vec<(usize, usize)>> = Vec::new();
        let mut slots = vec![Vec::with_capacity(self.tokens.len()); sources.len()];
        for tok in &self.tokens {
            let present = sources
                .iter()
                .zip(rows)
                .map(|(&i, &n)| {
                    let (vocab, size) = &self.inputs[i];
                    match vocab.get(tok).filter(|&&id| id < *size) {
                        Some(&id) if (id as usize) < n => Ok(Some(id as usize)),
                        Some(&id) => Err(Error::invalid(
                            "tokenizer_source",
                            format!(
                                "token `{tok}` is id {id} of {}, whose `{tensor}` has {n} rows",
                                self.paths[i].display()
                            ),
                        )),
                        None => Ok(None),
                    }
                })
                .collect::<Result<Vec<Option<usize>>>>()?;
            let cfg = self.settings.token(tok);
            let force = cfg.is_some_and(|c| c.force);
            if !force && present.iter().all(Option::is_some) {
                for (s, p) in slots.iter_mut().zip(&present) {
                    s.push(RowFrom::Own(p.unwrap_or_default()));
                }
                continue;
            }
            let have: Vec<(usize, usize)> = present
                .iter()
                .enumerate()
                .filter_map(|(s, p)| p.map(|r| (s, r)))
                .collect();
            let mix = match cfg.map(|c| &c.source) {
                Some(EmbeddingSource::Zero) => Vec::new(),
                Some(EmbeddingSource::Model(m)) => {
                    let s = slot_of(m, tok)?;
                    let r = present[s].ok_or_else(|| {
                        Error::invalid(
                            format!("tokenizer.tokens.{tok}"),
                            format!(
                                "takes its row from `{}`, which lacks the token",
                                m.display()
                            ),
                        )
                    })?;
                    vec![(s, r)]
                }
                Some(EmbeddingSource::ModelToken { model, token }) => {
                    let s = slot_of(model, tok)?;
                    let id = match token {
                        TokenRef::Id(id) => *id,
                        TokenRef::Text(t) => {
                            *self.inputs[sources[s]].0.get(t).ok_or_else(|| {
                                Error::invalid(
                                    format!("tokenizer.tokens.{tok}"),
                                    format!(
                                        "token `{t}` is not in the vocabulary of `{}`",
                                        model.display()
                                    ),
                                )
                            })?
                        }
                    };
                    if id as usize >= rows[s] {
                        return Err(Error::invalid(
                            format!("tokenizer.tokens.{tok}"),
                            format!(
                                "token id {id} is out of range: `{tensor}` of `{}` has {} rows",
                                model.display(),
                                rows[s]
                            ),
                        ));
                    }
                    vec![(s, id as usize)]
                }
                None => match (have.len(), base_slot) {
                    (0 | 1, _) => have,
                    (_, Some(b)) if present[b].is_some() => {
                        have.into_iter().filter(|(s, _)| *s == b).collect()
                    }
                    _ => have,
                },
            };
            let k = mixes.len();
            mixes.push(mix);
            for (s, p) in slots.iter_mut().zip(&present) {
                s.push(match p {
                    Some(r) if !force => RowFrom::Own(*r),
                    _ => RowFrom::Mix(k),
                });
            }
        }
        Ok(RowRemap {
            rows: self.rows,
            slots,
            mixes,
        })
    }
}

/// Where one output row of a source comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RowFrom {
    /// The source's own row.
    Own(usize),
    /// A row shared by the sources (an index among [`RowRemap`]'s mixes).
    Mix(usize),
}

/// How the rows of one tensor's sources (an embedding or LM head) map to the output
/// vocabulary's, built by the config's vocabulary for the tensor's sources. Applied
/// to the source tensors as they stream by, before they are merged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RowRemap {
    rows: usize,
    /// Per source: the origin of each row of the vocabulary (not of the padding).
    slots: Vec<Vec<RowFrom>>,
    /// Shared rows: the mean of these `(source, row)` rows (zeros when empty).
    mixes: Vec<Vec<(usize, usize)>>,
}

impl RowRemap {
    /// The sources `ts` (rows of their own, the rest of their shapes equal) with their
    /// rows remapped: `rows` rows each, shared rows summed in source order then
    /// divided by their count (as mergekit sums them), padding rows the mean of the
    /// others.
    pub(crate) fn apply<T: IoScalar>(&self, ts: &[&ArrayD<T>]) -> Result<Vec<ArrayD<T>>> {
        let rest: Vec<usize> = ts
            .first()
            .map(|t| t.shape()[1..].to_vec())
            .unwrap_or_default();
        let width: usize = rest.iter().product();
        let flat: Vec<std::borrow::Cow<'_, [T]>> = ts
            .iter()
            .map(|t| match t.as_slice() {
                Some(s) => std::borrow::Cow::Borrowed(s),
                None => std::borrow::Cow::Owned(t.iter().copied().collect()),
            })
            .collect();
        let row = |s: usize, r: usize| &flat[s][r * width..(r + 1) * width];
        let shared: Vec<Vec<T>> = self
            .mixes
            .iter()
            .map(|mix| {
                let mut acc = vec![T::zero(); width];
                for &(s, r) in mix {
                    for (a, x) in acc.iter_mut().zip(row(s, r)) {
                        *a += *x;
                    }
                }
                if mix.len() > 1 {
                    let n = T::cast_from_f64(mix.len() as f64);
                    acc.iter_mut().for_each(|a| *a /= n);
                }
                acc
            })
            .collect();
        let mut shape = vec![self.rows];
        shape.extend(&rest);
        self.slots
            .iter()
            .enumerate()
            .map(|(s, from)| {
                let mut out: Vec<T> = Vec::with_capacity(self.rows * width);
                for f in from {
                    out.extend_from_slice(match *f {
                        RowFrom::Own(r) => row(s, r),
                        RowFrom::Mix(k) => &shared[k],
                    });
                }
                if self.rows > from.len() && !from.is_empty() {
                    let mut mean = vec![0f64; width];
                    for chunk in out.chunks(width) {
                        for (m, x) in mean.iter_mut().zip(chunk) {
                            *m += x.cast_to_f64();
                        }
                    }
                    let mean: Vec<T> = mean
                        .iter()
                        .map(|m| T::cast_from_f64(m / from.len() as f64))
                        .collect();
                    for _ in from.len()..self.rows {
                        out.extend_from_slice(&mean);
                    }
                }
                out.resize(self.rows * width, T::zero());
                ArrayD::from_shape_vec(IxDyn(&shape), out)
                    .map_err(|e| Error::invalid("vocabulary remap", e.to_string()))
            })
            .collect()
    }
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

/// `tokenizer:` as written: the block, and its `tokens` in the order written (a JSON
/// map is sorted; mergekit adds missing tokens in the order written).
///
/// ```
/// use modelfusion::config::RawTokenizer;
/// let t: RawTokenizer = serde_saphyr::from_str("source: base\ntokens:\n  zz: {source: {kind: zero}}\n  aa: {source: {kind: zero}}\n").unwrap();
/// assert_eq!(t.tokens[0].0, "zz");
/// assert_eq!(t.block["source"], "base");
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct RawTokenizer {
    /// The block (any value: a bad one is reported by [`TokenizerConfig::parse_block`]).
    pub block: serde_json::Value,
    /// The entries of `tokens`, in order (empty when it is not a map).
    pub tokens: Vec<(String, serde_json::Value)>,
}

/// A map's entries in the order written.
struct Ordered<V>(Vec<(String, V)>);

impl<'de, V: serde::Deserialize<'de>> serde::Deserialize<'de> for Ordered<V> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visit<V>(std::marker::PhantomData<V>);
        impl<'de, V: serde::Deserialize<'de>> serde::de::Visitor<'de> for Visit<V> {
            type Value = Ordered<V>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Ordered<V>, A::Error> {
                let mut out = Vec::new();
                while let Some(e) = m.next_entry::<String, V>()? {
                    out.push(e);
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
    }
}

impl<'de> serde::Deserialize<'de> for RawTokenizer {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Item {
            Map(Ordered<serde_json::Value>),
            Other(serde_json::Value),
        }
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Block(Ordered<Item>),
            Other(serde_json::Value),
        }
        let repr = Repr::deserialize(d).map_err(|_| {
            <D::Error as serde::de::Error>::custom(
                "`tokenizer` is not a value of strings, numbers and maps with string keys; write it as {source, tokens, pad_to_multiple_of}, and quote `tokens` keys that YAML reads as booleans, numbers or null (y, n, on, off, 1, ~)",
            )
        })?;
        Ok(match repr {
            Repr::Other(block) => RawTokenizer {
                block,
                tokens: Vec::new(),
            },
            Repr::Block(Ordered(entries)) => {
                let mut block = serde_json::Map::new();
                let mut tokens = Vec::new();
                for (k, item) in entries {
                    let v = match item {
                        Item::Map(Ordered(es)) => {
                            if k == "tokens" {
                                tokens = es.clone();
                            }
                            serde_json::Value::Object(es.into_iter().collect())
                        }
                        Item::Other(v) => v,
                    };
                    block.insert(k, v);
                }
                RawTokenizer {
                    block: serde_json::Value::Object(block),
                    tokens,
                }
            }
        })
    }
}
