//! The agent's log filter: what `RUST_LOG` means here, and changing it while the agent runs
//! (`mesh-agent log-level FILTER`, `POST /v1/log-level`).
//!
//! The eBPF loader's own crates (aya, aya_obj) log hundreds of BTF and relocation lines at
//! debug level; they stay at `info` unless the filter names them, so `RUST_LOG=debug` shows
//! mesh's decisions, not the loader's bookkeeping.

use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;

/// Targets kept at `info` unless the filter names them.
const QUIET: [&str; 2] = ["aya", "aya_obj"];

/// The filter a directive string (`RUST_LOG` syntax: `debug`, `info,mesh_agent::gossip=debug`)
/// makes, with the loader's crates quiet unless it names them.
pub fn filter(directives: &str) -> Result<EnvFilter, String> {
    let mut filter = EnvFilter::try_new(directives).map_err(|e| format!("{directives:?}: {e}"))?;
    for target in QUIET {
        let named = directives
            .split(',')
            .any(|d| d.trim().split('=').next() == Some(target));
        if !named {
            // A fixed directive of known syntax: it parses.
            if let Ok(quiet) = format!("{target}=info").parse() {
                filter = filter.add_directive(quiet);
            }
        }
    }
    Ok(filter)
}

/// Replaces the filter in force; set once by the binary's logging set-up.
type Reload = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

static RELOAD: OnceLock<Reload> = OnceLock::new();

/// Makes [`set`] work: `reload` swaps the running subscriber's filter.
pub fn install(reload: Reload) {
    let _ = RELOAD.set(reload);
}

/// Changes the log filter of this process to `directives`; the previous one stays on error.
pub fn set(directives: &str) -> Result<(), String> {
    let filter = filter(directives)?;
    let reload = RELOAD
        .get()
        .ok_or_else(|| "this process has no reloadable log filter".to_owned())?;
    reload(filter)?;
    tracing::info!(filter = directives, "log filter changed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loader_stays_quiet_unless_named_and_bad_filters_are_refused() {
        let debug = filter("debug").unwrap().to_string();
        assert!(
            debug.contains("aya=info") && debug.contains("aya_obj=info"),
            "{debug}"
        );
        let named = filter("debug,aya=trace").unwrap().to_string();
        assert!(
            named.contains("aya=trace") && !named.contains("aya=info"),
            "{named}"
        );
        let error = filter("mesh_agent=loud").unwrap_err();
        assert!(error.contains("mesh_agent=loud"), "{error}");
    }
}
