//! Reading manifest files and directories from disk into [`Manifests`].

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context;
use ferrolb_api::manifests::{ManifestError, Manifests};

/// What was read from the paths given.
pub struct Input {
    pub manifests: Manifests,
    /// Documents that could not be read.
    pub errors: Vec<ManifestError>,
    /// Files (and standard input) read.
    pub read: Vec<String>,
    /// Files found in directories but not read, not being `.yaml`, `.yml` or `.json`.
    pub skipped: Vec<PathBuf>,
}

/// Reads every file named, and every `.yaml`/`.yml`/`.json` file below each directory
/// named (sorted, so the result does not depend on the file system's order). `-` is
/// standard input. Unreadable paths are an error; bad documents are returned.
pub fn read(paths: &[PathBuf]) -> anyhow::Result<Input> {
    let mut input = Input {
        manifests: Manifests::default(),
        errors: Vec::new(),
        read: Vec::new(),
        skipped: Vec::new(),
    };
    for path in paths {
        if path.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading standard input")?;
            input
                .errors
                .extend(input.manifests.add_text("<stdin>", &text));
            input.read.push("<stdin>".into());
            continue;
        }
        for file in files_below(path, &mut input.skipped)? {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let name = file.display().to_string();
            input.errors.extend(input.manifests.add_text(&name, &text));
            input.read.push(name);
        }
    }
    Ok(input)
}

fn files_below(path: &Path, skipped: &mut Vec<PathBuf>) -> anyhow::Result<Vec<PathBuf>> {
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
            found.extend(files_below(&entry, skipped)?);
        } else if matches!(
            entry.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            found.push(entry);
        } else {
            skipped.push(entry);
        }
    }
    Ok(found)
}
