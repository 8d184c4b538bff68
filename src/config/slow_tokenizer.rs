//! Vocabularies of tokenizers saved without `tokenizer.json`, as transformers' slow
//! tokenizers keep them: a GPT-2 byte-level BPE (`vocab.json`, token -> id, beside
//! `merges.txt`) or a SentencePiece model (`tokenizer.model`, a protobuf `ModelProto`
//! whose `pieces` are the tokens in id order), with the added tokens of
//! `tokenizer_config.json` (`added_tokens_decoder`) and `added_tokens.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::io::read_capped;
use crate::{Error, Result};

/// Largest tokenizer file read.
const MAX_FILE: u64 = 256 << 20;

/// The model vocabulary of `vocab.json` in `dir`: token -> id.
pub(crate) fn read_vocab_json(dir: &Path) -> Result<BTreeMap<String, u64>> {
    let path = dir.join("vocab.json");
    let bytes = read_capped(&path, MAX_FILE, "vocab.json")?;
    let bad = |why: String| Error::Format {
        format: "vocab.json",
        path: Some(path.clone()),
        reason: why,
    };
    let json: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    let serde_json::Value::Object(map) = json else {
        return Err(bad("expected a map token -> id".into()));
    };
    map.into_iter()
        .map(|(t, id)| {
            let n = id
                .as_u64()
                .ok_or_else(|| bad(format!("token `{t}` has id `{id}`, not a whole number")))?;
            Ok((t, n))
        })
        .collect()
}

/// The pieces of the SentencePiece model `tokenizer.model` in `dir`, in id order.
pub(crate) fn read_sentencepiece(dir: &Path) -> Result<Vec<String>> {
    let path = dir.join("tokenizer.model");
    let bytes = read_capped(&path, MAX_FILE, "tokenizer.model")?;
    sentencepiece_pieces(&bytes).map_err(|why| Error::Format {
        format: "SentencePiece tokenizer.model",
        path: Some(path),
        reason: why,
    })
}

/// The `pieces` (field 1 of `ModelProto`, each a `SentencePiece` message whose field 1
/// is the piece's text) of a serialized SentencePiece model; every other field is
/// skipped by its wire type. Errors say where the bytes went wrong.
fn sentencepiece_pieces(bytes: &[u8]) -> std::result::Result<Vec<String>, String> {
    let mut r = Proto::new(bytes);
    let mut pieces = Vec::new();
    while let Some((field, wire)) = r.key()? {
        if field == 1 && wire == 2 {
            let at = r.pos;
            let msg = r.bytes()?;
            let mut m = Proto::new(msg);
            let mut piece = None;
            while let Some((f, w)) = m.key()? {
                if f == 1 && w == 2 {
                    let text = m.bytes()?;
                    piece =
                        Some(std::str::from_utf8(text).map_err(|_| {
                            format!("piece {} (byte {at}) is not UTF-8", pieces.len())
                        })?);
                } else {
                    m.skip(w)?;
                }
            }
            let piece = piece.ok_or_else(|| {
                format!("piece {} (byte {at}) has no text (field 1)", pieces.len())
            })?;
            pieces.push(piece.to_string());
        } else {
            r.skip(wire)?;
        }
    }
    if pieces.is_empty() {
        return Err("no pieces (field 1 of ModelProto): not a SentencePiece model".into());
    }
    Ok(pieces)
}

