//! Where state trees come from, before they become content-addressed blobs in the KV.
//!
//! - [`git`]: a git repository at a ref, resolved once to a commit ([`git::fetch`]).
//! - [`parse_repo_arg`]: the `--repo NAME[@REF]` argument of `eden apply`.
//!
//! A source only produces files (path to bytes) and the identity of what was read (for git, the
//! commit id); storing them as blobs and recording them in the run is the caller's job. Sources
//! do blocking I/O and know nothing of the engine, the agent or the store.

pub mod git;

use crate::error::{Error, Result};

/// Splits the `--repo NAME[@REF]` argument: the repository's registered name and the ref asked
/// for, if any (without one, the ref registered with `eden repo add`, else `HEAD`, applies).
/// Names are letters, digits, `.`, `_` and `-`; the ref is everything after the first `@`.
pub fn parse_repo_arg(arg: &str) -> Result<(String, Option<String>)> {
    let (name, refname) = match arg.split_once('@') {
        Some((name, refname)) => (name, Some(refname)),
        None => (arg, None),
    };
    let name_ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !name_ok {
        return Err(Error::InvalidInput(format!(
            "--repo {arg:?}: the repository name {name:?} must be letters, digits, '.', '_' or \
             '-'; write NAME or NAME@REF, with NAME as given to `eden repo add`"
        )));
    }
    if refname == Some("") {
        return Err(Error::InvalidInput(format!(
            "--repo {arg:?}: nothing after '@'; give a branch, tag or commit id, or drop the '@'"
        )));
    }
    Ok((name.to_string(), refname.map(str::to_string)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_args_split_at_the_first_at_sign() {
        let split = |s: &str| parse_repo_arg(s).unwrap();
        assert_eq!(split("states"), ("states".into(), None));
        assert_eq!(split("states@v1.2"), ("states".into(), Some("v1.2".into())));
        assert_eq!(
            split("st-1@feature/x@y"),
            ("st-1".into(), Some("feature/x@y".into()))
        );
        for bad in ["", "@main", "a b@main", "states@", "../x"] {
            let e = parse_repo_arg(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
    }
}
