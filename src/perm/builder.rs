//! [`SpecBuilder`]: the vocabulary permutation specs are written in.

use super::{AxisRule, HeadLayout, HeadSlot, PermutationSpec, Role};
use crate::error::{Error, Result};

/// Builds a [`PermutationSpec`] in the vocabulary of layers: producers, consumers,
/// norms, flattens, tied and invariant parameters. Names follow PyTorch (`layer.weight`
/// of shape `(out, in, ...)`, `layer.bias`); for other layouts, [`param`](Self::param)
/// places any `(param, axis)` with an explicit role.
///
/// Methods take `&mut self` and return it, so they chain and also work in loops;
/// [`build`](Self::build) checks the whole spec once (an axis claimed by two groups, a
/// tie to an unknown parameter) and is the only fallible step.
///
/// A *residual stream* is simply one group that several layers produce and consume:
/// every block of a ResNet stage reads and writes the same channels.
///
/// ```
/// use modelfusion::perm::{Role, SpecBuilder};
/// // torchvision-style VGG head: conv features (64 channels, 7x7) -> flatten -> MLP.
/// let mut b = SpecBuilder::new();
/// b.producer("conv.0", "features.0", true)
///     .batch_norm("conv.0", "features.1")
///     .flatten_consumer("conv.0", "classifier.0", 49)
///     .producer("fc.0", "classifier.0", true)
///     .consumer("fc.0", "classifier.3")
///     .invariant("features.0.weight")
///     .invariant("classifier.3.weight")
///     .invariant("classifier.3.bias");
/// let spec = b.build()?;
/// assert_eq!(spec.rule("classifier.0.weight", 1).repeat, 49);
/// assert_eq!(spec.rule("classifier.0.weight", 1).role, Some(Role::Consume));
/// assert!(spec.is_passive("features.1.running_var"));
/// # Ok::<(), modelfusion::Error>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct SpecBuilder {
    entries: Vec<(String, String, usize, AxisRule)>,
    invariant: Vec<String>,
    passive: Vec<String>,
    ties: Vec<(String, String)>,
    heads: Vec<(String, HeadLayout)>,
    slots: Vec<(String, usize, HeadSlot)>,
}

fn rule(role: Role) -> AxisRule {
    AxisRule {
        role: Some(role),
        repeat: 1,
    }
}

