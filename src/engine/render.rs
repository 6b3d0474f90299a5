//! Rendering: SLS text through Jinja (minijinja), before it is parsed as YAML.
//!
//! The template context holds:
//! - `node`: `name`, `labels`, `facts` of the node the states are for;
//! - `vars`: the variables chosen for that node (like Salt's pillar);
//! - `eden`: `version`, `mode`, `test`, and `local` (`false` in a cluster run, which lets
//!   `${{ nodes.N.steps... }}` references compile; see [`super::plan`]);
//! - `grains` and `pillar`: aliases of `node.facts` and `vars`, so Salt states that use them
//!   render unchanged.
//!
//! `${{ steps.ID.FIELD }}` is eden's run-time syntax and must survive Jinja untouched, so it is
//! swapped for an inert marker before rendering and put back after ([`protect`], [`restore`]).
//! Templates may `{% include %}` / `{% import %}` other files of the state tree.

use std::sync::Arc;

use minijinja::{Environment, UndefinedBehavior};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::modules::SourceTree;

/// What a node looks like to its templates.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NodeInfo {
    pub name: String,
    pub labels: Map<String, Value>,
    pub facts: Map<String, Value>,
}

/// The Jinja context of one render.
#[derive(Debug, Clone, Default)]
pub struct Context {
    pub node: NodeInfo,
    pub vars: Value,
    /// `eden.mode`, `eden.test` and the like.
    pub eden: Map<String, Value>,
}

impl Context {
    fn to_value(&self) -> minijinja::Value {
        let vars = if self.vars.is_null() {
            Value::Object(Map::new())
        } else {
            self.vars.clone()
        };
        let mut eden = self.eden.clone();
        eden.entry("version")
            .or_insert_with(|| Value::String(env!("CARGO_PKG_VERSION").into()));
        minijinja::context! {
            node => &self.node,
            vars => &vars,
            eden => &eden,
            grains => &self.node.facts,
            pillar => &vars,
        }
    }
}

const MARK_OPEN: &str = "\u{1}EDENREF";
const MARK_CLOSE: &str = "\u{2}";

/// Replaces each `${{ ... }}` by a marker Jinja leaves alone.
fn protect(file: &str, text: &str) -> Result<(String, Vec<String>)> {
    let mut out = String::with_capacity(text.len());
    let mut saved = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("${{") {
        let Some(len) = rest[start..].find("}}") else {
            let line = text.len() - rest.len() + start;
            let line = text[..line].matches('\n').count() + 1;
            return Err(Error::InvalidInput(format!(
                "{file}:{line}: unclosed ${{{{: a step reference looks like ${{{{ steps.ID.stdout }}}}"
            )));
        };
        out.push_str(&rest[..start]);
        out.push_str(&format!("{MARK_OPEN}{}{MARK_CLOSE}", saved.len()));
        saved.push(rest[start..start + len + 2].to_string());
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    Ok((out, saved))
}

fn restore(text: &str, saved: &[String]) -> String {
    let mut out = text.to_string();
    for (i, s) in saved.iter().enumerate().rev() {
        out = out.replace(&format!("{MARK_OPEN}{i}{MARK_CLOSE}"), s);
    }
    out
}

/// Renders one template file of the tree. `file` is its path in the tree, for messages and for
/// relative includes.
pub fn render(
    tree: Arc<dyn SourceTree>,
    file: &str,
    source: &str,
    ctx: &Context,
) -> Result<String> {
    let (protected, saved) = protect(file, source)?;
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Lenient);
    env.set_keep_trailing_newline(true);
    let loader_tree = tree.clone();
    env.set_loader(move |name: &str| match loader_tree.read(name) {
        Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
        Err(Error::NotFound(_)) => Ok(None),
        Err(e) => Err(minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            e.to_string(),
        )),
    });
    let jinja_err = |e: minijinja::Error| {
        let line = e.line().map(|l| format!(":{l}")).unwrap_or_default();
        let detail = e.detail().map(|d| format!(": {d}")).unwrap_or_default();
        Error::InvalidInput(format!("{file}{line}: Jinja error: {}{detail}", e.kind()))
    };
    env.add_template_owned(file.to_string(), protected)
        .map_err(jinja_err)?;
    let tmpl = env.get_template(file).map_err(jinja_err)?;
    let rendered = tmpl.render(ctx.to_value()).map_err(jinja_err)?;
    Ok(restore(&rendered, &saved))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modules::EmptyTree;

    #[test]
    fn renders_context_and_keeps_step_refs() {
        let mut ctx = Context::default();
        ctx.node.name = "web1".into();
        ctx.vars = serde_json::json!({"port": 8080});
        let out = render(
            Arc::new(EmptyTree),
            "a.sls",
            "x: {{ node.name }}-{{ vars.port }}-{{ pillar.port }}\ny: ${{ steps.a.stdout }}\n",
            &ctx,
        )
        .unwrap();
        assert_eq!(out, "x: web1-8080-8080\ny: ${{ steps.a.stdout }}\n");
    }

    #[test]
    fn jinja_errors_name_file_and_line() {
        let err = render(
            Arc::new(EmptyTree),
            "bad.sls",
            "a: 1\n{% if %}\n",
            &Context::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("bad.sls:2: Jinja error"), "{err}");
    }
}
