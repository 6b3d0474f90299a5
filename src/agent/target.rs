//! Target expressions: which nodes a run or an ad-hoc command goes to.
//!
//! An operator writes `--target EXPR`; the run controller parses it once with [`parse`] and asks
//! [`Expr::matches`] about every known node, giving the node's name, its labels and its published
//! facts. The canonical text of the parsed expression ([`Expr`]'s `Display`) is what a run record
//! stores, so two spellings of one expression record the same way.
//!
//! # Grammar
//!
//! ```text
//! expr  := and { ("or" | ",") and }        lowest precedence; `a,b` is `a or b`
//! and   := not { "and" not }
//! not   := "not" not | atom                 highest precedence
//! atom  := "(" expr ")" | word "=" word | word
//! word  := bare | "double quoted" | 'single quoted'
//! ```
//!
//! - A lone word is a glob on the node name, fnmatch-style (`*`, `?`, `[a-c]`, `[!x]`); `*` alone
//!   matches every node.
//! - `key=value` compares a label or fact with a glob. A label wins over a fact of the same key,
//!   because labels are what the operator set on purpose. A value that is not a JSON string is
//!   compared in its JSON text (`cpus=4`, `virtual=true`); a JSON array matches when any element
//!   does (`ips=10.1.*`). A missing key never matches, not even `key=*`.
//! - A dotted key that no label or fact has whole reaches into object values: `os.family=debian`
//!   reads `{"os": {"family": "debian"}}`, again from the labels first.
//! - A bare word is any run of characters other than whitespace, `(`, `)`, `,`, `=` and quotes.
//!   Quote a word that has those, or one spelled like a keyword (`"not"`); inside quotes `\` escapes
//!   the next character. `and`, `or` and `not` are keywords only in lower case and unquoted.
//!
//! Parsing never looks at any node; matching never fails. Errors name the expression, the
//! 1-based column and what was expected there.

use std::fmt;

use serde_json::{Map, Value};

use crate::engine::compile::fnmatch;
use crate::error::{Error, Result};

/// A parsed target expression. Build one with [`parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// A glob on the node name.
    Name(String),
    /// `key=value`: a glob on a label, or a fact when no label has the key.
    Field {
        key: String,
        value: String,
    },
    Not(Box<Expr>),
    /// All must match; never empty (the parser folds a single operand).
    And(Vec<Expr>),
    /// Any must match; never empty.
    Or(Vec<Expr>),
}

/// Parses a target expression; see the module docs for the grammar.
pub fn parse(s: &str) -> Result<Expr> {
    let tokens = lex(s)?;
    let mut p = Parser {
        src: s,
        tokens,
        pos: 0,
    };
    let expr = p.or()?;
    if let Some(t) = p.peek() {
        return Err(p.error(t.col, "an operator (and, or, ',') or the end", &t.kind));
    }
    Ok(expr)
}

impl Expr {
    /// True when the node with this name, labels and facts is targeted.
    pub fn matches(
        &self,
        name: &str,
        labels: &Map<String, Value>,
        facts: &Map<String, Value>,
    ) -> bool {
        match self {
            Expr::Name(glob) => fnmatch(name, glob),
            Expr::Field { key, value } => match lookup(key, labels, facts) {
                Some(v) => value_matches(v, value),
                None => false,
            },
            Expr::Not(e) => !e.matches(name, labels, facts),
            Expr::And(es) => es.iter().all(|e| e.matches(name, labels, facts)),
            Expr::Or(es) => es.iter().any(|e| e.matches(name, labels, facts)),
        }
    }

    /// Binding strength for printing: parentheses go around a child that binds looser than
    /// its parent.
    fn precedence(&self) -> u8 {
        match self {
            Expr::Or(_) => 1,
            Expr::And(_) => 2,
            Expr::Not(_) | Expr::Name(_) | Expr::Field { .. } => 3,
        }
    }

