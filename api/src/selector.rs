//! Kubernetes label selector matching (`matchLabels` and `matchExpressions`), the same
//! semantics as `metav1.LabelSelectorAsSelector`.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

pub type Labels = BTreeMap<String, String>;

/// Why a selector cannot be evaluated; the caller adds the object and field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error(
        "matchExpressions[{index}]: unknown operator {operator:?} (use In, NotIn, Exists or DoesNotExist)"
    )]
    UnknownOperator { index: usize, operator: String },
    #[error("matchExpressions[{index}]: operator {operator} needs at least one value")]
    MissingValues { index: usize, operator: String },
    #[error("matchExpressions[{index}]: operator {operator} takes no values")]
    UnexpectedValues { index: usize, operator: String },
}

/// Checks a selector once, so that [`matches`] can be total.
pub fn validate(selector: &LabelSelector) -> Result<(), SelectorError> {
    for (index, req) in selector.match_expressions.iter().flatten().enumerate() {
        let has_values = req.values.as_ref().is_some_and(|v| !v.is_empty());
        let operator = req.operator.clone();
        match req.operator.as_str() {
            "In" | "NotIn" if !has_values => {
                return Err(SelectorError::MissingValues { index, operator });
            }
            "Exists" | "DoesNotExist" if has_values => {
                return Err(SelectorError::UnexpectedValues { index, operator });
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            _ => return Err(SelectorError::UnknownOperator { index, operator }),
        }
    }
    Ok(())
}

/// Whether `labels` satisfy the selector. An empty selector matches everything; an
/// invalid one (see [`validate`]) matches nothing.
pub fn matches(selector: &LabelSelector, labels: &Labels) -> bool {
    if validate(selector).is_err() {
        return false;
    }
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions_ok = selector.match_expressions.iter().flatten().all(|req| {
        let value = labels.get(&req.key);
        let values = req.values.as_deref().unwrap_or_default();
        match req.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_ok && expressions_ok
}

/// Whether any selector of a non-empty list matches (how MetalLB reads selector lists).
pub fn any_matches(selectors: &[LabelSelector], labels: &Labels) -> bool {
    selectors.iter().any(|s| matches(s, labels))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelector {
        LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: key.into(),
                operator: op.into(),
                values: (!values.is_empty())
                    .then(|| values.iter().map(|s| s.to_string()).collect()),
            }]),
            ..Default::default()
        }
    }

    #[test]
    fn empty_selector_matches_everything() {
        assert!(matches(&LabelSelector::default(), &labels(&[])));
    }

    #[test]
    fn match_labels_needs_every_pair() {
        let sel = LabelSelector {
            match_labels: Some(labels(&[("team", "a"), ("env", "prod")])),
            ..Default::default()
        };
        assert!(matches(
            &sel,
            &labels(&[("team", "a"), ("env", "prod"), ("x", "y")])
        ));
        assert!(!matches(&sel, &labels(&[("team", "a")])));
    }

    #[test]
    fn operators() {
        let l = labels(&[("tier", "web")]);
        assert!(matches(&expr("tier", "In", &["web", "db"]), &l));
        assert!(!matches(&expr("tier", "NotIn", &["web"]), &l));
        assert!(matches(&expr("other", "NotIn", &["web"]), &l));
        assert!(matches(&expr("tier", "Exists", &[]), &l));
        assert!(matches(&expr("other", "DoesNotExist", &[]), &l));
        assert!(!matches(&expr("tier", "Bogus", &[]), &l));
    }

    #[test]
    fn invalid_selectors_are_named() {
        let err = validate(&expr("tier", "in", &["web"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown operator \"in\""), "{err}");
        let err = validate(&expr("tier", "In", &[])).unwrap_err().to_string();
        assert!(err.contains("needs at least one value"), "{err}");
    }
}
