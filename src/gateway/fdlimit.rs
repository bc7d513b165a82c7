//! The process's limit on open files: every client connection is one.
//!
//! What it owns: raising the soft `RLIMIT_NOFILE` to the hard limit at start, so that
//! the gateway's `connections_max` (and the load generator's subscriber connections) are
//! not cut short by a low default soft limit. What it must not do: try to raise the hard
//! limit (that needs privileges and is the operator's decision) or fail the start: a
//! failure is logged and the old limit stays.

/// Raises the soft limit on open files to the hard limit; the soft limit now in force
/// (0 when it could not be read).
pub fn raise_open_files_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the valid pointer given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        tracing::warn!("could not read the open files limit");
        return 0;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads one rlimit from the valid pointer given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return raised.rlim_cur;
        }
        tracing::warn!(
            soft = lim.rlim_cur,
            hard = lim.rlim_max,
            "could not raise the open files limit"
        );
    }
    lim.rlim_cur
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        let now = super::raise_open_files_limit();
        assert!(now > 0);
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!(lim.rlim_cur, lim.rlim_max);
        assert_eq!(now, lim.rlim_cur);
    }
}