    fn fmt_child(&self, child: &Expr, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The parser flattens same-kind nesting, so an equal precedence below And/Or only comes
        // from a tree built by hand; parenthesising it keeps the printed form re-parseable.
        let needs_parens = match self {
            Expr::Not(_) => child.precedence() < 3,
            _ => child.precedence() <= self.precedence(),
        };
        if needs_parens {
            write!(f, "({child})")
        } else {
            write!(f, "{child}")
        }
    }
}

/// The label, else the fact, named `key`; else, for a dotted key, the path into an object-valued
/// label or fact (`os.family` reads `{"os": {"family": ..}}`), labels again first.
fn lookup<'a>(
    key: &str,
    labels: &'a Map<String, Value>,
    facts: &'a Map<String, Value>,
) -> Option<&'a Value> {
    if let Some(v) = labels.get(key).or_else(|| facts.get(key)) {
        return Some(v);
    }
    let mut parts = key.split('.');
    let first = parts.next()?;
    let path: Vec<&str> = parts.collect();
    if path.is_empty() {
        return None;
    }
    [labels, facts].into_iter().find_map(|map| {
        path.iter()
            .try_fold(map.get(first)?, |v, part| v.as_object()?.get(*part))
    })
}

fn value_matches(v: &Value, glob: &str) -> bool {
    match v {
        Value::String(s) => fnmatch(s, glob),
        Value::Array(items) => items.iter().any(|i| value_matches(i, glob)),
        other => fnmatch(&other.to_string(), glob),
    }
}

/// Canonical form: keywords in lower case, lists written with `or`, single spaces, parentheses
/// only where precedence needs them, and quotes only where a word needs them.
impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Name(glob) => write_word(f, glob),
            Expr::Field { key, value } => {
                write_word(f, key)?;
                f.write_str("=")?;
                write_word(f, value)
            }
            Expr::Not(e) => {
                f.write_str("not ")?;
                self.fmt_child(e, f)
            }
            Expr::And(es) | Expr::Or(es) => {
                let sep = if matches!(self, Expr::And(_)) {
                    " and "
                } else {
                    " or "
                };
                for (i, e) in es.iter().enumerate() {
                    if i > 0 {
                        f.write_str(sep)?;
                    }
                    self.fmt_child(e, f)?;
                }
                Ok(())
            }
        }
    }
}

fn is_bare_char(c: char) -> bool {
    !(c.is_whitespace() || matches!(c, '(' | ')' | ',' | '=' | '"' | '\'' | '\\'))
}

fn write_word(f: &mut fmt::Formatter<'_>, w: &str) -> fmt::Result {
    let bare = !w.is_empty() && w.chars().all(is_bare_char) && !matches!(w, "and" | "or" | "not");
    if bare {
        return f.write_str(w);
    }
    f.write_str("\"")?;
    for c in w.chars() {
        if matches!(c, '"' | '\\') {
            f.write_str("\\")?;
        }
        write!(f, "{c}")?;
    }
    f.write_str("\"")
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Word(String),
    /// A quoted word: never a keyword.
    Quoted(String),
    And,
    Or,
    Not,
    Comma,
    Equals,
    Open,
    Close,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::Word(w) => write!(f, "'{w}'"),
            Kind::Quoted(w) => write!(f, "quoted '{w}'"),
            Kind::And => f.write_str("'and'"),
            Kind::Or => f.write_str("'or'"),
            Kind::Not => f.write_str("'not'"),
            Kind::Comma => f.write_str("','"),
            Kind::Equals => f.write_str("'='"),
            Kind::Open => f.write_str("'('"),
            Kind::Close => f.write_str("')'"),
        }
    }
}

#[derive(Debug, Clone)]
struct Token {
    kind: Kind,
    /// 1-based column (in characters) where the token starts.
    col: usize,
}

