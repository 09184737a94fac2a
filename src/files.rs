//! Reading manifest files and directories from disk into [`Manifests`].

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context;
use ferrolb_api::manifests::{ManifestError, Manifests};

/// Reads every file named, and every `.yaml`/`.yml`/`.json` file below each directory
/// named (sorted, so the result does not depend on the file system's order). `-` is
/// standard input. Unreadable paths are an error; bad documents are returned.
pub fn read(paths: &[PathBuf]) -> anyhow::Result<(Manifests, Vec<ManifestError>)> {
    let mut manifests = Manifests::default();
    let mut errors = Vec::new();
    for path in paths {
        if path.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading standard input")?;
            errors.extend(manifests.add_text("<stdin>", &text));
            continue;
        }
        for file in files_below(path)? {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            errors.extend(manifests.add_text(&file.display().to_string(), &text));
        }
    }
    Ok((manifests, errors))
}

fn files_below(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut found = Vec::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("listing {}", path.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("listing {}", path.display()))?;
    entries.sort();
    for entry in entries {
        if entry.is_dir() {
            found.extend(files_below(&entry)?);
        } else if matches!(
            entry.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            found.push(entry);
        }
    }
    Ok(found)
}
