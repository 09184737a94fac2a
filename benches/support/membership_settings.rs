//! Membership settings named on a bench's command line: `period/rtt/suspect` in ms,
//! comma-separated (`40/15/80,25/10/50`).

use anyhow::{Context, Result, bail};

/// The settings in `text`; `variable` names where it came from, for errors.
pub fn parse(variable: &str, text: &str) -> Result<Vec<(u64, u64, u64)>> {
    text.split(',')
        .map(|s| {
            let parts: Vec<u64> = s
                .trim()
                .split('/')
                .map(|p| p.parse().with_context(|| format!("{variable}: {s:?}")))
                .collect::<Result<_>>()?;
            match parts[..] {
                [period, rtt, suspect] => Ok((period, rtt, suspect)),
                _ => bail!("{variable}: {s:?} is not period/rtt/suspect"),
            }
        })
        .collect()
}