fn lex(s: &str) -> Result<Vec<Token>> {
    let chars: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let col = i + 1;
        let single = match c {
            c if c.is_whitespace() => {
                i += 1;
                continue;
            }
            '(' => Some(Kind::Open),
            ')' => Some(Kind::Close),
            ',' => Some(Kind::Comma),
            '=' => Some(Kind::Equals),
            _ => None,
        };
        if let Some(kind) = single {
            out.push(Token { kind, col });
            i += 1;
            continue;
        }
        if c == '"' || c == '\'' {
            let mut word = String::new();
            i += 1;
            loop {
                match chars.get(i) {
                    None => {
                        return Err(Error::InvalidInput(format!(
                            "target expression {s:?}: the quote opened at column {col} is not \
                             closed; add a closing {c}"
                        )))
                    }
                    Some(&q) if q == c => break,
                    Some('\\') if i + 1 < chars.len() => {
                        word.push(chars[i + 1]);
                        i += 2;
                        continue;
                    }
                    Some(&other) => word.push(other),
                }
                i += 1;
            }
            i += 1;
            out.push(Token {
                kind: Kind::Quoted(word),
                col,
            });
            continue;
        }
        if c == '\\' {
            return Err(Error::InvalidInput(format!(
                "target expression {s:?}: unexpected '\\' at column {col}; a backslash escapes \
                 only inside quotes"
            )));
        }
        let start = i;
        while i < chars.len() && is_bare_char(chars[i]) {
            i += 1;
        }
        let word: String = chars[start..i].iter().collect();
        let kind = match word.as_str() {
            "and" => Kind::And,
            "or" => Kind::Or,
            "not" => Kind::Not,
            _ => Kind::Word(word),
        };
        out.push(Token { kind, col });
    }
    Ok(out)
}

struct Parser<'a> {
    src: &'a str,
    tokens: Vec<Token>,
    pos: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn peek_kind(&self) -> Option<&Kind> {
        self.peek().map(|t| &t.kind)
    }

    /// Column just past the input, for errors at the end.
    fn end_col(&self) -> usize {
        self.src.chars().count() + 1
    }

    fn error(&self, col: usize, expected: &str, found: &dyn fmt::Display) -> Error {
        Error::InvalidInput(format!(
            "target expression {:?}: expected {expected} at column {col}, found {found}",
            self.src
        ))
    }

    fn error_here(&self, expected: &str) -> Error {
        match self.peek() {
            Some(t) => self.error(t.col, expected, &t.kind),
            None => self.error(self.end_col(), expected, &"the end of the expression"),
        }
    }

    fn or(&mut self) -> Result<Expr> {
        let mut items = vec![self.and()?];
        while matches!(self.peek_kind(), Some(Kind::Or | Kind::Comma)) {
            self.pos += 1;
            items.push(self.and()?);
        }
        Ok(fold(items, true))
    }

    fn and(&mut self) -> Result<Expr> {
        let mut items = vec![self.not()?];
        while matches!(self.peek_kind(), Some(Kind::And)) {
            self.pos += 1;
            items.push(self.not()?);
        }
        Ok(fold(items, false))
    }

    fn not(&mut self) -> Result<Expr> {
        if matches!(self.peek_kind(), Some(Kind::Not)) {
            self.pos += 1;
            let inner = self.not()?;
            // `not not x` is `x`; keeps the canonical form canonical.
            return Ok(match inner {
                Expr::Not(e) => *e,
                e => Expr::Not(Box::new(e)),
            });
        }
        self.atom()
    }

    fn atom(&mut self) -> Result<Expr> {
        const TERM: &str = "a node name glob, key=value, 'not' or '('";
        match self.peek_kind().cloned() {
            Some(Kind::Open) => {
                let open_col = self.tokens[self.pos].col;
                self.pos += 1;
                let inner = self.or()?;
                match self.peek_kind() {
                    Some(Kind::Close) => {
                        self.pos += 1;
                        Ok(inner)
                    }
                    _ => Err(self.error_here(&format!(
                        "')' to close the '(' at column {open_col}, or an operator"
                    ))),
                }
            }
            Some(Kind::Word(w) | Kind::Quoted(w)) => {
                let word_col = self.tokens[self.pos].col;
                self.pos += 1;
                if !matches!(self.peek_kind(), Some(Kind::Equals)) {
                    if w.is_empty() {
                        return Err(self.error(word_col, "a non-empty node name glob", &"\"\""));
                    }
                    return Ok(Expr::Name(w));
                }
                self.pos += 1;
                if w.is_empty() {
                    return Err(self.error(word_col, "a non-empty key before '='", &"\"\""));
                }
                match self.peek_kind().cloned() {
                    Some(Kind::Word(v) | Kind::Quoted(v)) => {
                        self.pos += 1;
                        Ok(Expr::Field { key: w, value: v })
                    }
                    _ => Err(self.error_here(&format!(
                        "a value after '{w}=' (quote it if it is a keyword or empty)"
                    ))),
                }
            }
            _ => Err(self.error_here(TERM)),
        }
    }
}

