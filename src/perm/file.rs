//! Spec files: a human-editable JSON form of a [`PermutationSpec`], with loops over
//! layer indices so that a deep network's spec is a few lines.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{AxisRule, HeadLayout, HeadSlot, PermutationSpec, Role, SpecBuilder};
use crate::error::{Error, Result};

/// The format version written into (and required of) spec files.
pub const SPEC_FILE_VERSION: u32 = 1;

/// Largest spec file read, in bytes.
const MAX_SPEC_FILE: u64 = 64 << 20;

/// One `(param, axis)` placed explicitly.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct ParamEntry {
    param: String,
    axis: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    role: Option<String>,
    #[serde(default = "one", skip_serializing_if = "is_one")]
    repeat: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    slot: Option<String>,
}

/// The head layout of an attention group.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct HeadsEntry {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    #[serde(default, skip_serializing_if = "is_zero")]
    rotary_dim: usize,
}

fn is_zero(r: &usize) -> bool {
    *r == 0
}

fn one() -> usize {
    1
}
fn is_one(r: &usize) -> bool {
    *r == 1
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct FlattenEntry {
    layer: String,
    spatial: usize,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct TieEntry {
    param: String,
    source: String,
}

/// A loop variable's values: `"0..3"` (exclusive), `"1..=3"` (inclusive) or a list.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
enum Range {
    Text(String),
    List(Vec<i64>),
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct Rule {
    #[serde(rename = "for", default, skip_serializing_if = "BTreeMap::is_empty")]
    each: BTreeMap<String, Range>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    heads: Option<HeadsEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    producer: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    producer_bias: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    consumer: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    flatten_consumer: Vec<FlattenEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    batch_norm: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    layer_norm: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    rms_norm: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    params: Vec<ParamEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    invariant: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    passive: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    tied: Vec<TieEntry>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct SpecFile {
    modelfusion_spec: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    family: Option<String>,
    rules: Vec<Rule>,
}

fn bad(reason: impl Into<String>) -> Error {
    Error::Format {
        format: "spec file",
        path: None,
        reason: reason.into(),
    }
}

fn values(var: &str, r: &Range) -> Result<Vec<i64>> {
    let text = match r {
        Range::List(v) => return Ok(v.clone()),
        Range::Text(t) => t.trim(),
    };
    let parse = |s: &str| -> Result<i64> {
        s.trim().parse().map_err(|_| {
            bad(format!(
                "loop variable `{var}`: `{text}` is not a range like \"0..3\" or \"1..=3\""
            ))
        })
    };
    let (lo, hi) = match text.split_once("..=") {
        Some((a, b)) => (parse(a)?, parse(b)?.saturating_add(1)),
        None => match text.split_once("..") {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => {
                return Err(bad(format!(
                    "loop variable `{var}`: `{text}` is not a range like \"0..3\" or \"1..=3\""
                )));
            }
        },
    };
    if hi.saturating_sub(lo) > 1_000_000 {
        return Err(bad(format!(
            "loop variable `{var}`: range `{text}` is too long"
        )));
    }
    Ok((lo..hi).collect())
}

/// Substitutes `{var}`, `{var+k}` and `{var-k}` in `template`.
fn expand(template: &str, env: &BTreeMap<String, i64>) -> Result<String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| bad(format!("unclosed `{{` in `{template}`")))?
            + open;
        let expr: String = rest[open + 1..close]
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        let (name, offset) = match expr.find(['+', '-']) {
            Some(k) => {
                let off: i64 = expr[k..].trim_start_matches('+').parse().map_err(|_| {
                    bad(format!(
                        "`{{{expr}}}` in `{template}`: expected {{var}}, {{var+k}} or {{var-k}}"
                    ))
                })?;
                (&expr[..k], off)
            }
            None => (expr.as_str(), 0),
        };
        let v = env.get(name).ok_or_else(|| {
            bad(format!(
                "`{{{expr}}}` in `{template}` names no loop variable (have: {:?})",
                env.keys().collect::<Vec<_>>()
            ))
        })?;
        out.push_str(&(v + offset).to_string());
        rest = &rest[close + 1..];
    }
    if rest.contains('}') {
        return Err(bad(format!("unopened `}}` in `{template}`")));
    }
    out.push_str(rest);
    Ok(out)
}

fn parse_role(s: &str) -> Result<Role> {
    match s {
        "produce" => Ok(Role::Produce),
        "consume" => Ok(Role::Consume),
        "follow" => Ok(Role::Follow),
        _ => Err(bad(format!(
            "role `{s}`: expected one of produce, consume, follow"
        ))),
    }
}

/// Every assignment of the rule's loop variables, in order (last variable fastest).
fn environments(each: &BTreeMap<String, Range>) -> Result<Vec<BTreeMap<String, i64>>> {
    let mut envs = vec![BTreeMap::new()];
    for (var, r) in each {
        let vals = values(var, r)?;
        envs = envs
            .into_iter()
            .flat_map(|e| {
                vals.iter().map(move |&v| {
                    let mut e = e.clone();
                    e.insert(var.clone(), v);
                    e
                })
            })
            .collect();
        if envs.len() > 10_000_000 {
            return Err(bad("loops expand to more than 10^7 rules"));
        }
    }
    Ok(envs)
}

impl Rule {
    fn add_to(&self, b: &mut SpecBuilder, env: &BTreeMap<String, i64>) -> Result<()> {
        let x = |t: &str| expand(t, env);
        let has_axes = !(self.producer.is_empty()
            && self.producer_bias.is_empty()
            && self.consumer.is_empty()
            && self.flatten_consumer.is_empty()
            && self.batch_norm.is_empty()
            && self.layer_norm.is_empty()
            && self.rms_norm.is_empty()
            && self.params.is_empty());
        if has_axes {
            let g = match &self.group {
                Some(g) => x(g)?,
                None => {
                    return Err(bad(
                        "a rule with producer/consumer/norm/params entries needs a `group`",
                    ));
                }
            };
            for l in &self.producer {
                b.producer(&g, &x(l)?, false);
            }
            for l in &self.producer_bias {
                b.producer(&g, &x(l)?, true);
            }
            for l in &self.consumer {
                b.consumer(&g, &x(l)?);
            }
            for f in &self.flatten_consumer {
                b.flatten_consumer(&g, &x(&f.layer)?, f.spatial);
            }
            for l in &self.batch_norm {
                b.batch_norm(&g, &x(l)?);
            }
            for l in &self.layer_norm {
                b.layer_norm(&g, &x(l)?);
            }
            for l in &self.rms_norm {
                b.rms_norm(&g, &x(l)?);
            }
            if let Some(h) = &self.heads {
                let layout = HeadLayout::new(h.heads, h.kv_heads, h.head_dim)
                    .and_then(|l| l.with_rotary_dim(h.rotary_dim))
                    .map_err(|e| bad(e.to_string()))?;
                b.attention(&g, layout);
            }
            for p in &self.params {
                let role = p.role.as_deref().map(parse_role).transpose()?;
                if let Some(slot) = &p.slot {
                    let slot: HeadSlot = slot.parse().map_err(|e: Error| bad(e.to_string()))?;
                    let role = role.ok_or_else(|| {
                        bad(format!("`{}` has a head slot but no `role`", p.param))
                    })?;
                    b.head_param(&g, x(&p.param)?, p.axis, role, slot);
                    continue;
                }
                b.param(
                    g.clone(),
                    x(&p.param)?,
                    p.axis,
                    AxisRule {
                        role,
                        repeat: p.repeat,
                    },
                );
            }
        } else if self.group.is_some() {
            return Err(bad(format!(
                "rule for group `{}` lists no parameters",
                self.group.as_deref().unwrap_or_default()
            )));
        }
        for p in &self.invariant {
            b.invariant(x(p)?);
        }
        for p in &self.passive {
            b.passive(x(p)?);
        }
        for t in &self.tied {
            b.tied(x(&t.param)?, x(&t.source)?);
        }
        Ok(())
    }
}

impl PermutationSpec {
    /// Parses a spec file (JSON). The file is a list of `rules`; each rule may loop over
    /// layer indices (`"for": {"i": "0..3"}`, `"1..=3"`, or a list) and substitutes
    /// `{i}`, `{i+1}`, `{i-1}` in every name, and names a `group` with its members in the
    /// [`SpecBuilder`] vocabulary: `producer` (weight axis 0), `producer_bias` (and the
    /// bias), `consumer` (weight axis 1), `flatten_consumer` (`{"layer", "spatial"}`),
    /// `batch_norm`, `layer_norm`, `rms_norm`, or explicit `params` (`{"param", "axis",
    /// "role"?, "repeat"?, "slot"?}`); an attention group has `"heads": {"heads",
    /// "kv_heads", "head_dim", "rotary_dim"?}` and a `slot` (`query`, `key`, `value`,
    /// `output`, `fused_qkv`) and `role` on each of its `params`; `invariant`, `passive`
    /// and `tied` (`{"param", "source"}`) lists may appear in any rule. Unknown keys are
    /// errors.
    ///
    /// ```
    /// use modelfusion::perm::{specs, PermutationSpec};
    /// let text = r#"{
    ///   "modelfusion_spec": 1,
    ///   "rules": [
    ///     {"for": {"i": "0..3"}, "group": "hidden.{i}",
    ///      "producer_bias": ["layers.{i}"], "consumer": ["layers.{i+1}"]},
    ///     {"invariant": ["layers.0.weight", "layers.3.weight", "layers.3.bias"]}
    ///   ]
    /// }"#;
    /// let spec = PermutationSpec::from_json(text)?;
    /// assert_eq!(spec, specs::mlp(3));
    /// assert_eq!(PermutationSpec::from_json(&spec.to_json()?)?, spec); // round trip
    /// assert!(PermutationSpec::from_json(r#"{"modelfusion_spec": 1, "rules": [{"grup": "x"}]}"#).is_err());
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn from_json(text: &str) -> Result<PermutationSpec> {
        let file: SpecFile = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        if file.modelfusion_spec != SPEC_FILE_VERSION {
            return Err(bad(format!(
                "`modelfusion_spec` is {}, this version reads {SPEC_FILE_VERSION}",
                file.modelfusion_spec
            )));
        }
        let mut b = SpecBuilder::new();
        for (k, rule) in file.rules.iter().enumerate() {
            for env in environments(&rule.each).map_err(|e| in_rule(e, k))? {
                rule.add_to(&mut b, &env).map_err(|e| in_rule(e, k))?;
            }
        }
        b.build()
    }

    /// Writes the spec as a spec file (JSON, one explicit rule per group, then the
    /// invariant and passive lists); [`from_json`](Self::from_json) reads it back
    /// equal.
    pub fn to_json(&self) -> Result<String> {
        self.to_json_with_family(None)
    }

    /// [`to_json`](Self::to_json) with a `family` line (what detected the spec).
    pub fn to_json_with_family(&self, family: Option<&str>) -> Result<String> {
        let mut rules: Vec<Rule> = self
            .groups()
            .map(|(g, members)| Rule {
                group: Some(g.to_string()),
                params: members
                    .iter()
                    .map(|(p, a)| {
                        let r = self.rule(p, *a);
                        ParamEntry {
                            param: p.clone(),
                            axis: *a,
                            role: r.role.map(|r| r.as_str().to_string()),
                            repeat: r.repeat,
                            slot: self.head_slot(p, *a).map(|(s, _)| s.as_str().to_string()),
                        }
                    })
                    .collect(),
                heads: self.head_layout(g).map(|l| HeadsEntry {
                    heads: l.heads(),
                    kv_heads: l.kv_heads(),
                    head_dim: l.head_dim(),
                    rotary_dim: l.rotary_dim(),
                }),
                ..Rule::default()
            })
            .collect();
        let invariant: Vec<String> = self.invariant_params().map(str::to_string).collect();
        let passive: Vec<String> = self.passive_params().map(str::to_string).collect();
        if !invariant.is_empty() || !passive.is_empty() {
            rules.push(Rule {
                invariant,
                passive,
                ..Rule::default()
            });
        }
        let file = SpecFile {
            modelfusion_spec: SPEC_FILE_VERSION,
            family: family.map(str::to_string),
            rules,
        };
        serde_json::to_string_pretty(&file)
            .map(|s| s + "\n")
            .map_err(|e| Error::invalid("spec", e.to_string()))
    }

    /// Reads a spec file from disk (see [`from_json`](Self::from_json)); errors name the
    /// file.
    pub fn load(path: impl AsRef<Path>) -> Result<PermutationSpec> {
        let path = path.as_ref();
        let io = |e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        if !meta.is_file() {
            return Err(Error::invalid(
                "spec file",
                format!("{} is not a regular file", path.display()),
            ));
        }
        if meta.len() > MAX_SPEC_FILE {
            return Err(Error::invalid(
                "spec file",
                format!(
                    "{} is {} bytes, above the limit of {MAX_SPEC_FILE}",
                    path.display(),
                    meta.len()
                ),
            ));
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        Self::from_json(&text).map_err(|e| match e {
            Error::Format { format, reason, .. } => Error::Format {
                format,
                path: Some(path.to_path_buf()),
                reason,
            },
            other => other,
        })
    }
}

fn in_rule(e: Error, k: usize) -> Error {
    match e {
        Error::Format {
            format,
            path,
            reason,
        } => Error::Format {
            format,
            path,
            reason: format!("rule {k}: {reason}"),
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::perm::specs::{self, Architecture};

    #[test]
    fn templates_and_ranges() {
        let env = BTreeMap::from([("i".to_string(), 2), ("j".to_string(), 0)]);
        assert_eq!(expand("a.{i}.b{j+1}.c{i-1}", &env).unwrap(), "a.2.b1.c1");
        assert!(expand("a.{k}", &env).is_err());
        assert!(expand("a.{i", &env).is_err());
        assert_eq!(
            values("i", &Range::Text("1..=3".into())).unwrap(),
            [1, 2, 3]
        );
        assert_eq!(values("i", &Range::Text("0..2".into())).unwrap(), [0, 1]);
        assert!(values("i", &Range::Text("x..2".into())).is_err());
        assert!(values("i", &Range::Text("3".into())).is_err());
    }

    #[test]
    fn ready_specs_round_trip() {
        for spec in [
            specs::mlp(2),
            specs::res_mlp(2),
            specs::ResNet::resnet20(1, 10).spec(),
            specs::Vgg::vgg16(1, 10).spec(),
        ] {
            let back = PermutationSpec::from_json(&spec.to_json().unwrap()).unwrap();
            assert_eq!(back, spec);
        }
    }

    #[test]
    fn resnet20_in_a_few_rules() {
        let text = r#"{"modelfusion_spec": 1, "rules": [
          {"group": "stream.1", "producer": ["conv1"], "batch_norm": ["bn1"]},
          {"for": {"s": "1..=3", "b": "0..3"}, "group": "layer{s}.{b}.inner",
           "producer": ["layer{s}.{b}.conv1"], "batch_norm": ["layer{s}.{b}.bn1"], "consumer": ["layer{s}.{b}.conv2"]},
          {"for": {"s": "1..=3", "b": "0..3"}, "group": "stream.{s}",
           "producer": ["layer{s}.{b}.conv2"], "batch_norm": ["layer{s}.{b}.bn2"]},
          {"for": {"s": "1..=3", "b": "1..3"}, "group": "stream.{s}", "consumer": ["layer{s}.{b}.conv1"]},
          {"group": "stream.1", "consumer": ["layer1.0.conv1"]},
          {"for": {"s": "2..=3"}, "group": "stream.{s-1}", "consumer": ["layer{s}.0.conv1", "layer{s}.0.shortcut.0"]},
          {"for": {"s": "2..=3"}, "group": "stream.{s}", "producer": ["layer{s}.0.shortcut.0"], "batch_norm": ["layer{s}.0.shortcut.1"]},
          {"group": "stream.3", "consumer": ["linear"], "invariant": ["conv1.weight", "linear.weight", "linear.bias"]}
        ]}"#;
        let spec = PermutationSpec::from_json(text).unwrap();
        assert_eq!(spec, specs::ResNet::resnet20(1, 10).spec());
    }
}
