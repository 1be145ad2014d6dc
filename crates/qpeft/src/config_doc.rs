//! A run config as a TOML document before it is read: composed from a base file and fragments merged over it,
//! and edited from the command line (`--set`, `--unset`). `RunConfig` (train/config.rs) and `Plan` (plan.rs, which
//! needs only `[adapter]`) read the result.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// Edits of a run config from the command line: `--unset KEY` removes a key (applied first), `--set KEY=VALUE`
/// sets one (a VALUE that is not valid TOML is taken as a string). Keys are dotted paths, e.g. `train.steps`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Edits {
    pub unset: Vec<String>,
    pub set: Vec<String>,
}

impl Edits {
    pub fn sets(sets: &[String]) -> Edits {
        Edits { unset: Vec::new(), set: sets.to_vec() }
    }

    /// Applies the edits to a TOML document; errors name the option, the key and the value.
    pub fn apply(&self, doc: &mut toml::Table) -> Result<()> {
        for key in &self.unset {
            let option = PathBuf::from(format!("--unset {key}"));
            let parts: Vec<&str> = key.trim().split('.').collect();
            let (last, tables) = parts.split_last().expect("split yields one part");
            let mut table = &mut *doc;
            for part in tables {
                table = match table.get_mut(*part).and_then(toml::Value::as_table_mut) {
                    Some(t) => t,
                    None => return Err(Error::config(&option, key.clone(), "no such key")),
                };
            }
            if table.remove(*last).is_none() {
                return Err(Error::config(&option, key.clone(), "no such key"));
            }
        }
        for set in &self.set {
            let option = PathBuf::from(format!("--set {set}"));
            let (key, raw) =
                set.split_once('=').ok_or_else(|| Error::config(&option, set.clone(), "needs KEY=VALUE"))?;
            let key = key.trim();
            let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
                Ok(mut t) => t.remove("v").expect("parsed key"),
                Err(_) => toml::Value::String(raw.to_string()),
            };
            let parts: Vec<&str> = key.split('.').collect();
            let (last, tables) = parts.split_last().expect("split yields one part");
            let mut table = &mut *doc;
            for (i, part) in tables.iter().enumerate() {
                let entry = table.entry(part.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
                table =
                    entry.as_table_mut().ok_or_else(|| Error::config(&option, parts[..=i].join("."), "not a table"))?;
            }
            table.insert(last.to_string(), value);
        }
        Ok(())
    }

    /// An error about a field the command line set, re-attributed to the option that set it (the config file only
    /// holds what the option replaced): the error's field is the option's key or a section above it, and the
    /// message names the key or quotes the value.
    pub fn attribute(&self, e: Error) -> Error {
        let Error::Config { field, msg, file } = e else { return e };
        let from_set = self.set.iter().rev().find_map(|s| {
            let (key, value) = s.split_once('=').map_or((s.as_str(), ""), |(k, v)| (k.trim(), v.trim()));
            let last = key.rsplit('.').next().unwrap_or(key);
            let value = value.trim_matches('"');
            let below = key.starts_with(&format!("{field}."));
            let named = msg.contains(&format!("`{last}`")) || (!value.is_empty() && msg.contains(value));
            (key == field || (below && named)).then_some((s, key))
        });
        match from_set {
            Some((s, key)) => Error::Config { file: PathBuf::from(format!("--set {s}")), field: key.to_string(), msg },
            None => Error::Config { field, msg, file },
        }
    }
}

/// Merges `over` into `base`: tables key by key (recursively), arrays of tables (`[[adapter.override]]` rules)
/// appended, every other value replaced.
pub fn merge_into(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge_into(b, o),
            (Some(toml::Value::Array(b)), toml::Value::Array(o))
                if b.iter().chain(&o).all(|x| matches!(x, toml::Value::Table(_))) =>
            {
                b.extend(o)
            }
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Reads `files`, a base and fragments merged over it in order (`merge_into`); returns the base's path (errors
/// name it) and the merged document.
pub fn compose(files: &[PathBuf]) -> Result<(PathBuf, toml::Table)> {
    let (base, fragments) = files.split_first().ok_or_else(|| Error::Invalid("no run config given".into()))?;
    let mut doc = read(base)?;
    for f in fragments {
        merge_into(&mut doc, read(f)?);
    }
    Ok((base.clone(), doc))
}

fn read(file: &Path) -> Result<toml::Table> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
    toml::from_str(&text).map_err(|e| Error::format(file, e.to_string().trim_end()))
}

/// `v` as `T`; an error names `name.key` of the value that did not fit.
pub fn parse_section<T: for<'de> Deserialize<'de>>(file: &Path, name: &str, v: &toml::Value) -> Result<T> {
    serde_path_to_error::deserialize(v.clone()).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." || path.is_empty() { name.to_string() } else { format!("{name}.{path}") };
        Error::config(file, field, e.into_inner().to_string())
    })
}