/// A protobuf reader over one message's bytes, every read bounds-checked.
struct Proto<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Proto<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Proto { buf, pos: 0 }
    }

    fn varint(&mut self) -> std::result::Result<u64, String> {
        let start = self.pos;
        let mut v = 0u64;
        for i in 0..10 {
            let b = *self
                .buf
                .get(self.pos)
                .ok_or_else(|| format!("truncated varint at byte {start}"))?;
            self.pos += 1;
            if i == 9 && b > 1 {
                return Err(format!("varint at byte {start} overflows 64 bits"));
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(format!("varint at byte {start} is longer than 10 bytes"))
    }

    /// The next field's number and wire type, `None` at the end.
    fn key(&mut self) -> std::result::Result<Option<(u64, u8)>, String> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let at = self.pos;
        let k = self.varint()?;
        let field = k >> 3;
        if field == 0 {
            return Err(format!("field number 0 at byte {at}"));
        }
        Ok(Some((field, (k & 7) as u8)))
    }

    fn take(&mut self, n: u64) -> std::result::Result<&'a [u8], String> {
        let left = self.buf.len() - self.pos;
        match usize::try_from(n) {
            Ok(n) if n <= left => {
                let s = &self.buf[self.pos..self.pos + n];
                self.pos += n;
                Ok(s)
            }
            _ => Err(format!(
                "a field of {n} bytes at byte {} runs past the end ({left} bytes left): truncated or corrupt",
                self.pos
            )),
        }
    }

    /// A length-delimited field's bytes.
    fn bytes(&mut self) -> std::result::Result<&'a [u8], String> {
        let n = self.varint()?;
        self.take(n)
    }

    fn skip(&mut self, wire: u8) -> std::result::Result<(), String> {
        match wire {
            0 => self.varint().map(drop),
            1 => self.take(8).map(drop),
            2 => self.bytes().map(drop),
            5 => self.take(4).map(drop),
            w => Err(format!(
                "wire type {w} before byte {} (groups and unknown types are not SentencePiece's)",
                self.pos
            )),
        }
    }
}

/// The added tokens of the tokenizer in `dir` saved without `tokenizer.json`: the
/// entries of `tokenizer_config.json`'s `added_tokens_decoder` (id -> settings), then
/// those of `added_tokens.json` (token -> id) it lacks, as `{id, content, ...}`
/// entries by content.
pub(crate) fn read_added(dir: &Path) -> Result<BTreeMap<String, serde_json::Value>> {
    let mut added = BTreeMap::new();
    let read = |name: &str| -> Result<Option<(serde_json::Value, PathBuf)>> {
        let path = dir.join(name);
        if !path.is_file() {
            return Ok(None);
        }
        let bytes = read_capped(&path, MAX_FILE, name)?;
        let v = serde_json::from_slice(&bytes).map_err(|e| Error::Format {
            format: "JSON",
            path: Some(path.clone()),
            reason: e.to_string(),
        })?;
        Ok(Some((v, path)))
    };
    let bad = |path: &Path, why: String| Error::Format {
        format: "JSON",
        path: Some(path.to_path_buf()),
        reason: why,
    };
    if let Some((cfg, path)) = read("tokenizer_config.json")?
        && let Some(dec) = cfg.get("added_tokens_decoder")
    {
        let dec = dec.as_object().ok_or_else(|| {
            bad(
                &path,
                format!("`added_tokens_decoder` is not a map id -> token: `{dec}`"),
            )
        })?;
        for (id, e) in dec {
            let n: u64 = id.parse().map_err(|_| {
                bad(
                    &path,
                    format!("added token id `{id}` is not a whole number"),
                )
            })?;
            let content = e
                .get("content")
                .and_then(serde_json::Value::as_str)
                .ok_or_else(|| bad(&path, format!("added token {id} has no `content`: `{e}`")))?;
            let mut entry = e.clone();
            entry["id"] = n.into();
            added.insert(content.to_string(), entry);
        }
    }
    if let Some((map, path)) = read("added_tokens.json")? {
        let map = map
            .as_object()
            .ok_or_else(|| bad(&path, "expected a map token -> id".into()))?;
        for (t, id) in map {
            let n = id
                .as_u64()
                .ok_or_else(|| bad(&path, format!("token `{t}` has id `{id}`")))?;
            added.entry(t.clone()).or_insert_with(|| {
                serde_json::json!({"id": n, "content": t, "single_word": false,
                    "lstrip": false, "rstrip": false, "normalized": false, "special": false})
            });
        }
    }
    Ok(added)
}