/// One operand stays itself; more become an Or (or an And), flattening same-kind children so
/// `a or (b or c)` and `a or b or c` are one tree.
fn fold(items: Vec<Expr>, or: bool) -> Expr {
    if items.len() == 1 {
        return items.into_iter().next().expect("one item");
    }
    let mut flat = Vec::new();
    for e in items {
        match e {
            Expr::Or(inner) if or => flat.extend(inner),
            Expr::And(inner) if !or => flat.extend(inner),
            e => flat.push(e),
        }
    }
    if or {
        Expr::Or(flat)
    } else {
        Expr::And(flat)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().expect("object").clone()
    }

    fn canon(s: &str) -> String {
        parse(s).unwrap_or_else(|e| panic!("{s}: {e}")).to_string()
    }

    fn err(s: &str) -> String {
        match parse(s) {
            Ok(e) => panic!("{s:?} parsed as {e:?}"),
            Err(e) => e.to_string(),
        }
    }

    /// The names in `fleet` that `expr` selects.
    fn select(expr: &str, fleet: &[(&str, Value, Value)]) -> Vec<String> {
        let e = parse(expr).unwrap_or_else(|e| panic!("{expr}: {e}"));
        fleet
            .iter()
            .filter(|(n, l, f)| e.matches(n, &map(l.clone()), &map(f.clone())))
            .map(|(n, _, _)| n.to_string())
            .collect()
    }

    fn fleet() -> Vec<(&'static str, Value, Value)> {
        vec![
            (
                "web-1",
                json!({"role": "web", "dc": "eu"}),
                json!({"os": "debian", "cpus": 2}),
            ),
            (
                "web-2",
                json!({"role": "web", "dc": "us"}),
                json!({"os": "debian gnu", "cpus": 4}),
            ),
            (
                "api-1",
                json!({"role": "api", "dc": "eu"}),
                json!({"os": "alpine", "virtual": true}),
            ),
            (
                "db-1",
                json!({"role": "db"}),
                json!({"os": "debian", "ips": ["10.1.0.5", "fe80::1"]}),
            ),
            (
                "db-3",
                json!({"role": "db", "os": "custom"}),
                json!({"os": "debian", "cpus": 4}),
            ),
        ]
    }

    #[test]
    fn star_matches_every_node() {
        assert_eq!(select("*", &fleet()).len(), 5);
        assert_eq!(select("nope-*", &fleet()), Vec::<String>::new());
    }

    #[test]
    fn name_globs_use_fnmatch() {
        assert_eq!(select("web-*", &fleet()), ["web-1", "web-2"]);
        assert_eq!(select("db-[13]", &fleet()), ["db-1", "db-3"]);
        assert_eq!(select("?pi-1", &fleet()), ["api-1"]);
    }

    #[test]
    fn comma_lists_are_or() {
        assert_eq!(select("web-1,db-1", &fleet()), ["web-1", "db-1"]);
        assert_eq!(
            select("web-1, db-1 ,api-*", &fleet()),
            ["web-1", "api-1", "db-1"]
        );
        assert_eq!(canon("web-1,web-2"), "web-1 or web-2");
    }

    #[test]
    fn labels_win_over_facts() {
        // db-3 has label os=custom and fact os=debian: the label decides.
        assert_eq!(select("os=debian", &fleet()), ["web-1", "db-1"]);
        assert_eq!(select("os=custom", &fleet()), ["db-3"]);
        // A key only in facts is still found.
        assert_eq!(select("os=alpine", &fleet()), ["api-1"]);
    }

    #[test]
    fn non_string_facts_compare_by_their_json_text() {
        assert_eq!(select("cpus=4", &fleet()), ["web-2", "db-3"]);
        assert_eq!(select("virtual=true", &fleet()), ["api-1"]);
        assert_eq!(select("ips=10.1.*", &fleet()), ["db-1"]);
        assert_eq!(select("ips=fe80::1", &fleet()), ["db-1"]);
    }

    #[test]
    fn dotted_keys_reach_into_objects() {
        let fleet = vec![
            (
                "a",
                json!({}),
                json!({"os": {"family": "debian", "release": 12}}),
            ),
            (
                "b",
                json!({"os": {"family": "custom"}}),
                json!({"os": {"family": "debian"}}),
            ),
            (
                "c",
                json!({"os.family": "flat"}),
                json!({"os": {"family": "debian"}}),
            ),
            ("d", json!({}), json!({"os": "debian"})),
        ];
        assert_eq!(select("os.family=debian", &fleet), ["a"]);
        assert_eq!(select("os.family=custom", &fleet), ["b"]);
        assert_eq!(select("os.family=flat", &fleet), ["c"]);
        assert_eq!(select("os.release=12", &fleet), ["a"]);
        assert_eq!(select("os.family.x=*", &fleet), Vec::<String>::new());
    }

    #[test]
    fn missing_keys_never_match() {
        assert_eq!(select("rack=*", &fleet()), Vec::<String>::new());
        assert_eq!(select("dc=*", &fleet()), ["web-1", "web-2", "api-1"]);
        assert_eq!(select("not dc=*", &fleet()), ["db-1", "db-3"]);
    }

    #[test]
    fn quoted_values() {
        assert_eq!(select("os=\"debian gnu\"", &fleet()), ["web-2"]);
        assert_eq!(select("os='debian gnu'", &fleet()), ["web-2"]);
        assert_eq!(
            select("os=\"debian*\"", &fleet()),
            ["web-1", "web-2", "db-1"]
        );
        assert_eq!(canon("os='debian gnu'"), "os=\"debian gnu\"");
        assert_eq!(canon(r#"k="a\"b""#), r#"k="a\"b""#);
        assert_eq!(canon(r#""not""#), r#""not""#);
        assert_eq!(parse(r#""not""#).unwrap(), Expr::Name("not".into()));
        assert_eq!(
            parse("k=\"\"").unwrap(),
            Expr::Field {
                key: "k".into(),
                value: String::new()
            }
        );
    }

    #[test]
    fn precedence_not_and_or() {
        assert_eq!(select("role=db and not db-3", &fleet()), ["db-1"]);
        // and binds tighter than or: web-1 or (role=db and dc=eu); no db is in eu.
        assert_eq!(select("web-1 or role=db and dc=eu", &fleet()), ["web-1"]);
        assert_eq!(
            select("(web-1 or role=db) and os=debian", &fleet()),
            ["web-1", "db-1"]
        );
        assert_eq!(
            select("(web-* or api-*) and dc=eu", &fleet()),
            ["web-1", "api-1"]
        );
        // not binds tighter than and.
        assert_eq!(select("not web-* and not db-*", &fleet()), ["api-1"]);
        // comma binds like or, looser than and.
        assert_eq!(select("web-2,api-1 and dc=us", &fleet()), ["web-2"]);
        assert_eq!(
            parse("a or b and not c").unwrap(),
            Expr::Or(vec![
                Expr::Name("a".into()),
                Expr::And(vec![
                    Expr::Name("b".into()),
                    Expr::Not(Box::new(Expr::Name("c".into())))
                ]),
            ])
        );
    }

    #[test]
    fn canonical_form_round_trips() {
        for (input, want) in [
            ("  web-*  ", "web-*"),
            ("(web-* or api-*) and dc=eu", "(web-* or api-*) and dc=eu"),
            ("((a))", "a"),
            ("a or (b or c)", "a or b or c"),
            ("a and (b and c)", "a and b and c"),
            ("a or (b and c)", "a or b and c"),
            ("not (a or b)", "not (a or b)"),
            ("not (a and b)", "not (a and b)"),
            ("not not a", "a"),
            ("not(a)", "not a"),
            ("role = db", "role=db"),
        ] {
            assert_eq!(canon(input), want, "{input}");
            // Printing then parsing again gives the same tree.
            assert_eq!(parse(want).unwrap(), parse(input).unwrap(), "{input}");
        }
    }

    #[test]
    fn errors_name_the_column_and_what_was_expected() {
        let e = err("role=db and");
        assert!(e.contains("\"role=db and\""), "{e}");
        assert!(e.contains("column 12"), "{e}");
        assert!(
            e.contains("a node name glob, key=value, 'not' or '('"),
            "{e}"
        );
        assert!(e.contains("the end of the expression"), "{e}");

        let e = err("(web-* or api-*");
        assert!(e.contains("')' to close the '(' at column 1"), "{e}");
        assert!(e.contains("column 16"), "{e}");

        let e = err("web-1 db-1");
        assert!(e.contains("column 7"), "{e}");
        assert!(e.contains("found 'db-1'"), "{e}");

        let e = err("role=");
        assert!(e.contains("a value after 'role='"), "{e}");
        assert!(e.contains("column 6"), "{e}");

        let e = err("role=and");
        assert!(e.contains("column 6") && e.contains("found 'and'"), "{e}");

        let e = err("os=\"debian");
        assert!(e.contains("column 4") && e.contains("not closed"), "{e}");

        let e = err("a )");
        assert!(e.contains("column 3") && e.contains("found ')'"), "{e}");

        let e = err("");
        assert!(e.contains("column 1"), "{e}");

        let e = err("=x");
        assert!(e.contains("column 1") && e.contains("found '='"), "{e}");

        let e = err("a,,b");
        assert!(e.contains("column 3") && e.contains("found ','"), "{e}");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Words that exercise quoting: keywords, spaces, quotes, operators' characters.
        fn word() -> impl Strategy<Value = String> {
            prop_oneof![
                "[a-z*?-]{1,6}",
                Just("not".to_string()),
                Just("and".to_string()),
                Just("a b".to_string()),
                Just("x=y".to_string()),
                Just("q\"uote".to_string()),
                Just("back\\slash".to_string()),
                Just("(p),".to_string()),
            ]
        }

        /// Trees in the parser's own shape: no Or directly under Or, no And under And, no Not
        /// under Not, at least two operands.
        fn canonical() -> impl Strategy<Value = Expr> {
            let leaf = prop_oneof![
                word().prop_map(Expr::Name),
                (word(), prop_oneof![word(), Just(String::new())])
                    .prop_map(|(key, value)| Expr::Field { key, value }),
            ];
            leaf.prop_recursive(4, 24, 3, |inner| {
                prop_oneof![
                    inner
                        .clone()
                        .prop_filter("not under not", |e| !matches!(e, Expr::Not(_)))
                        .prop_map(|e| Expr::Not(Box::new(e))),
                    prop::collection::vec(
                        inner
                            .clone()
                            .prop_filter("or under or", |e| !matches!(e, Expr::Or(_))),
                        2..4
                    )
                    .prop_map(Expr::Or),
                    prop::collection::vec(
                        inner.prop_filter("and under and", |e| !matches!(e, Expr::And(_))),
                        2..4
                    )
                    .prop_map(Expr::And),
                ]
            })
        }

        proptest! {
            #[test]
            fn printing_then_parsing_gives_the_same_tree(e in canonical()) {
                let text = e.to_string();
                let back = parse(&text).map_err(|err| TestCaseError::fail(err.to_string()))?;
                prop_assert_eq!(&back, &e, "printed as {}", text);
                prop_assert_eq!(back.to_string(), text);
            }

            #[test]
            fn parsing_any_text_never_panics(s in "[a-z ()=,'\"\\*!-]{0,24}") {
                if let Ok(e) = parse(&s) {
                    // What parses prints to a form that parses to the same tree.
                    prop_assert_eq!(parse(&e.to_string()).unwrap(), e);
                }
            }
        }
    }
}
