//! The README points only at what the repository has: every path it mentions under configs/, scripts/, docs/,
//! crates/, tests/ or studies/ exists, and it cites no document outside the repository.

mod common;

use common::root;

#[test]
fn every_path_the_readme_mentions_exists() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let mut checked = 0;
    for (at, _) in readme.match_indices(['c', 's', 'd', 't']) {
        let rest = &readme[at..];
        let Some(prefix) = ["configs/", "scripts/", "docs/", "crates/", "tests/", "studies/"]
            .into_iter()
            .find(|p| rest.starts_with(p))
        else {
            continue;
        };
        // A path starts a word (not inside `../shared/docs/` or a URL).
        if at > 0 && !matches!(readme.as_bytes()[at - 1], b' ' | b'`' | b'(' | b'\n' | b'"' | b'\'') {
            continue;
        }
        let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || "/._-*".contains(c))).unwrap_or(rest.len());
        let path = rest[..end].trim_end_matches(['.', '/']);
        if path.len() < prefix.len() || path.contains('*') {
            continue;
        }
        assert!(root().join(path).exists(), "README mentions `{path}`, which is not in the repository");
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} paths found: the scan is broken");
    for outside in ["methods.md §", "performance.md", "shared/docs", "DESIGN.md"] {
        assert!(!readme.contains(outside), "README cites `{outside}`, which is outside the repository");
    }
}
