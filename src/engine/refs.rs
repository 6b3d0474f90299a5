//! Step outputs as variables: `${{ steps.ID.FIELD[.KEY...] }}` inside step arguments.
//!
//! The references are found when a plan is compiled ([`find_refs`]), so an unknown step or
//! field is a compile-time error and each referenced step becomes an implicit `require`. They
//! are replaced just before the step runs ([`substitute`]), from the results so far.
//!
//! A string that is exactly one reference takes the referenced value with its JSON type (so
//! `retcode` stays a number); a reference inside a longer string is spliced in as text.
//! `${{ nodes.NAME.steps.ID.FIELD }}` names a step on another node; it parses here but only a
//! cluster run can resolve it: the compiler rejects it unless the plan is compiled for a cluster
//! ([`super::compile::CompileOptions::remote_refs`]), and at run time the run's
//! [`super::coord::Coordinator::remote`] supplies the value (waiting for the other node). It
//! adds no requisite, since the step it names is not in this node's plan.

use serde_json::Value;

use crate::error::{Error, Result};

/// One `${{ ... }}` reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepRef {
    /// `Some(node)` for `nodes.NODE.steps...`.
    pub node: Option<String>,
    pub step: String,
    /// `field` then any keys below it, e.g. `["changes", "diff"]`.
    pub path: Vec<String>,
}

const OPEN: &str = "${{";
const CLOSE: &str = "}}";

/// Splits a string into literal text and references.
fn scan(s: &str) -> Result<Vec<Piece>> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find(OPEN) {
        if start > 0 {
            out.push(Piece::Text(rest[..start].to_string()));
        }
        let after = &rest[start + OPEN.len()..];
        let end = after.find(CLOSE).ok_or_else(|| {
            Error::InvalidInput(format!(
                "unclosed ${{{{ in {s:?}: a step reference looks like ${{{{ steps.ID.stdout }}}}"
            ))
        })?;
        out.push(Piece::Ref(parse_ref(after[..end].trim())?));
        rest = &after[end + CLOSE.len()..];
    }
    if !rest.is_empty() {
        out.push(Piece::Text(rest.to_string()));
    }
    Ok(out)
}

enum Piece {
    Text(String),
    Ref(StepRef),
}

/// Parses `steps.ID.field.key`, `steps["ID with.dots"].field` or `nodes.N.steps.ID.field`.
pub fn parse_ref(expr: &str) -> Result<StepRef> {
    let bad = || {
        Error::InvalidInput(format!(
            "bad step reference ${{{{ {expr} }}}}: expected steps.ID.FIELD (FIELD is stdout, \
             retcode, result, changes, comment or a module output); quote odd IDs as steps[\"ID\"]"
        ))
    };
    let mut parts: Vec<String> = Vec::new();
    let mut rest = expr;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('[') {
            let quote = r.chars().next().ok_or_else(bad)?;
            if quote != '"' && quote != '\'' {
                return Err(bad());
            }
            let body = &r[1..];
            let end = body.find(quote).ok_or_else(bad)?;
            parts.push(body[..end].to_string());
            rest = body[end + 1..].strip_prefix(']').ok_or_else(bad)?;
        } else {
            let end = rest.find(['.', '[']).unwrap_or(rest.len());
            if end == 0 {
                return Err(bad());
            }
            parts.push(rest[..end].to_string());
            rest = &rest[end..];
        }
        if let Some(r) = rest.strip_prefix('.') {
            rest = r;
            if rest.is_empty() {
                return Err(bad());
            }
        }
    }
    let (node, parts) = match parts.first().map(String::as_str) {
        Some("nodes") if parts.len() >= 5 && parts[2] == "steps" => {
            (Some(parts[1].clone()), parts[3..].to_vec())
        }
        Some("steps") if parts.len() >= 3 => (None, parts[1..].to_vec()),
        _ => return Err(bad()),
    };
    if parts
        .iter()
        .any(|p| p.chars().any(char::is_whitespace) && p.is_empty())
    {
        return Err(bad());
    }
    Ok(StepRef {
        node,
        step: parts[0].clone(),
        path: parts[1..].to_vec(),
    })
}

/// Every reference in a value, in order.
pub fn find_refs(v: &Value) -> Result<Vec<StepRef>> {
    let mut out = Vec::new();
    walk(v, &mut |s| {
        for p in scan(s)? {
            if let Piece::Ref(r) = p {
                out.push(r);
            }
        }
        Ok(())
    })?;
    Ok(out)
}

fn walk(v: &Value, f: &mut impl FnMut(&str) -> Result<()>) -> Result<()> {
    match v {
        Value::String(s) => f(s),
        Value::Array(a) => a.iter().try_for_each(|x| walk(x, f)),
        Value::Object(m) => m.values().try_for_each(|x| walk(x, f)),
        _ => Ok(()),
    }
}

/// Replaces every reference in `v` using `lookup`, which returns the referenced value or an
/// error saying why it is not available.
pub fn substitute(v: &Value, lookup: &dyn Fn(&StepRef) -> Result<Value>) -> Result<Value> {
    Ok(match v {
        Value::String(s) if s.contains(OPEN) => {
            let pieces = scan(s)?;
            if let [Piece::Ref(r)] = pieces.as_slice() {
                lookup(r)?
            } else {
                let mut text = String::new();
                for p in pieces {
                    match p {
                        Piece::Text(t) => text.push_str(&t),
                        Piece::Ref(r) => match lookup(&r)? {
                            Value::String(s) => text.push_str(&s),
                            Value::Null => {}
                            other => text.push_str(&other.to_string()),
                        },
                    }
                }
                Value::String(text)
            }
        }
        Value::Array(a) => Value::Array(
            a.iter()
                .map(|x| substitute(x, lookup))
                .collect::<Result<_>>()?,
        ),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, x)| Ok((k.clone(), substitute(x, lookup)?)))
                .collect::<Result<_>>()?,
        ),
        other => other.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_dotted_quoted_and_node_forms() {
        let r = parse_ref("steps.make_token.stdout").unwrap();
        assert_eq!(r.step, "make_token");
        assert_eq!(r.path, vec!["stdout"]);
        let r = parse_ref("steps[\"/etc/motd\"].changes.diff").unwrap();
        assert_eq!(r.step, "/etc/motd");
        assert_eq!(r.path, vec!["changes", "diff"]);
        let r = parse_ref("nodes.db1.steps.tok.stdout").unwrap();
        assert_eq!(r.node.as_deref(), Some("db1"));
        assert!(parse_ref("steps.x").is_err());
        assert!(parse_ref("vars.x.y").is_err());
    }

    #[test]
    fn whole_string_keeps_type_and_splices_text() {
        let v = json!({"a": "${{ steps.x.retcode }}", "b": "rc=${{steps.x.retcode}}!"});
        let out = substitute(&v, &|r| {
            assert_eq!(r.step, "x");
            Ok(json!(3))
        })
        .unwrap();
        assert_eq!(out, json!({"a": 3, "b": "rc=3!"}));
        assert_eq!(find_refs(&v).unwrap().len(), 2);
        assert!(find_refs(&json!("${{ steps.x.y")).is_err());
    }
}
