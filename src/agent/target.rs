//! TEMPORARY (not committed): replaced by the target expression parser.
use crate::error::Result;
use serde_json::{Map, Value};
#[derive(Debug, Clone)]
pub struct Expr(String);
pub fn parse(s: &str) -> Result<Expr> {
    Ok(Expr(s.to_string()))
}
impl Expr {
    pub fn matches(
        &self,
        name: &str,
        _labels: &Map<String, Value>,
        _facts: &Map<String, Value>,
    ) -> bool {
        self.0.split(',').any(|p| crate::engine::compile::fnmatch(name, p.trim()))
    }
}
impl std::fmt::Display for Expr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
