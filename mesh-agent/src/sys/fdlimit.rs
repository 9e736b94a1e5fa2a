//! The agent's open-file limit. Every proxied mTLS flow holds a descriptor on each side (the
//! application's connection on the client's node, the backend connection on the server's), so
//! the default soft limit of 1,024 would cap a node at about a thousand flows. At start the
//! agent raises its soft `RLIMIT_NOFILE` to the hard limit, as proxies do, and warns when even
//! that is low.

/// Below this hard limit the agent warns that it caps the concurrent flows.
const LOW_HARD_LIMIT: u64 = 16_384;

/// The limits after [`raise`]: (soft, hard).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft open-file limit to the hard one; returns the limits in force.
pub fn raise() -> std::io::Result<FdLimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads one rlimit from a struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lim = raised;
    }
    Ok(FdLimit {
        soft: lim.rlim_cur,
        hard: lim.rlim_max,
    })
}

/// Raises the limit and logs the outcome (a failure is logged, not fatal: the agent still
/// balances in the kernel; only proxied flows are capped).
pub fn raise_and_log() {
    match raise() {
        Ok(limit) if limit.hard < LOW_HARD_LIMIT => tracing::warn!(
            soft = limit.soft,
            hard = limit.hard,
            "the open-file limit caps the proxied mTLS flows at about this many per node; \
             raise the hard RLIMIT_NOFILE (LimitNOFILE= in a systemd unit)"
        ),
        Ok(limit) => tracing::debug!(soft = limit.soft, "open-file limit"),
        Err(error) => tracing::warn!("cannot raise the open-file limit: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_limit_reaches_the_hard_one() {
        let limit = raise().unwrap();
        assert_eq!(limit.soft, limit.hard);
    }
}