impl SpecBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Group `group` reorders `axis` of `param`, with the given rule (role and repeat).
    ///
    /// ```
    /// use modelfusion::perm::{AxisRule, Role, SpecBuilder};
    /// // A flax Dense kernel is (in, out): it produces on axis 1.
    /// let mut b = SpecBuilder::new();
    /// b.param("h", "dense1.kernel", 1, AxisRule { role: Some(Role::Produce), repeat: 1 });
    /// b.param("h", "dense2.kernel", 0, AxisRule { role: Some(Role::Consume), repeat: 1 });
    /// assert_eq!(b.build()?.role("dense1.kernel", 1, 2), Role::Produce);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn param(
        &mut self,
        group: impl Into<String>,
        param: impl Into<String>,
        axis: usize,
        rule: AxisRule,
    ) -> &mut Self {
        self.entries.push((group.into(), param.into(), axis, rule));
        self
    }

    /// `layer` writes `group`: axis 0 of `layer.weight`, and `layer.bias` if `bias`.
    pub fn producer(&mut self, group: &str, layer: &str, bias: bool) -> &mut Self {
        self.param(group, format!("{layer}.weight"), 0, rule(Role::Produce));
        if bias {
            self.param(group, format!("{layer}.bias"), 0, rule(Role::Follow));
        }
        self
    }

    /// `layer` reads `group`: axis 1 of `layer.weight`.
    pub fn consumer(&mut self, group: &str, layer: &str) -> &mut Self {
        self.param(group, format!("{layer}.weight"), 1, rule(Role::Consume))
    }

    /// `layer` reads `group` through a flatten: axis 1 of `layer.weight` holds `spatial`
    /// consecutive features per channel (`H * W` of the flattened map).
    pub fn flatten_consumer(&mut self, group: &str, layer: &str, spatial: usize) -> &mut Self {
        self.param(
            group,
            format!("{layer}.weight"),
            1,
            AxisRule {
                role: Some(Role::Consume),
                repeat: spatial,
            },
        )
    }

    /// A BatchNorm layer on `group`: `weight`, `bias`, `running_mean`, `running_var`
    /// follow the group; the running statistics are passive (not matched).
    pub fn batch_norm(&mut self, group: &str, layer: &str) -> &mut Self {
        for p in ["weight", "bias", "running_mean", "running_var"] {
            self.param(group, format!("{layer}.{p}"), 0, rule(Role::Follow));
        }
        for p in ["running_mean", "running_var"] {
            self.passive.push(format!("{layer}.{p}"));
        }
        self
    }

    /// A LayerNorm on `group`: `weight` and `bias` follow it.
    pub fn layer_norm(&mut self, group: &str, layer: &str) -> &mut Self {
        for p in ["weight", "bias"] {
            self.param(group, format!("{layer}.{p}"), 0, rule(Role::Follow));
        }
        self
    }

    /// An RMSNorm on `group`: `weight` follows it.
    pub fn rms_norm(&mut self, group: &str, layer: &str) -> &mut Self {
        self.param(group, format!("{layer}.weight"), 0, rule(Role::Follow))
    }

    /// Makes `group` an attention group with `layout`: its permutations are structured
    /// (heads as blocks, head dimensions inside them, see [`HeadLayout`]) and every member
    /// is placed with [`head_param`](Self::head_param).
    pub fn attention(&mut self, group: &str, layout: HeadLayout) -> &mut Self {
        self.heads.push((group.to_string(), layout));
        self
    }

    /// Attention group `group` reorders `axis` of `param`, which holds `slot` (query,
    /// key, value or output-projection entries, or fused QKV) in the given role.
    pub fn head_param(
        &mut self,
        group: &str,
        param: impl Into<String>,
        axis: usize,
        role: Role,
        slot: HeadSlot,
    ) -> &mut Self {
        let param = param.into();
        self.slots.push((param.clone(), axis, slot));
        self.param(group, param, axis, rule(role))
    }

    /// The separate `q`, `k`, `v`, `o` linear layers (PyTorch layout) of an attention
    /// group: rows of `q`, `k`, `v` (and their biases if `qkv_bias`) and columns of `o`.
    /// `o`'s rows and bias belong to the residual stream, not to this group.
    ///
    /// ```
    /// use modelfusion::perm::{HeadLayout, SpecBuilder};
    /// let mut b = SpecBuilder::new();
    /// b.attention_layers("attn.0", HeadLayout::new(4, 2, 8)?, ["q", "k", "v", "o"], true);
    /// let spec = b.build()?;
    /// assert_eq!(spec.group("attn.0").unwrap().len(), 7);
    /// # Ok::<(), modelfusion::Error>(())
    /// ```
    pub fn attention_layers(
        &mut self,
        group: &str,
        layout: HeadLayout,
        [q, k, v, o]: [&str; 4],
        qkv_bias: bool,
    ) -> &mut Self {
        self.attention(group, layout);
        for (layer, slot) in [
            (q, HeadSlot::Query),
            (k, HeadSlot::Key),
            (v, HeadSlot::Value),
        ] {
            self.head_param(group, format!("{layer}.weight"), 0, Role::Produce, slot);
            if qkv_bias {
                self.head_param(group, format!("{layer}.bias"), 0, Role::Follow, slot);
            }
        }
        self.head_param(
            group,
            format!("{o}.weight"),
            1,
            Role::Consume,
            HeadSlot::Output,
        )
    }

    /// `param` is deliberately not permuted outside its groups (see
    /// [`PermutationSpec::with_invariant`]).
    pub fn invariant(&mut self, param: impl Into<String>) -> &mut Self {
        self.invariant.push(param.into());
        self
    }

    /// `param` is permuted with its groups but not matched (see
    /// [`PermutationSpec::with_passive`]).
    pub fn passive(&mut self, param: impl Into<String>) -> &mut Self {
        self.passive.push(param.into());
        self
    }

    /// `param` holds the same values as `source` (tied weights, e.g. an LM head tied to
    /// the embedding): it gets every axis rule of `source` when the spec is built, and is
    /// passive so that matching counts the tensor once.
    pub fn tied(&mut self, param: impl Into<String>, source: impl Into<String>) -> &mut Self {
        self.ties.push((param.into(), source.into()));
        self
    }

    /// The spec. Errors when an axis is claimed by two groups (or twice by one), an axis
    /// has repeat factor 0, or a tie names a source with no axis in any group.
    pub fn build(&self) -> Result<PermutationSpec> {
        let mut spec = PermutationSpec::default();
        for (g, p, a, r) in &self.entries {
            spec.claim(g, p.clone(), *a, *r)?;
        }
        for (param, source) in &self.ties {
            let axes: Vec<(usize, String)> = spec
                .param_axes(source)
                .map(|(a, g)| (a, g.to_string()))
                .collect();
            if axes.is_empty() {
                return Err(Error::Spec {
                    reason: format!("`{param}` is tied to `{source}`, which no group permutes"),
                });
            }
            for (a, g) in axes {
                let r = spec.rule(source, a);
                spec.claim(&g, param.clone(), a, r)?;
                if let Some(&(_, _, slot)) =
                    self.slots.iter().find(|(p, pa, _)| p == source && *pa == a)
                {
                    spec.slots.insert((param.clone(), a), slot);
                }
            }
            spec.passive.insert(param.clone());
        }
        spec.invariant.extend(self.invariant.iter().cloned());
        spec.passive.extend(self.passive.iter().cloned());
        for (g, layout) in &self.heads {
            if spec
                .heads
                .insert(g.clone(), *layout)
                .is_some_and(|l| l != *layout)
            {
                return Err(Error::Spec {
                    reason: format!("attention group `{g}` is given two head layouts"),
                });
            }
        }
        for (p, a, slot) in &self.slots {
            spec.slots.insert((p.clone(), *a), *slot);
        }
        spec.check_heads()?;
        Ok(spec.canonical())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_copy_rules_and_are_passive() {
        let mut b = SpecBuilder::new();
        b.param("d", "embed.weight", 1, rule(Role::Produce))
            .consumer("d", "block.fc")
            .tied("head.weight", "embed.weight");
        let spec = b.build().unwrap();
        assert_eq!(spec.axes("head.weight").unwrap(), vec![None, Some("d")]);
        assert_eq!(spec.rule("head.weight", 1).role, Some(Role::Produce));
        assert!(spec.is_passive("head.weight"));
        let mut bad = SpecBuilder::new();
        bad.tied("a", "nothing");
        assert!(bad.build().is_err());
        let mut twice = SpecBuilder::new();
        twice.consumer("a", "fc").consumer("b", "fc");
        assert!(twice.build().unwrap_err().to_string().contains("fc.weight"));
    }
}
