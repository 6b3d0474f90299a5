//! `eden doc [MODULE]`: the reference page of a module (the same text as
//! `docs/modules/MODULE.md`, built into the binary), or the list of pages.

use clap::Args;

use crate::error::{Error, Result};

/// The pages, by the name `eden doc` takes.
pub const PAGES: &[(&str, &str)] = &[
    ("cmd", include_str!("../../docs/modules/cmd.md")),
    ("file", include_str!("../../docs/modules/file.md")),
    ("pkg", include_str!("../../docs/modules/pkg.md")),
    ("pkgrepo", include_str!("../../docs/modules/pkgrepo.md")),
    ("test", include_str!("../../docs/modules/test.md")),
    (
        "extension-modules",
        include_str!("../../docs/modules/extension-modules.md"),
    ),
];

#[derive(Args, Debug)]
pub struct DocArgs {
    /// A module (cmd, file, pkg, pkgrepo, test) or `extension-modules`; a function such as
    /// `file.managed` shows its module's page. Without it, the list of pages.
    pub module: Option<String>,
}

/// The page for `name`, which may be `module` or `module.function`.
pub fn page(name: &str) -> Result<&'static str> {
    let module = name.split('.').next().unwrap_or(name);
    PAGES
        .iter()
        .find(|(n, _)| *n == module)
        .map(|(_, text)| *text)
        .ok_or_else(|| {
            Error::NotFound(format!(
                "no reference page for {name:?}; pages: {}",
                PAGES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            ))
        })
}

pub fn run(args: DocArgs) -> Result<i32> {
    match args.module {
        Some(name) => print!("{}", page(&name)?),
        None => {
            for (name, text) in PAGES {
                let title = text
                    .lines()
                    .find(|l| !l.starts_with('#') && !l.trim().is_empty())
                    .unwrap_or("");
                println!("{name:18} {title}");
            }
        }
    }
    Ok(0)
}
